"""One component stopped mid-step and restarted: what each class saw before, during and
after, and how long it took to recover.

A fault is `COMPONENT@AT` (`redis@15s`): AT seconds into the fault step's window the
stop command runs, `down_s` later the start command. The commands are the project's own
(`scripts/services down|up --only redis|kafka`: Redis saves its data first, as a Redis
with persistence would keep it over a restart) or any given with --fault-stop and
--fault-start (`docker compose stop redis`, `kill -STOP ...`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from featurestore.errors import ConfigError

COMPONENTS = ("redis", "kafka", "model")
COMMAND_TIMEOUT_S = 120.0
_SPEC = re.compile(r"^(?P<component>[a-z][a-z0-9_-]*)@(?P<at>\d+(?:\.\d+)?)s?$")


@dataclass
class Fault:
    component: str
    at_s: float
    down_s: float
    stop: str  # shell commands
    start: str
    stopped_at_s: float | None = None  # from the window's start, once it happened
    restarted_at_s: float | None = None
    log: list[str] = field(default_factory=list)
    redis_password: str | None = field(default=None, repr=False)  # for redis-cli, via $REDISCLI_AUTH only


def parse_fault(spec: str) -> tuple[str, float]:
    """`redis@15s` -> ("redis", 15.0)."""
    found = _SPEC.match(spec.strip().lower())
    if found is None:
        raise ConfigError(
            f"--fault {spec!r}: write COMPONENT@SECONDS, e.g. redis@15s (components: {', '.join(COMPONENTS)})"
        )
    return found["component"], float(found["at"])


def services_script() -> Path | None:
    """scripts/services of the working directory's checkout, or of tenx's own."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        script = root / "scripts" / "services"
        if script.is_file():
            return script
    return None


def default_commands(component: str, *, redis_url: str | None, fault_file: Path | None, model: str) -> tuple[str, str]:
    """The stop and start commands of a known component."""
    if component == "model":
        if fault_file is None:
            raise ConfigError(
                "--fault model@... needs the model server's fault file: start it with `tenx serve-models "
                "--fault-file PATH` and pass the same --fault-file here (or give --fault-stop and --fault-start)"
            )
        path = shlex.quote(str(fault_file))
        return f"echo {shlex.quote(model)} > {path}", f"rm -f {path}"
    script = services_script() if component in ("redis", "kafka") else None
    if script is None:
        raise ConfigError(
            f"--fault {component}@...: no scripts/services here to stop it with; give --fault-stop and --fault-start "
            f"(e.g. --fault-stop 'docker compose stop {component}' --fault-start 'docker compose start {component}')"
        )
    services = shlex.quote(str(script))
    stop = f"{services} down --only {component}"
    if component == "redis" and redis_url:
        # Keep the data over the restart, as a Redis with persistence would.
        stop = f"{_redis_save(redis_url)} && {stop}"
    return stop, f"{services} up --only {component} >/dev/null"


def redis_password(url: str | None) -> str | None:
    password = urlsplit(url).password if url else None
    return unquote(password) if password else None


def _redis_save(url: str) -> str:
    # The URL without its password: the command is printed, kept in report.json and
    # shown by `ps`. redis-cli takes the password from $REDISCLI_AUTH, which `_run` sets.
    return f"redis-cli -u {shlex.quote(_without_password(url))} SAVE >/dev/null"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}@{host}" if user else host, parts.path, parts.query, parts.fragment))


def _run(command: str, fault: Fault, what: str) -> None:
    # The user's own stop/start commands, run as given (pipes, &&): a shell is the point.
    env = dict(os.environ)
    if fault.redis_password:
        env["REDISCLI_AUTH"] = fault.redis_password  # for `_redis_save`'s redis-cli, out of every command line
    done = subprocess.run(  # noqa: S602
        command, shell=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False, env=env
    )
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
    fault.log.append(f"{what}: `{command}` exit {done.returncode} {tail[0]}".rstrip())
    if done.returncode != 0:
        raise RuntimeError(f"{what} of {fault.component} failed (exit {done.returncode}): {tail[0]}")


