"""Run the reliability scenarios (tests/reliability) and print ONE table of their figures.

Each scenario records its row (jobs, personas expected / stored, duplicates, lost, recovery
time, status API p99) from the same checks that assert on it, into the file named by
CHATSPACE_TEST_RELIABILITY_REPORT; this script points that at a temp file, runs pytest, and
prints the rows. Figures particular to one scenario (seconds until every idle worker has
claimed, the broker queue's longest length during a burst, ``/readyz`` latency while S3 is
down, the API's status codes while Postgres is down) follow in a second table. Exit status:
pytest's, or 1 if any row shows a lost or duplicated persona.

    .venv/bin/python bench/reliability_report.py [--json OUT.json] [pytest args, e.g. -k burst]

``--json`` also writes the rows (with their figures and notes) to OUT.json
(``bench/results/`` keeps the runs quoted in closing notes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [("scenario", "scenario"), ("jobs", "jobs"), ("personas_expected", "expected"),
           ("personas_stored", "stored"), ("duplicates", "dup"), ("lost", "lost"),
           ("recovery_s", "recovery s"), ("p99_ms", "status p99 ms")]


def _grid(header: list[str], body: list[list[str]], left=(0,)) -> str:
    cells = [header, *body]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                        enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    return _grid([h for _, h in COLUMNS],
                 [["-" if r.get(k) is None else str(r[k]) for k, _ in COLUMNS] for r in rows])


def measures_table(rows: list[dict]) -> str:
    """One line per measured figure: (figure, value, scenario)."""
    body = [[name, str(value), r["scenario"]] for r in rows
            for name, value in (r.get("measures") or {}).items()]
    return _grid(["figure", "value", "scenario"], body, left=(0, 2)) if body else ""


def main(argv: list[str]) -> int:
    out = None
    if "--json" in argv:
        i = argv.index("--json")
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rows.jsonl"
        env = {**os.environ, "CHATSPACE_TEST_RELIABILITY_REPORT": str(report)}
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", "pytest", "tests/reliability", "-q",
                              "-p", "no:cacheprovider", *argv], cwd=ROOT, env=env)
        took = time.monotonic() - t0
        rows = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    print()
    print(table(rows))
    extra = measures_table(rows)
    if extra:
        print()
        print(extra)
    for r in rows:
        for note in r.get("notes") or []:
            print(f"  {r['scenario']}: {note}")
    print(f"\n{len(rows)} scenarios recorded in {took:.0f}s (pytest exit {rc}); workers on the "
          f"transformers backend, tiny:qwen3, kind={os.environ.get('CHATSPACE_TEST_RELIABILITY_KIND', 'capture')}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"pytest_exit": rc, "seconds": round(took), "argv": argv,
                                   "rows": rows}, indent=2) + "\n")
    bad = [r["scenario"] for r in rows if r.get("lost") or r.get("duplicates")]
    if bad:
        print(f"LOST OR DUPLICATED personas in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
