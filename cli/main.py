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
import sys
import time
from pathlib import Path

import click

EXIT_USER, EXIT_FAILED, EXIT_CANCELLED, EXIT_UNAVAILABLE = 2, 3, 4, 1
TERMINAL = ("succeeded", "failed", "cancelled")
EXIT_FOR_STATE = {"succeeded": 0, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}


class CliGroup(click.Group):
    """Turns every expected error into one line on stderr and an exit code (no traceback),
    for the console script and for ``CliRunner`` alike."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **kw):
        from pydantic import ValidationError

        from app.errors import ChatspaceError
        from cli.client import ApiError

        try:
            rv = super().main(args, prog_name or "chatspace-jobs", complete_var,
                              standalone_mode=False, **kw)
            code = rv if isinstance(rv, int) else 0
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except click.Abort:
            click.echo("aborted", err=True)
            code = EXIT_UNAVAILABLE
        except ApiError as exc:
            click.echo(f"error: {exc}", err=True)
            code = EXIT_USER if exc.user_error else EXIT_UNAVAILABLE
        except ChatspaceError as exc:
            click.echo(f"error: {exc}", err=True)
            code = EXIT_USER if exc.http_status < 500 else EXIT_UNAVAILABLE
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            click.echo(f"error: {where}: {first['msg']}", err=True)
            code = EXIT_USER
        if standalone_mode:
            sys.exit(code)
        return code


def _settings():
    from app.settings import get_settings

    return get_settings()


def client(ctx: click.Context):
    """The API client for this invocation (HTTP when an API URL is set, else in-process)."""
    obj = ctx.find_root().obj
    if obj.get("client") is None:
        from cli import client as c

        settings = _settings()
        url = obj.get("api_url") or settings.api_url
        if url:
            token = settings.api_token.get_secret_value() if settings.api_token else None
            obj["client"] = c.http_client(url, token)
        else:
            obj["client"] = c.in_process_client(settings)
    return obj["client"]


def emit(data, as_json: bool, render=None) -> None:
    if as_json or render is None:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console

    Console().print(render(data))


json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")


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


@cli.command()
@click.argument("dataset")
@click.option("--kind", type=click.Choice(["capture", "rollout"]), default="capture")
@click.option("--model", default=None, help="default: settings.default_model")
@click.option("--dtype", default=None, help="bfloat16 | float16 | float32")
@click.option("--layers", default=None, help="10,20,30 or all (default all)")
@click.option("--max-samples", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--max-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--steer", "steer_file", type=click.Path(dir_okay=False), default=None,
              help="a JSON file with a list of steering ops (rollout)")
@click.option("--capture", is_flag=True, default=None, help="rollout: also store activations")
@click.option("--wait", is_flag=True, help="show progress until the job ends")
@json_option
@click.pass_context
def submit(ctx, dataset, kind, model, dtype, layers, max_samples, batch_size, max_tokens,
           temperature, seed, steer_file, capture, wait, as_json):
    """Submit a job over DATASET; prints its id."""
    params = {"layers": _layers(layers), "max_samples": max_samples, "batch_size": batch_size,
              "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
              "steer": _steer(steer_file), "capture": capture or None}
    body = {"kind": kind, "dataset": dataset, "model": model, "dtype": dtype,
            "params": {k: v for k, v in params.items() if v is not None}}
    c = client(ctx)
    job = c.submit({k: v for k, v in body.items() if v is not None})
    if as_json and not wait:
        emit(job, True)
    else:
        click.echo(job["id"])
    if wait:
        return _watch(ctx, c, job["id"], as_json=as_json, start_local=True)
    return 0


def _needs_local_worker(c, job: dict) -> bool:
    """In-process mode with no live worker able to take the job: nothing else would run it."""
    if c.where != "in-process":
        return False
    from app.queues import ANY_QUEUE, queue_name

    wanted = {queue_name(job["model"], job["dtype"]), ANY_QUEUE}
    return not any(w.get("alive") and wanted & set(w.get("queues") or []) for w in c.workers())


def _start_local_worker(job_id: str):
    import threading

    from workers.cli import run_local_until_idle

    thread = threading.Thread(target=run_local_until_idle, args=(job_id,), daemon=True,
                              name="local-worker")
    thread.start()
    return thread


def _watch(ctx, c, job_id: str, *, as_json: bool, start_local: bool = False,
           interval: float = 1.0) -> int:
    from rich.console import Console
    from rich.live import Live

    from cli import views

    job = c.job(job_id)
    if start_local and job["state"] not in TERMINAL and _needs_local_worker(c, job):
        click.echo("no live worker serves this model; starting a local one", err=True)
        _start_local_worker(job_id)
    console = Console(stderr=as_json)
    with Live(views.progress_view([job]), console=console, refresh_per_second=4,
              transient=False) as live:
        while job["state"] not in TERMINAL:
            time.sleep(interval)
            job = c.job(job_id)
            live.update(views.progress_view([job]))
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
    from cli import views

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
    from rich.live import Live

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
    from cli import views

    emit(client(ctx).jobs(state=state, kind=kind, dataset=dataset, model=model, limit=limit),
         as_json, views.jobs_table)


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def events(ctx, job_id, as_json):
    """A job's history: state changes, OOM retries, engine restarts."""
    from cli import views

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


from cli.commands import register

register(cli)


def main() -> None:
    cli(obj={})
