"""What every `tenx` command shares: its consoles, how expected mistakes are reported,
the --config option, and loading settings, the applied plan and the stores."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from featurestore.config import Settings, load_settings
from featurestore.errors import CompileError, ConfigError, SchemaError, TenxError, TerminalError
from featurestore.plan import Plan, compile_repo
from featurestore.redact import redact_url
from featurestore.registry import FileRegistry

# Off a terminal (a pipe, a CI log) rich assumes 80 columns and cuts names in tables;
# 120 keeps them whole unless COLUMNS says otherwise.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
console = Console(width=_WIDTH)
errors = Console(stderr=True, soft_wrap=True)  # messages stay one line each, greppable

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURE = 1  # something went wrong while running
EXIT_USAGE = 2  # the input, definitions or configuration are wrong: fix and rerun
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def print_error(message: str) -> None:
    """`error: <message>` on stderr; the message printed as it is (no rich markup)."""
    errors.print("[bold red]error:[/] ", end="")
    errors.print(message, markup=False, highlight=False)


def friendly(command: F) -> F:
    """Expected mistakes print a clear message and exit non-zero, never a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CompileError as error:
            errors.print(f"[bold red]error:[/] the feature repo has {len(error.problems)} problem(s):")
            for problem in error.problems:
                errors.print(f"  - {problem}", markup=False, highlight=False)
            sys.exit(EXIT_USAGE)
        except (ConfigError, TerminalError, SchemaError) as error:
            print_error(str(error))
            sys.exit(EXIT_USAGE)
        except TenxError as error:
            print_error(str(error))
            sys.exit(EXIT_FAILURE)
        except KeyboardInterrupt:
            # Every write commits whole (a Delta commit, an ordered online write), so an
            # interrupted command leaves what it finished and nothing half-written.
            errors.print(
                f"interrupted: `tenx {command.__name__.replace('_', '-')}` stopped; what it had committed stays, "
                "and running it again is safe (it replaces or skips what is already there)",
                highlight=False,
            )
            sys.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Path of tenx.yaml, or of the folder holding it (default: $TENX_CONFIG, else the nearest tenx.yaml in "
    "this folder or one above it).",
)


def settings_of(config_file: Path | None) -> Settings:
    return load_settings(config_file)


def compile_plan(settings: Settings) -> Plan:
    return compile_repo(settings.features_path, project=settings.project, modules=settings.modules)


def applied_plan(settings: Settings) -> Plan:
    """Engines run the applied plan from the registry, never the repo's modules; an edit
    not applied yet is pointed out (it does not take effect until `tenx apply`)."""
    plan = FileRegistry(settings.registry_dir).current()
    if plan is None:
        raise ConfigError(f"no plan applied in {settings.registry_dir}; run `tenx apply` first")
    try:
        current = compile_plan(settings).version
    except (Exception, SystemExit):  # noqa: BLE001 - a note only: whatever the repo does, the plan runs
        current = None
    if current != plan.version:
        state = "does not compile" if current is None else f"differs from it (plan {current})"
        errors.print(
            f"note: running the applied plan {plan.version}; the feature repo {state}: `tenx plan` shows why, "
            "`tenx apply` puts it to use",
            highlight=False,
        )
    return plan


def online_store(settings: Settings, plan: Plan) -> Any:
    """The online store, keyed by the applied plan's project (an edit of tenx.yaml counts
    once applied, as every engine sees it)."""
    from featurestore.stores.online import open_online_store

    return open_online_store(
        redis_url=settings.redis_url,
        sqlite_path=settings.online_path,
        project=plan.project,
        pool_size=settings.redis_pool_size,
        pool_timeout_s=settings.redis_pool_timeout_s,
    )


def offline_store(settings: Settings) -> Any:
    """The offline store where tenx.yaml (or TENX_OFFLINE_PATH) puts it; an object store
    that cannot be reached is one line here, before any work."""
    from featurestore.stores.offline import DeltaOfflineStore

    settings.offline_location.check()
    return DeltaOfflineStore(settings.offline_location)


def store_name(settings: Settings) -> str:
    if settings.redis_url:
        return f"Redis at {redact_url(settings.redis_url)}"
    return f"embedded store {settings.online_path}"


def view_or_error(plan: Plan, name: str) -> Any:
    try:
        return plan.view(name)
    except KeyError as error:
        raise ConfigError(str(error.args[0])) from error


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=errors,
        transient=True,
        disable=not errors.is_terminal,  # off a terminal a bar only leaves a blank line
    )


def token_options(command: Any) -> Any:
    """`--token` / `--token-file`, shared by the servers (`serve`, `serve-models`)."""
    command = click.option(
        "--token-file",
        envvar="TENX_API_TOKEN_FILE",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="Read the bearer token from this file ($TENX_API_TOKEN_FILE).",
    )(command)
    return click.option(
        "--token",
        envvar="TENX_API_TOKEN",
        default=None,
        help="Require `Authorization: Bearer TOKEN` ($TENX_API_TOKEN; prefer --token-file: a command line shows in "
        "`ps`).",
    )(command)


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The bearer token from --token or --token-file (one of them, a non-empty file)."""
    if token_file is None:
        return token
    if token:
        raise ConfigError("give the token once: --token (or $TENX_API_TOKEN) or --token-file, not both")
    try:
        text = token_file.read_text().strip()
    except OSError as error:
        raise ConfigError(f"--token-file {token_file}: {error.strerror}") from error
    if not text:
        raise ConfigError(f"--token-file {token_file} is empty: write the token into it")
    return text


def check_port_free(host: str, port: int) -> None:
    """Say so before announcing a server, rather than after, in uvicorn's words."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise ConfigError(f"--host {host}: {error}") from error
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            hint = "; pass another --port" if error.errno == errno.EADDRINUSE else ""
            raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror}){hint}") from error
