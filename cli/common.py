"""What every ``chatspace-jobs`` command shares: exit codes, the error-to-exit-code group,
the API client of an invocation, and output (JSON or a rich view).

Below :mod:`cli.main` and :mod:`cli.commands`, which both build on it (the CLI's import
order is ``main -> commands -> common -> client, views``)."""

from __future__ import annotations

import json
import sys

import click
from pydantic import ValidationError

from app.errors import ChatspaceError
from app.settings import get_settings
from cli import client as api_client
from cli.client import ApiError
from cli.render import show

EXIT_USER, EXIT_FAILED, EXIT_CANCELLED, EXIT_UNAVAILABLE = 2, 3, 4, 1
TERMINAL = ("succeeded", "failed", "cancelled")
EXIT_FOR_STATE = {"succeeded": 0, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}


class CliGroup(click.Group):
    """Turns every expected error into one line on stderr and an exit code (no traceback),
    for the console script and for ``CliRunner`` alike."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **kw):
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


def client(ctx: click.Context):
    """The API client for this invocation (HTTP when an API URL is set, else in-process)."""
    obj = ctx.find_root().obj
    if obj.get("client") is None:
        settings = get_settings()
        url = obj.get("api_url") or settings.api_url
        if url:
            token = settings.api_token.get_secret_value() if settings.api_token else None
            obj["client"] = api_client.http_client(url, token)
        else:
            obj["client"] = api_client.in_process_client(settings)
    return obj["client"]


def emit(data, as_json: bool, render=None) -> None:
    if as_json or render is None:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    show(render(data))  # nothing cut: wraps on a terminal, full width when piped


json_option = click.option("--json", "as_json", is_flag=True, help="print JSON")
