"""`tenx models canary | promote | rollback | status`: a new version on a share of the
traffic, judged against the deployed one, promoted by a person or rolled back by the
server. Every command is a registry write or read; running servers follow within a
second, warm, without a restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from featurestore.errors import ConfigError, TransientError
from featurestore.models import CanaryLimits, check_views, parse_model_ref
from featurestore.registry import FileRegistry
from tenx.commands.common import config_option, console, friendly, settings_of
from tenx.commands.models import _user, model_registry, models


@models.command("canary")
@click.argument("model_ref", metavar="NAME@VERSION")
@click.option(
    "--percent", type=click.FloatRange(0, 100, min_open=True), default=5.0, show_default=True,
    help="Share of entities the new version serves (sticky: an entity stays on its side).",
)  # fmt: skip
@click.option("--shadow", is_flag=True, help="Score a copy of that share with the new version; answer with the old.")
@click.option("--min-requests", type=click.IntRange(1), default=200, show_default=True,
              help="Canary requests before any automatic verdict.")  # fmt: skip
@click.option("--max-error-rate-delta", type=click.FloatRange(0, 1, min_open=True), default=0.02, show_default=True,
              help="Roll back when the canary's error rate exceeds the baseline's by more.")  # fmt: skip
@click.option("--max-p99-ratio", type=click.FloatRange(1, min_open=True), default=2.0, show_default=True,
              help="Roll back when the canary's scoring p99 is this many times the baseline's.")  # fmt: skip
@click.option("--max-psi", type=click.FloatRange(0, min_open=True), default=0.25, show_default=True,
              help="Roll back when its scores drift this far from the baseline's (PSI).")  # fmt: skip
@config_option
@friendly
def canary(
    model_ref: str,
    percent: float,
    shadow: bool,
    min_requests: int,
    max_error_rate_delta: float,
    max_p99_ratio: float,
    max_psi: float,
    config_file: Path | None,
) -> None:
    """Start a canary: NAME@VERSION serves --percent of NAME's entities beside the
    deployed version (or scores a copy of them, --shadow). Running servers load it warm
    and roll it back on their own when it errs, slows down or shifts scores past the
    limits; `tenx models promote NAME` makes it the deployed version."""
    name, version = parse_model_ref(model_ref)
    if version is None:
        raise ConfigError(f"say which version: `tenx models canary {name}@N`")
    settings = settings_of(config_file)
    registry = model_registry(settings)
    # A version trained on other view versions than the applied plan's cannot be served:
    # as a canary it would never load (and never be judged), promoted it would take the model down.
    check_views(registry.card(name, version), FileRegistry(settings.registry_dir).current())
    limits = CanaryLimits(min_requests, max_error_rate_delta, max_p99_ratio, max_psi)
    started = registry.start_canary(name, version, percent=percent, shadow=shadow, by=_user(), limits=limits)
    deployed = registry.deployment(name)
    baseline = f"{name}@{deployed.version}" if deployed else name
    how = "scores a shadow copy of" if shadow else "serves"
    console.print(
        f"canary {name}@{started.version} {how} {percent:g}% of `{name}`'s entities beside {baseline}; running "
        f"servers pick it up within a second. Rolled back automatically after {min_requests} requests if it errs "
        f"(+{max_error_rate_delta:.1%}), slows (x{max_p99_ratio:g} p99) or drifts (PSI > {max_psi:g}); "
        f"`tenx models promote {name}` to keep it.",
        highlight=False,
    )


@models.command("promote")
@click.argument("name")
@config_option
@friendly
def promote(name: str, config_file: Path | None) -> None:
    """Make NAME's canary the deployed version (servers switch to its warm session)."""
    settings = settings_of(config_file)
    registry = model_registry(settings)
    running = registry.canary(name)
    if running is not None:  # the plan may have changed since it started: never deploy what cannot serve
        check_views(registry.card(name, running.version), FileRegistry(settings.registry_dir).current())
    deployment = registry.promote(name, by=_user())
    console.print(f"promoted {name}@{deployment.version} (was @{deployment.previous}); running servers switch to it")


