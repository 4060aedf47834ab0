"""A test-only probe of the pipeline loop: what each (stage, persona) item ran, and a pause
where a test wants to kill the worker. Off unless ``CHATSPACE_TEST_PROBE`` is set; nothing
in production sets it (``tests/integration/test_stage_resume.py`` does).

- ``CHATSPACE_TEST_PROBE=/path/probe.jsonl``: one JSON line per item start (``"start"``) and
  per engine call the item made (``"generate"`` / ``"capture"``, with the number of
  requests), each with the worker process's pid, the stage and the persona. The resume
  tests count these to prove that no finished (stage, persona) ran again after a crash.
- ``CHATSPACE_TEST_PROBE_SLOW=STAGE:SECONDS``: items of that stage sleep that long after
  each line they write, so a test can kill the worker while one of them is in flight.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

PROBE_ENV = "CHATSPACE_TEST_PROBE"
SLOW_ENV = "CHATSPACE_TEST_PROBE_SLOW"


class Probe:
    def __init__(self, path: str, slow: str = ""):
        self.path = path
        stage, _, seconds = slow.partition(":")
        self.slow_stage, self.slow_s = stage or None, float(seconds or 0)

    def write(self, stage: str, persona: str, what: str, **data) -> None:
        line = json.dumps({"pid": os.getpid(), "stage": stage, "persona": persona,
                           "what": what, "t": time.time(), **data})
        with open(self.path, "a") as f:  # one write per line: lines of two workers never mix
            f.write(line + "\n")
        if stage == self.slow_stage:
            time.sleep(self.slow_s)

    def watch(self, stage: str, persona: str, engine: Callable[[], object]):
        """Record the item's start; returns its engine getter, whose engine records calls."""
        self.write(stage, persona, "start")
        return lambda: _Counted(engine(), self, stage, persona)


class _Counted:
    """The engine, with every ``generate`` / ``capture`` call and every streamed batch
    written to the probe."""

    def __init__(self, engine, probe: Probe, stage: str, persona: str):
        self._engine, self._probe, self._item = engine, probe, (stage, persona)

    def generate(self, prompts, *args, **kw):
        out = self._engine.generate(prompts, *args, **kw)
        self._probe.write(*self._item, "generate", requests=len(prompts))
        return out

    def capture(self, sequences, *args, **kw):
        out = self._engine.capture(sequences, *args, **kw)
        self._probe.write(*self._item, "capture", requests=len(sequences))
        return out

    def stream(self, items, *args, **kw):
        """The engine's stream: one line per finished batch of samples (their generations,
        and the re-reads among them), written as the batch comes back."""
        inner = self._engine.stream(items, *args, **kw)
        try:
            for batch in inner:
                self._probe.write(*self._item, "generate", requests=len(batch))
                reread = sum(1 for r in batch if getattr(r, "capture", None) is not None)
                if reread:
                    self._probe.write(*self._item, "capture", requests=reread)
                yield batch
        finally:
            inner.close()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def from_env() -> Probe | None:
    path = os.environ.get(PROBE_ENV)
    return Probe(path, os.environ.get(SLOW_ENV, "")) if path else None
