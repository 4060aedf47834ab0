"""The CLI a person reads: an example in every command's --help, nothing cut when piped."""

from __future__ import annotations

import io

from click.testing import CliRunner


def test_every_command_has_an_example_in_its_help():
    from cli.help import missing
    from cli.main import cli

    assert missing(cli) == []
    runner = CliRunner()
    for args in (["--help"], ["submit", "--help"], ["artifacts", "get", "--help"],
                 ["analyze", "--help"], ["workers", "release", "--help"]):
        out = runner.invoke(cli, args).output
        assert "Examples:" in out and "chatspace-jobs " in out.split("Examples:")[1], args


def test_piped_tables_keep_full_ids_and_keys():
    from rich.console import Console

    from cli import views
    from cli.render import show

    job_id = "0123456789abcdef0123456789abcdef"
    key = f"chatspace/tiny_qwen3/traits_sample/float32/{job_id}/sycophantic.safetensors"
    listing = {"prefix": key.rsplit("/", 1)[0] + "/",
               "artifacts": [{"key": key, "size": 123456, "sha256": "ab" * 32}]}
    job = {"id": job_id, "kind": "capture", "dataset": "traits_sample", "model": "tiny:qwen3",
           "dtype": "float32", "state": "succeeded", "failure_kind": None,
           "progress": {"items_done": 3, "items_total": 3}, "created_at": None}
    for render, data, wanted in ((views.artifacts_table, listing, key),
                                 (views.progress_view, [job], job_id),
                                 (views.jobs_table, [job], job_id)):
        piped = io.StringIO()
        show(render(data), console=Console(file=piped, width=80))  # not a terminal
        assert wanted in piped.getvalue(), piped.getvalue()
        assert "…" not in piped.getvalue()
        narrow = io.StringIO()  # a terminal 80 columns wide: cells wrap, never end in '…'
        show(render(data), console=Console(file=narrow, width=80, force_terminal=True,
                                           color_system=None))
        assert "…" not in narrow.getvalue()
        first_column = "".join(line.split("│")[1].strip()
                               for line in narrow.getvalue().splitlines()
                               if line.startswith("│"))
        assert wanted in first_column, narrow.getvalue()