@contextlib.contextmanager
def injected(fault: Fault, *, window_starts_in_s: float) -> Iterator[Fault]:
    """Run the fault on a thread while the caller runs the step: the stop command
    `window_starts_in_s + at_s` from now, the start command `down_s` after it finished.
    Times are recorded from the window's start; the start command always runs, even when
    the step fails, so a component is never left down."""
    origin = time.monotonic() + window_starts_in_s
    stop_event = threading.Event()
    errors: list[BaseException] = []

    def play() -> None:
        stopped = False
        try:
            if stop_event.wait(max(0.0, origin + fault.at_s - time.monotonic())):
                return
            fault.stopped_at_s = time.monotonic() - origin
            stopped = True
            _run(fault.stop, fault, "stop")
            stop_event.wait(max(0.0, origin + fault.stopped_at_s + fault.down_s - time.monotonic()))
        except BaseException as error:  # noqa: BLE001  (reported to the caller below)
            errors.append(error)
        finally:
            if stopped:
                fault.restarted_at_s = time.monotonic() - origin
                try:
                    _run(fault.start, fault, "start")
                except BaseException as error:  # noqa: BLE001
                    errors.append(error)

    thread = threading.Thread(target=play, name="tenx-fault", daemon=True)
    thread.start()
    try:
        yield fault
    finally:
        stop_event.set()  # the step ended: restart now if still down
        thread.join(timeout=COMMAND_TIMEOUT_S * 2)
    if errors:
        raise RuntimeError(f"the {fault.component} fault: {errors[0]}")


def align(fault: Fault, started_epoch_s: float, scheduled_epoch_s: float) -> None:
    """Shift the recorded times by how far the generator's real window start differed
    from the one the fault was scheduled against."""
    shift = scheduled_epoch_s - started_epoch_s
    if fault.stopped_at_s is not None:
        fault.stopped_at_s += shift
    if fault.restarted_at_s is not None:
        fault.restarted_at_s += shift


def summarize(fault: Fault, timeline: Mapping[str, Any], *, step: str) -> dict[str, Any]:
    """Per class, the success share, degraded share of 2xx answers and p99 before the
    stop, while down and after the restart, and the recovery time: from the restart to
    the start of the first bucket from which every later bucket is healthy (success at
    least 99% of its level before, degraded share at most 1 point above it). None: it
    did not recover within the step."""
    times = timeline["t_s"]
    bucket = timeline["bucket_s"]
    stopped = fault.stopped_at_s if fault.stopped_at_s is not None else math.inf
    restarted = fault.restarted_at_s if fault.restarted_at_s is not None else math.inf
    phases = {
        "before": [i for i, t in enumerate(times) if t + bucket <= stopped],
        "during": [i for i, t in enumerate(times) if t + bucket > stopped and t < restarted],
        "after": [i for i, t in enumerate(times) if t >= restarted],
    }
    summary: dict[str, Any] = {}
    for label, line in timeline["classes"].items():
        figures = {phase: _phase(line, picks) for phase, picks in phases.items()}
        summary[label] = {
            **figures,
            "recovery_s": _recovery(line, phases["after"], figures["before"], times, restarted),
        }
    return {
        "component": fault.component,
        "at_s": fault.at_s,
        "down_s": fault.down_s,
        "step": step,
        "bucket_s": bucket,
        "stopped_at_s": fault.stopped_at_s,
        "restarted_at_s": fault.restarted_at_s,
        "commands": fault.log,
        "timeline": timeline,
        "summary": summary,
    }


def _phase(line: Mapping[str, Sequence[Any]], picks: Sequence[int]) -> dict[str, float | None]:
    sent = sum(line["sent"][i] - line["throttled"][i] for i in picks)
    ok = sum(line["ok"][i] for i in picks)
    p99s = [line["p99_ms"][i] for i in picks if line["p99_ms"][i] is not None]
    return {
        "success": ok / sent if sent else None,
        "degraded": sum(line["degraded"][i] for i in picks) / ok if ok else None,
        "errors": sum(line["errors"][i] for i in picks) / sent if sent else None,
        "p99_ms": max(p99s) if p99s else None,  # the worst bucket's p99
    }


def _healthy(line: Mapping[str, Sequence[Any]], i: int, before: Mapping[str, float | None]) -> bool:
    sent = line["sent"][i] - line["throttled"][i]
    if not sent:
        return True
    success = line["ok"][i] / sent
    degraded = line["degraded"][i] / line["ok"][i] if line["ok"][i] else 1.0
    return success >= 0.99 * (before["success"] or 0.0) and degraded <= (before["degraded"] or 0.0) + 0.01


def _recovery(
    line: Mapping[str, Sequence[Any]],
    after: Sequence[int],
    before: Mapping[str, float | None],
    times: Sequence[float],
    restarted: float,
) -> float | None:
    if not after or before["success"] is None:
        return None
    recovered: int | None = None
    for i in reversed(after):
        if not _healthy(line, i, before):
            break
        recovered = i
    return None if recovered is None else max(0.0, times[recovered] - restarted)
