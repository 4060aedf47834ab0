"""``chatspace-jobs``: submit jobs, watch them, browse artifacts, drive workers.

Talks to the API at ``--api-url`` / ``CHATSPACE_API_URL`` when set, else runs the same API
in-process on the configured database (the embedded SQLite by default, migrated on first
use). Heavy imports (workers, Celery, torch, vLLM) happen only inside the commands that need
them. Exit codes: 0 ok, 1 service unavailable, 2 user error (one line on stderr), 3 the job
failed and 4 it was cancelled (``submit --wait``, ``status --watch JOB``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from app.spec import KINDS
from cli import views, waiting
from cli.commands import register
from cli.common import (
    EXIT_FOR_STATE,
    TERMINAL,
    CliGroup,
    client,
    emit,
    json_option,
)
from cli.datasets_cmds import register as register_data_commands
from cli.sweep import grid_line, sweep_options, sweep_params
from cli.sweep import register as register_sweep


@click.group(cls=CliGroup)
@click.option("--api-url", envvar="CHATSPACE_API_URL", default=None,
              help="the status API (default: in-process on the configured database)")
@click.option("-v", "--verbose", is_flag=True, help="log at INFO")
@click.pass_context
def cli(ctx: click.Context, api_url: str | None, verbose: bool) -> None:
    """Batch persona capture and steered rollouts on warm vLLM workers."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["api_url"] = api_url


def _layers(value: str | None):
    if value is None:
        return None
    if value.strip().lower() == "all":
        return "all"
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("use comma-separated layer indices like 10,20,30 or 'all'",
                                 param_hint="--layers") from None


def _steer(path: str | None):
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--steer") from None
    if isinstance(data, dict) and "steer" in data:
        data = data["steer"]
    if not isinstance(data, list):
        raise click.BadParameter("the file must hold a list of steering ops (or "
                                 '{"steer": [...]})', param_hint="--steer")
    return data