@models.command("rollback")
@click.argument("name")
@click.option("--reason", default="rolled back by hand", show_default=True, help="Recorded in the canary history.")
@config_option
@friendly
def rollback(name: str, reason: str, config_file: Path | None) -> None:
    """End NAME's canary: the deployed version takes all the traffic again."""
    ended = model_registry(settings_of(config_file)).rollback(name, by=_user(), reason=reason)
    console.print(f"rolled back the canary {name}@{ended.version}; the deployed version serves everything")


@models.command("status")
@click.argument("name")
@click.option("--url", default=None, envvar="TENX_MODEL_SERVER_URL",
              help="A running model server to ask for the live comparison ($TENX_MODEL_SERVER_URL).")  # fmt: skip
@click.option("--token", envvar="TENX_API_TOKEN", default=None,
              help="Bearer token of the server at --url ($TENX_API_TOKEN).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@config_option
@friendly
def status(name: str, url: str | None, token: str | None, as_json: bool, config_file: Path | None) -> None:
    """NAME's deployed version, its canary (split, limits), the live comparison of the
    two sides from a running server (--url: requests, error rates, p99, PSI), and the
    canary history (starts, promotions, rollbacks with their reasons)."""
    registry = model_registry(settings_of(config_file))
    registry.resolve(name, None)
    deployment = registry.deployment(name)
    running = registry.canary(name)
    live = _live(url, name, token) if url else None
    history = registry.canary_history(name)
    if as_json:
        data = {
            "deployed": deployment.to_dict() if deployment else None,
            "canary": running.to_dict() if running else None,
            "live": live,
            "history": history,
        }
        click.echo(json.dumps(data, indent=2))
        return
    console.print(f"{name}: deployed @{deployment.version}" if deployment else f"{name}: not deployed", highlight=False)
    if running is None:
        console.print("no canary running", highlight=False)
    else:
        how = "shadow copy of" if running.shadow else "sticky"
        console.print(
            f"canary @{running.version}: {how} {running.percent:g}% of entities since {running.started_at} "
            f"(by {running.started_by}); limits {running.limits.__dict__}",
            highlight=False,
        )
    if live is not None and isinstance(live.get("comparison"), dict):
        numbers = live["comparison"]
        table = Table("side", "requests", "error rate", "p99 ms")
        for side in ("baseline", "canary"):
            row = numbers[side]
            p99 = row["p99_ms"]
            table.add_row(side, f"{row['requests']:,}", f"{row['error_rate']:.2%}", f"{p99:.2f}" if p99 else "-")
        console.print(table)
        ratio, drift = numbers.get("p99_ratio"), numbers.get("psi")
        console.print(
            f"p99 ratio {ratio:.2f}" if ratio else "p99 ratio -", f"PSI {drift:.3f}" if drift is not None else "PSI -",
            highlight=False,
        )  # fmt: skip
    for event in history[-10:]:
        what = event.get("event")
        reason = f": {event['reason']}" if event.get("reason") else ""
        when = event.get("at") or event.get("started_at", "")
        console.print(f"  {when} @{event.get('version')} {what}{reason}", highlight=False)


def _live(url: str, name: str, token: str | None) -> dict[str, Any] | None:
    import httpx

    try:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = httpx.get(f"{url.rstrip('/')}/models", timeout=5, headers=headers)
    except httpx.TransportError as error:
        raise TransientError(f"model server at {url} did not answer: {error}") from None
    if response.status_code == 401:
        raise ConfigError(f"model server at {url} wants a bearer token: pass --token or set $TENX_API_TOKEN")
    for model in response.json().get("models", []):
        if model.get("model") == name:
            canary = model.get("canary")
            return dict(canary) if isinstance(canary, dict) else None
    return None
