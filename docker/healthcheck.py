"""Container health checks, run by the images' HEALTHCHECK (stdlib only: no curl in the images).

``api``: GET /readyz on the local API (database reachable and migrated), so compose's
``service_healthy`` waits for an API that can answer, not one that merely listens.

``worker``: a ``celery worker`` process is alive in this container. Not a Celery ``ping``: a
``--pool=solo`` worker answers control messages only between tasks, so a ping during an
hours-long job would time out and mark a working worker unhealthy. Liveness of the job itself
is the worker's heartbeat in Postgres, which the reaper watches.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def api() -> int:
    port = os.environ.get("CHATSPACE_API_PORT", "8000")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(f"api not ready: {exc}", file=sys.stderr)
        return 1


def worker() -> int:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"celery" in b" ".join(argv) and b"worker" in argv:
            return 0
    print("no celery worker process in this container", file=sys.stderr)
    return 1


if __name__ == "__main__":
    checks = {"api": api, "worker": worker}
    if len(sys.argv) != 2 or sys.argv[1] not in checks:
        sys.exit(f"usage: healthcheck.py {{{'|'.join(checks)}}}")
    sys.exit(checks[sys.argv[1]]())
