"""CLI commands for published data: ``datasets pull | validate | ls`` and ``artifacts export``.

Registered onto the existing ``datasets`` and ``artifacts`` groups by name (``register``), so
this module stays apart from the rest of the CLI. ``pull`` and ``validate`` run on this
machine against the configured datasets root (a folder or ``s3://``; the API reads the same
root when it shares the settings); ``ls`` and ``export`` go through the API like the other
commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

EXPORT_FORMATS = ("assistant-axis",)


def _settings():
    from app.settings import get_settings

    return get_settings()


def _progress():
    """(callback, context manager): a rich progress bar over downloaded bytes (stderr)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TransferSpeedColumn,
    )

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), console=Console(stderr=True), transient=False)
    task = bar.add_task("download", total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar


def do_pull(names, *, source=None, ref=None, digests=None, trust=False, force=False,
            as_json=False) -> int:
    import contextlib

    from app import release

    downloading = source is None or source.startswith(("http://", "https://"))
    update, bar = _progress() if downloading else (lambda d, t: None, contextlib.nullcontext())
    with bar:
        results = release.pull(list(names), settings=_settings(), source=source,
                               ref=ref or release.PINNED, digests_file=digests, trust=trust,
                               force=force, progress=update)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=2))
    for r in results:
        state = "verified" if r.verified else "UNVERIFIED (--trust)"
        if not as_json:
            click.echo(f"{r.name}: {r.files} files, {state}, at {r.location}"
                       + (" (replaced)" if r.replaced else ""))
    return 0


@click.command("pull")
@click.argument("names", nargs=-1, required=True)
@click.option("--ref", default=None, help="release commit (default: the pinned a989619)")
@click.option("--from", "source", default=None,
              help="a mirror URL, a tarball or a local checkout instead of GitHub")
@click.option("--digests", type=click.Path(dir_okay=False, exists=True), default=None,
              help="a sha256sum table for another --ref (paths under data/)")
@click.option("--trust", is_flag=True, help="accept files that do not match (recorded)")
@click.option("--force", is_flag=True, help="replace a dataset already there")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def datasets_pull(names, ref, source, digests, trust, force, as_json):
    """Download, verify and unpack the published traits_240 and/or roles_240.

    From safety-research/assistant-axis data/ at a pinned commit, each file checked against
    pinned sha256 digests, unpacked under the datasets root with a PROVENANCE.json."""
    return do_pull(names, source=source, ref=ref, digests=digests, trust=trust, force=force,
                   as_json=as_json)


@click.command("validate")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def datasets_validate(target, as_json):
    """Every problem of a dataset (NAME under the root, a folder or s3:// URL): file,
    persona, field. Exit 2 when there is any."""
    from app.datasets import load_dataset, load_dataset_at, validate_dataset

    problems = validate_dataset(target, settings=_settings())
    if as_json:
        click.echo(json.dumps([p.__dict__ for p in problems], indent=2))
    else:
        for p in problems:
            click.echo(str(p))
    if problems:
        if not as_json:
            click.echo(f"{len(problems)} problem(s)", err=True)
        return 2
    is_path = "/" in target or target.startswith("s3://")
    ds = (load_dataset_at(target, settings=_settings()) if is_path
          else load_dataset(target, settings=_settings()))
    if not as_json:
        click.echo(f"{ds.name}: valid {ds.kind}, {len(ds.personas)} personas, "
                   f"{len(ds.questions)} shared questions, {ds.job_sample_count()} samples "
                   f"per capture job")
    return 0


@click.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def datasets_ls(ctx, as_json):
    """Datasets with what a capture job would take: personas, shared questions, samples
    (the default persona once); invalid ones with their first problem."""
    from rich.console import Console
    from rich.table import Table

    from cli.common import client

    rows = client(ctx).datasets()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return 0
    roots = sorted({d["root"].rsplit("/", 1)[0] for d in rows})
    t = Table(title="datasets", caption=f"under {', '.join(roots)}" if roots else None)
    t.add_column("name", no_wrap=True)
    for col in ("kind", "personas", "questions", "samples/job", "default"):
        t.add_column(col, no_wrap=True)
    for d in rows:
        t.add_row(d["name"], d["kind"], str(d["personas"]), str(d.get("questions", "")),
                  f"{d['samples']:,}", "yes" if d.get("has_default") else "")
    Console().print(t)
    for d in rows:
        if d["kind"] == "invalid":
            click.echo(f"{d['name']}: {d.get('error') or 'invalid'} "
                       f"(chatspace-jobs datasets validate {d['name']})")
    return 0


@click.command("export")
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="assistant-axis")
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True)
@click.pass_context
def artifacts_export(ctx, job_id, fmt, output):
    """Write a capture job's activations as the public pipelines' files.

    assistant-axis: per persona ``activations/<persona>.pt`` = ``{"<label>_p<i>_q<j>":
    tensor(n_layers, hidden)}`` as ``pipeline/2_activations.py`` saves (roles: pos samples; default: its
    samples labelled pos, as 1_generate labels them; traits: pos, neg and the default
    persona's samples, as persona-subspace trait files hold them), ``vectors/<persona>.pt``
    as ``4_vectors.py`` saves, and ``axis.pt`` as ``5_axis.py`` saves when the job has an
    axis."""
    import tempfile

    from app.export import export_assistant_axis
    from cli.common import client

    c = client(ctx)
    job = c.job(job_id)
    listing = c.artifacts(job=job_id)
    keys = [a["key"] for a in listing.get("artifacts", [])]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        def fetch(key: str) -> bytes:
            path = Path(tmp) / "blob"
            c.download(key, path)
            return path.read_bytes()

        written = export_assistant_axis(keys, fetch=fetch, out=out, dataset=job["dataset"])
    for w in written:
        click.echo(w)
    return 0


def register(cli: click.Group) -> None:
    """Add the commands to the ``datasets`` and ``artifacts`` groups (found by name), with
    their ``--help`` examples (cli/help.py)."""
    from cli.help import add_examples

    datasets = cli.commands["datasets"]
    for cmd in (datasets_pull, datasets_validate, datasets_ls):
        datasets.add_command(cmd)
    cli.commands["artifacts"].add_command(artifacts_export)
    add_examples(cli)


def pull_if_missing(name: str) -> None:
    """``submit --pull``: pull a published dataset that is not under the datasets root."""
    from app.datasets import PULLABLE, load_dataset
    from app.errors import DatasetNotFound

    if name not in PULLABLE:
        return
    try:
        load_dataset(name, settings=_settings())
    except DatasetNotFound:
        click.echo(f"{name} is not here; pulling it", err=True)
        do_pull([name])
