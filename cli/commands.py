"""The CLI's other command groups: artifacts, workers, datasets, db, and the two servers
(``api`` and ``worker``), which import their heavy parts only when run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from app.settings import get_settings
from app.spec import SteerOpSpec
from cli import results, views
from cli.client import ApiError, wiring
from cli.common import client, emit, json_option
from cli.help import add_examples


@click.group(invoke_without_command=True)
@click.pass_context
def artifacts(ctx):
    """Browse what jobs stored (S3/MinIO or the local folder)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(artifacts_ls)


def _looks_like_job(value: str) -> bool:
    return "/" not in value and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


@artifacts.command("ls")
@click.argument("target", required=False, default="")
@json_option
@click.pass_context
def artifacts_ls(ctx, target="", as_json=False):
    """List artifacts of a JOB id, or under a key PREFIX."""
    c = client(ctx)
    listing = (c.artifacts(job=target) if _looks_like_job(target)
               else c.artifacts(prefix=target))
    emit(listing, as_json, views.artifacts_table)


@artifacts.command("get")
@click.argument("key")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="where to write it (default: the key's file name; for a JOB, a folder "
                   "named after it)")
@click.pass_context
def artifacts_get(ctx, key, output):
    """Download one artifact by KEY, or every file of a JOB into a folder (resumable, each
    file checked against the manifest's sha256)."""
    if _looks_like_job(key):
        return results.download_job(ctx, key, output)
    c = client(ctx)
    c.artifact_meta(key)  # a clear 404 before any file is created
    path = Path(output or key.rsplit("/", 1)[-1])
    size = c.download(key, path)
    click.echo(f"{path} ({size:,} bytes)")


@artifacts.command("url")
@click.argument("key")
@click.option("--expires", "expires_s", type=int, default=3600, help="seconds")
@json_option
@click.pass_context
def artifacts_url(ctx, key, expires_s, as_json):
    """A (presigned) download URL for one artifact."""
    out = client(ctx).artifact_url(key, expires_s=expires_s)
    emit(out, True) if as_json else click.echo(out["url"])


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def workers(ctx, as_json):
    """Workers with heartbeat age, GPU, model and memory; release or reload one."""
    if ctx.invoked_subcommand is None:
        emit(client(ctx).workers(), as_json, views.workers_table)


def _control(ctx, command: str, name: str, as_json: bool) -> None:
    out = client(ctx).control(command, name)
    if as_json:
        emit(out, True)
        return
    for reply in out.get("replies") or [{"worker": name, "ok": None}]:
        state = "deferred until its job ends" if reply.get("deferred") else (
            "done" if reply.get("ok") else f"no confirmation ({reply.get('error', 'no reply')})")
        click.echo(f"{command} {reply.get('worker', name)}: {state}")


@workers.command("release")
@click.argument("name")
@json_option
@click.pass_context
def workers_release(ctx, name, as_json):
    """Ask worker NAME to shut its engine down and give the GPU back."""
    _control(ctx, "release", name, as_json)


@workers.command("reload")
@click.argument("name")
@json_option
@click.pass_context
def workers_reload(ctx, name, as_json):
    """Ask worker NAME to restart its engine."""
    _control(ctx, "reload", name, as_json)


@click.group()
def datasets():
    """Datasets under the datasets root."""


@datasets.command("ls")
@json_option
@click.pass_context
def datasets_ls(ctx, as_json):
    """Datasets with persona and sample counts (invalid ones flagged)."""
    emit(client(ctx).datasets(), as_json, views.datasets_table)


@click.command()
@click.pass_context
def ready(ctx):
    """Readiness of the API's database, broker and store (JSON); exit 1 when not ready."""
    try:
        emit(client(ctx).ready(), True)
    except ApiError as exc:
        if exc.status != 503 or "checks" not in exc.body:
            raise
        emit(exc.body, True)
        return 1
    return 0


@click.group()
def db():
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head")
def db_upgrade(revision):
    """Apply migrations to the configured database (run before the API starts)."""
    from app.db import upgrade

    settings = get_settings()
    upgrade(settings.db_url, revision)
    click.echo(f"database at {'embedded sqlite' if settings.embedded else 'configured URL'} "
               f"upgraded to {revision}")


@click.command()
@click.option("--host", default=None, help="default: settings.api_host")
@click.option("--port", type=int, default=None, help="default: settings.api_port")
def api(host, port):
    """Serve the status API (uvicorn), wired to the Celery dispatch and remote control."""
    import uvicorn

    from app.api import create_app

    logging.getLogger().setLevel(logging.INFO)
    settings = get_settings()
    enqueue, control = wiring()
    app = create_app(settings, enqueue=enqueue, control=control)
    uvicorn.run(app, host=host or settings.api_host, port=port or settings.api_port,
                log_level="info")


@click.command()
@click.option("--model", default=None, help="serve this model's pool (default: any model)")
@click.option("--dtype", default=None)
@click.option("--gpus", default=None, help="GPU indices, e.g. 0,1 (default: all visible)")
@click.option("--queues", default=None, help="extra queues, comma-separated")
@click.option("--name", default=None, help="base worker name (default: host name)")
@click.option("--max-jobs", type=int, default=None, help="exit after this many jobs")
@click.option("--exit-when-idle", is_flag=True, help="exit when no work is left")
@click.option("--judge-model", default=None, metavar="MODEL",
              help="run judge workers for this model instead: they answer the API's "
                   "OpenAI-compatible /v1/chat/completions (submit --judge workers:MODEL)")
def worker(**kwargs):
    """Run GPU workers (one Celery process per GPU, each with a warm engine), or with
    --judge-model the judge pool's workers for one judge model."""
    try:
        from workers.cli import run_worker
    except ImportError as exc:
        raise click.ClickException(f"the worker runtime is not installed here ({exc})") from None
    logging.getLogger().setLevel(logging.INFO)
    try:
        return run_worker(**kwargs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.command("steer-spec")
@click.option("--schema", "as_schema", is_flag=True, help="print the JSON schema")
def steer_spec(as_schema):
    """What a steering op (a rollout's params.steer item) may hold: its fields, or with
    --schema the JSON schema the API documents (one declaration: app/spec.py)."""
    schema = SteerOpSpec.model_json_schema(by_alias=True)
    if as_schema:
        click.echo(json.dumps(schema, indent=2))
        return 0
    refs = schema.get("$defs", {})
    for name, prop in schema["properties"].items():
        ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("anyOf", []) if "$ref" in a),
                                       None)
        req = "required" if name in schema.get("required", []) else "optional"
        click.echo(f"{name:8} {req:9} {prop.get('description', '')}")
        for sub, sp in (refs[ref.rsplit("/", 1)[-1]]["properties"].items() if ref else ()):
            click.echo(f"  {name}.{sub:12} {sp.get('description', '')}")
    return 0


def register(cli: click.Group) -> None:
    for command in (artifacts, workers, datasets, ready, db, api, worker, steer_spec,
                    results.analyze):
        cli.add_command(command)
    add_examples(cli)