def _params(pairs) -> dict:
    """``--param name=VALUE`` pairs; VALUE is JSON (a bare word is a string). The job spec
    checks names and types, so a new parameter needs no CLI change."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{pair!r}: use NAME=VALUE", param_hint="--param")
        try:
            out[name.strip()] = json.loads(value)
        except ValueError:
            out[name.strip()] = value
    return out


@cli.command()
@click.argument("dataset")
@click.option("--kind", type=click.Choice(KINDS), default="capture")
@click.option("--model", default=None, help="default: settings.default_model")
@click.option("--dtype", default=None, help="bfloat16 | float16 | float32")
@click.option("--layers", default=None, help="10,20,30 or all (default all)")
@click.option("--max-samples", type=int, default=None,
              help="first N samples per persona, prompt-major (a quick look: later prompts "
                   "lose questions); use --questions to run fewer questions")
@click.option("--questions", type=int, default=None,
              help="first N shared questions (the public --question_count)")
@click.option("--personas", default=None, help="a,b,c: only these personas (public --roles)")
@click.option("--model-name", default=None, help="fills {model_name} (default: Qwen, Llama...)")
@click.option("--min-count", type=int, default=None, help="roles: samples per score group (50)")
@click.option("--axis-from", default=None, help="a roles job: project on its assistant axis")
@click.option("--pull", "pull_missing", is_flag=True,
              help="pull a missing published dataset (traits_240, roles_240) first")
@click.option("--batch-size", type=int, default=None)
@click.option("--max-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--steer", "steer_file", type=click.Path(dir_okay=False), default=None,
              help="a JSON file with a list of steering ops (rollout)")
@click.option("--capture", is_flag=True, default=None, help="rollout: also store activations")
@click.option("--judge", default=None, metavar="MODEL",
              help="run the research chain generate -> capture -> judge -> vectors (-> axis) "
                   "with this judge model (CHATSPACE_JUDGE_BASE_URL / _API_KEY), or "
                   "workers:MODEL for our own judge workers (worker --judge-model MODEL)")
@click.option("--responses", default=None, metavar="JOB|PATH",
              help="capture and judge these responses instead of generating: an earlier "
                   "job's id, or a 1_generate.py JSONL file (<persona>.jsonl) or folder of "
                   "them, uploaded to the artifact store through the API")
@click.option("--stages", default=None, help="pipeline stages, e.g. generate,capture,judge")
@click.option("--param", "more", multiple=True, metavar="NAME=VALUE",
              help="any job parameter (see app/spec.py), VALUE as JSON; repeatable")
@sweep_options
@click.option("--wait", is_flag=True, help="show progress until the job ends")
@json_option
@click.pass_context
def submit(ctx, dataset, kind, model, dtype, layers, max_samples, questions, personas,
           model_name, min_count, axis_from, pull_missing, batch_size, max_tokens, temperature,
           seed, steer_file, capture, judge, responses, stages, more, wait, as_json,
           **sweep_flags):
    """Submit a job over DATASET; prints its id (a sweep's grid size on stderr)."""
    if pull_missing:
        from cli.datasets_cmds import pull_if_missing

        pull_if_missing(dataset)
    c = client(ctx)
    sweep = sweep_params(layers=_layers(layers), **sweep_flags)
    if sweep is not None:  # --layers names the sweep's layers
        layers = None
    flags = {"layers": _layers(layers), "sweep": sweep, "max_samples": max_samples,
             "batch_size": batch_size,
             "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
             "steer": _steer(steer_file), "capture": capture or None, "judge": judge,
             "responses": _responses(responses, c),
             "stages": [x.strip() for x in stages.split(",") if x.strip()] if stages else None,
             "questions": questions, "model_name": model_name, "min_count": min_count,
             "axis_from": axis_from,
             "personas": [p.strip() for p in personas.split(",") if p.strip()]
             if personas else None}
    params = {**_params(more), **{k: v for k, v in flags.items() if v is not None}}
    body = {"kind": kind, "dataset": dataset, "model": model, "dtype": dtype,
            "params": params}
    job = c.submit({k: v for k, v in body.items() if v is not None})
    if as_json and not wait:
        emit(job, True)
    else:
        click.echo(job["id"])
    if grid_line(job):
        click.echo(grid_line(job), err=True)
    if wait:
        return _watch(ctx, c, job["id"], as_json=as_json, start_local=True)
    return 0


def _responses(value: str | None, c) -> str | None:
    """A job id passes through; a local file or folder of ``<persona>.jsonl`` (the public
    ``1_generate.py`` output; a file's name is its persona's) is checked line by line here,
    then uploaded through the API (``PUT /uploads/responses/<id>/<persona>``, checked again
    there) into the artifact store, in-process and remote alike; the job reads
    ``uploads/<id>``."""
    if value is None or not Path(value).exists():
        return value
    from app.errors import SpecInvalid
    from app.responses import parse_responses, upload_id, upload_prefix

    path = Path(value)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise SpecInvalid(f"no *.jsonl files in {path}", field="params.responses",
                          hint="one <persona>.jsonl per persona, in the 1_generate.py format")
    blobs = {f.stem: f.read_bytes() for f in files}
    for f in files:
        try:
            text = blobs[f.stem].decode("utf-8")
        except UnicodeDecodeError:
            raise SpecInvalid(f"{f} is not UTF-8 text", field="params.responses") from None
        parse_responses(text.splitlines(), source=str(f))
    upload = upload_id(blobs)
    for name, blob in blobs.items():
        c.upload_responses(upload, name, blob)
    return upload_prefix(upload)


def _start_local_worker(job_id: str):
    from workers.cli import run_local_until_idle

    thread = threading.Thread(target=run_local_until_idle, args=(job_id,), daemon=True,
                              name="local-worker")
    thread.start()
    return thread


def _watch(ctx, c, job_id: str, *, as_json: bool, start_local: bool = False,
           interval: float = 1.0) -> int:
    """Live progress until the job ends, with a line saying why it waits when nothing runs
    (cli.waiting); ``start_local`` (``submit --wait``) starts a local worker in-process mode
    whenever no live worker serves the job."""
    local = waiting.LocalWorkers(_start_local_worker) if (
        start_local and c.where == "in-process") else None
    t0 = time.monotonic()

    def view(job):
        workers = c.workers() if job["state"] not in TERMINAL else []
        if local is not None and local.ensure(job, workers):
            click.echo("no live worker serves this model; starting a local one", err=True)
        line = waiting.note(job, workers, waited_s=time.monotonic() - t0,
                            local=local is not None and local.active)
        table = views.progress_view([job])
        return Group(table, Text(line, style="yellow")) if line else table

    job = c.job(job_id)
    console = Console(stderr=as_json)
    with Live(view(job), console=console, refresh_per_second=4, transient=False) as live:
        while job["state"] not in TERMINAL:
            time.sleep(interval)
            job = c.job(job_id)
            live.update(view(job))
    if as_json:
        emit(job, True)
    elif job["state"] != "succeeded":
        click.echo(f"job {job_id} {job['state']}"
                   + (f" ({job['failure_kind']}): {job.get('last_error') or ''}"
                      if job.get("failure_kind") else ""), err=True)
    return EXIT_FOR_STATE[job["state"]]


@cli.command()
@click.argument("job_id", required=False)
@click.option("--watch", is_flag=True, help="refresh until the job(s) end")
@json_option
@click.pass_context
def status(ctx, job_id, watch, as_json):
    """One job in detail, or the queued and running jobs."""
    c = client(ctx)
    if job_id:
        if watch:
            return _watch(ctx, c, job_id, as_json=as_json)
        emit(c.job(job_id), as_json, views.job_detail)
        return 0

    def active():
        return c.jobs(state="running") + c.jobs(state="queued")

    if not watch:
        emit(active(), as_json, views.progress_view)
        return 0
    jobs = active()
    with Live(views.progress_view(jobs), refresh_per_second=2) as live:
        while jobs:
            time.sleep(2.0)
            jobs = active()
            live.update(views.progress_view(jobs))
    return 0


@cli.command("list")
@click.option("--state", default=None)
@click.option("--kind", default=None)
@click.option("--dataset", default=None)
@click.option("--model", default=None)
@click.option("--limit", type=int, default=50)
@json_option
@click.pass_context
def list_(ctx, state, kind, dataset, model, limit, as_json):
    """Recent jobs, newest first."""
    emit(client(ctx).jobs(state=state, kind=kind, dataset=dataset, model=model, limit=limit),
         as_json, views.jobs_table)


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def events(ctx, job_id, as_json):
    """A job's history: state changes, OOM retries, engine restarts."""
    emit(client(ctx).events(job_id), as_json, views.events_table)


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def cancel(ctx, job_id, as_json):
    """Cancel a job (a running persona stops at its next batch)."""
    job = client(ctx).cancel(job_id)
    emit(job, True) if as_json else click.echo(f"{job['id']} {job['state']}")


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def retry(ctx, job_id, as_json):
    """Queue a failed or cancelled job again (finished personas are kept)."""
    job = client(ctx).retry(job_id)
    emit(job, True) if as_json else click.echo(f"{job['id']} {job['state']}")


register(cli)
register_data_commands(cli)
register_sweep(cli)


def main() -> None:
    cli(obj={})
