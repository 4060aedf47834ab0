"""The sweep parts of the CLI: the ``submit`` flags that make a rollout a steering sweep, and
``chatspace-jobs sweep JOB`` (the summary table, and the plot saved or opened)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import client, emit, json_option

# (row key, header): the summary's columns under short headers, so the table fits a terminal
COLUMNS = (("persona", "persona"), ("point", "point"), ("layer", "layer"), ("scale", "scale"),
           ("percentile", "pct"), ("threshold", "floor"), ("n", "n"),
           ("mean_response_tokens", "tokens"), ("mean_response_chars", "chars"),
           ("judge_mean", "judge"), ("refusal_rate", "refusal"), ("minilm_mean", "minilm"))


def _floats(value: str | None, flag: str) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("use comma-separated numbers like -8,-4,0,4,8",
                                 param_hint=flag) from None


def sweep_options(fn):
    """The ``submit`` flags of a sweep (their values go to :func:`sweep_params`)."""
    for opt in reversed([
            click.option("--steer-from", default=None,
                         help="sweep: the capture job whose vector steers"),
            click.option("--vector", default=None, help="sweep: the vector's name, e.g. pos_neg"),
            click.option("--scales", default=None, help="sweep: scales, e.g. -8,-4,0,4,8"),
            click.option("--normalize", is_flag=True, default=False,
                         help="sweep: scale a unit-length vector"),
            click.option("--cap-axis", default=None,
                         help="sweep: the capture job whose assistant axis caps"),
            click.option("--cap-percentiles", default=None,
                         help="sweep: cap floors as percentiles of its projections, e.g. 1,5,25"),
            click.option("--minilm-from", default=None,
                         help="sweep: score each point with the MiniLM classifier of this "
                              "pipeline job (its minilm stage); --judge MODEL scores with "
                              "the judge"),
    ]):
        fn = opt(fn)
    return fn


def sweep_params(*, steer_from, vector, scales, normalize, cap_axis, cap_percentiles,
                 layers, minilm_from=None) -> dict | None:
    """``params.sweep`` from the submit flags, or None when none of them was given. Values
    are passed through as typed: every rule lives in :mod:`app.sweeps` (API and CLI alike)."""
    if not any(v is not None for v in (steer_from, vector, scales, cap_axis, cap_percentiles)) \
            and not normalize:
        return None
    raw = {"source": steer_from, "vector": vector, "scales": _floats(scales, "--scales"),
           "normalize": True if normalize else None, "cap_axis": cap_axis,
           "cap_percentiles": _floats(cap_percentiles, "--cap-percentiles"),
           "layers": layers, "minilm_from": minilm_from}
    return {k: v for k, v in raw.items() if v is not None}


def grid_line(job: dict) -> str | None:
    """'sweep: 5 points x 2 personas (8 samples) = 40 requests' for a sweep job."""
    spec = (job.get("params") or {}).get("sweep")
    if not spec:
        return None
    g = spec["grid"]
    return (f"sweep: {g['points']} grid points x {g['personas']} personas "
            f"({g['samples']} samples) = {g['requests']} requests")


def _cell(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _render(table: dict):
    from rich.table import Table

    rows = table["rows"]
    cols = [(c, head) for c, head in COLUMNS if any(c in r for r in rows)]
    out = Table(title=f"sweep {table['job_id']} ({table['state']}"
                      f"{'' if table['complete'] else ', partial'}); tokens, chars: mean "
                      "response length")
    for _, head in cols:
        out.add_column(head)
    for r in rows:
        out.add_row(*[_cell(r.get(c)) for c, _ in cols])
    reasons = {v["reason"] for v in table["scores"].values() if not v.get("computed")}
    if reasons:
        out.caption = "null scores: " + "; ".join(sorted(reasons))
    return out


@click.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="where to save the plot (default: sweep-<job>.png here)")
@click.option("--open", "open_", is_flag=True, help="open the plot in the default viewer")
@click.option("--no-plot", is_flag=True, help="print the table only")
@json_option
@click.pass_context
def sweep(ctx, job_id, output, open_, no_plot, as_json):
    """A sweep job's summary table (per persona and grid point) and its plot."""
    c = client(ctx)
    table = c.sweep(job_id)
    emit(table, as_json, _render)
    if no_plot or not table["rows"]:
        return 0
    path = Path(output or f"sweep-{job_id[:8]}.png")
    png = c.sweep_png(job_id)
    try:
        path.write_bytes(png)
    except OSError as exc:
        raise click.BadParameter(f"cannot write {path}: {exc.strerror}",
                                 param_hint="--output") from None
    click.echo(f"plot: {path}", err=as_json)
    if open_:
        click.launch(str(path))
    return 0


def register(cli) -> None:
    cli.add_command(sweep)
