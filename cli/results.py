"""Results commands: a whole job's download (``artifacts get JOB -o DIR``) and ``analyze``.

Both read through :mod:`app.results`: over HTTP when an API URL is set (``--api-url`` /
``CHATSPACE_API_URL``, with ``CHATSPACE_API_TOKEN``), else straight from the configured
database and store. Registered with the other groups by ``cli.commands.register``.
"""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import emit, json_option


def source(ctx: click.Context):
    from app.results import ApiSource, StoreSource
    from app.settings import get_settings

    settings = get_settings()
    url = (ctx.find_root().obj or {}).get("api_url") or settings.api_url
    if url:
        token = settings.api_token.get_secret_value() if settings.api_token else None
        return ApiSource(url, token)
    return StoreSource(settings)


def download_job(ctx: click.Context, job_id: str, output: str | None, *,
                 as_json: bool = False) -> int:
    """``artifacts get JOB -o DIR``: every file of the job, resumable, sha256-checked."""
    from app.progress import RichProgress
    from app.results import download_job as run

    dest = Path(output or job_id)
    if dest.exists() and not dest.is_dir():
        raise click.BadParameter(f"{dest} is a file; a whole job needs a folder",
                                 param_hint="-o/--output")
    bar = RichProgress()
    try:
        report = run(source(ctx), job_id, dest, progress=bar)
    finally:
        bar.close()
    if as_json:
        emit(report.as_dict(), True)
    else:
        click.echo(f"{dest}/: {report.files} files, {report.bytes_total:,} bytes "
                   f"({report.downloaded} downloaded, {report.skipped} already there and "
                   f"matching) in {report.seconds:.2f} s; every file matches the manifest's "
                   "sha256")
    return 0


def _analysis_table(summary: dict):
    from rich.table import Table

    t = Table(title=f"{summary['vector']} analysis of {summary['job_id']} "
                    f"({len(summary['personas'])} personas)")
    for col in ("layer", "PC1", "PC2", "PC3", "axis cos(PC1)" if summary.get("has_axis")
                else None):
        if col:
            t.add_column(col, justify="right")
    for e in summary["per_layer"]:
        ratios = [f"{r:.3f}" for r in e["explained_variance_ratio"][:3]]
        ratios += ["-"] * (3 - len(ratios))
        row = [str(e["layer"]), *ratios]
        if summary.get("has_axis"):
            c = e.get("pc1_axis_cosine")
            row.append("-" if c is None else f"{c:.3f}")
        t.add_row(*row)
    return t


@click.command()
@click.argument("job_id")
@click.option("--vector", default="pos_neg", show_default=True,
              help="which persona vector (traits: pos_neg, pos_default...; roles: pos_all...)")
@json_option
@click.pass_context
def analyze(ctx, job_id, vector, as_json):
    """Per layer: PCA, cosine similarities and assistant-axis projections of a succeeded
    capture job's persona vectors; stored beside its artifacts with PNG plots."""
    summary = source(ctx).analyze(job_id, vector=vector)
    if as_json:
        emit(summary, True)
        return 0
    emit(summary, False, _analysis_table)
    click.echo("stored:")
    for name in sorted(summary["files"]):
        click.echo(f"  {summary['files'][name]}")
    return 0

