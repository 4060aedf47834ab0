"""The text a failed engine load leaves on its jobs (workers/loadfail.py).

vLLM's engine core fails in a child process and the parent raises only "Engine core
initialization failed. See root cause above"; the cause (out of GPU memory, say) is what the
child wrote to the stderr both share — the worker's log file. Reproduced here with real
processes: a parent whose stderr is a file, a child that logs the cause and dies.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from workers import loadfail

CHILD_CAUSE = ("ValueError: Free memory on device cuda:0 (3.1/79.2 GiB) on startup is less "
               "than desired GPU memory utilization (0.85, 67.3 GiB)")


def test_the_root_cause_a_child_process_logged_is_added(tmp_path):
    script = textwrap.dedent(f"""
        import subprocess, sys
        from workers import loadfail

        def engine():
            subprocess.run([sys.executable, "-c",
                            "import sys; print('(EngineCore pid=7) Traceback ...', file=sys.stderr);"
                            "print({CHILD_CAUSE!r}, file=sys.stderr)"], check=False)
            raise RuntimeError("Engine core initialization failed. See root cause above. "
                               "Failed core proc(s): {{'EngineCore_DP0': 1}}")

        try:
            loadfail.load(engine)
        except loadfail.LoadFailed as exc:
            print(exc.text)
    """)
    log = tmp_path / "worker.log"
    log.write_text("ZeroDivisionError: from an earlier job, before this load\n")
    with open(log, "ab") as err:
        out = subprocess.run([sys.executable, "-c", script], stderr=err, stdout=subprocess.PIPE,
                             text=True, check=True, cwd=str(tmp_path),
                             env={"PYTHONPATH": ":".join(sys.path)}).stdout
    assert out.startswith("RuntimeError: Engine core initialization failed"), out
    assert CHILD_CAUSE in out, out
    assert "ZeroDivisionError" not in out  # only what was written during this load


def test_a_plain_error_is_its_type_message_and_cause():
    def load():
        try:
            raise OSError("org/x is not a local folder and not on the hub")
        except OSError as exc:
            raise RuntimeError("could not start the engine") from exc

    try:
        loadfail.load(load)
    except loadfail.LoadFailed as exc:
        text = exc.text
    assert text == ("RuntimeError: could not start the engine; caused by OSError: org/x is not "
                    "a local folder and not on the hub"), text
