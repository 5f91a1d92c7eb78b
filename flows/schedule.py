"""``drspot schedule``: one long-running process that serves the flows on their schedules and triggers.

Deployments (Prefect ``serve``; the runs execute in this process's subprocesses):

* ``monitor/hourly`` - the drift monitor, cron ``monitor.cron`` (default hourly);
* ``retrain/nightly`` - the retrain flow, cron ``retrain.cron`` (default 02:00), ``min_new=0``: it
  retrains even without new cases, and with the project's DVC pipeline unchanged data, params and
  code make it a no-op ("nothing trained");
* ``retrain/feedback-threshold`` - the retrain flow on the monitor's cron with
  ``min_new=retrain.min_new_cases``: it retrains once that many confirmed cases are waiting;
* ``retrain/on-drift`` - no schedule: a deployment trigger on the ``drspot.drift.detected`` and
  ``drspot.quality.degraded`` events the monitor emits (the event and its report passed in ``trigger``);
  it retrains when at least one new
  confirmed case is waiting, and otherwise says that drift alone gives it nothing new to learn from.

Schedules need a Prefect server running its scheduler service (the temporary server Prefect starts
for a lone flow run does not schedule): with ``PREFECT_API_URL`` set that server is used, otherwise
the local one is started here (``prefect server start``, same database as every other DrSpot run,
UI on http://127.0.0.1:4200) and stopped on exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from infra.config import Config

# the retrain run's `trigger` parameter: which event (drift or the quality rule) and its report
EVENT_TRIGGER = "{{ event.event }}: {{ event.payload.report }}"
ON_EVENTS = "on drspot.drift.detected / drspot.quality.degraded"


def specs(cfg: Config, profile: str | None) -> list[tuple[Any, str, str, dict[str, Any]]]:
    """The four deployments as (flow, entrypoint, name, options): what ``drspot schedule`` serves in its own process
    and what ``drspot schedule --pool`` registers on a Prefect server for workers."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    from components.monitoring.quality import QUALITY_EVENT
    from flows.monitor import DRIFT_EVENT, monitor_flow
    from flows.retrain import retrain_flow

    tz = cfg.retrain.timezone
    hourly, nightly = Cron(cfg.monitor.cron, timezone=tz), Cron(cfg.retrain.cron, timezone=tz)
    retrain = {"tags": ["drspot", "retrain"], "concurrency_limit": 1}
    monitor_entry, retrain_entry = "flows/monitor.py:monitor_flow", "flows/retrain.py:retrain_flow"
    return [
        (
            monitor_flow,
            monitor_entry,
            "hourly",
            {"schedules": [hourly], "parameters": {"profile": profile}, "tags": ["drspot", "monitor"]},
        ),
        (
            retrain_flow,
            retrain_entry,
            "nightly",
            {"schedules": [nightly], "parameters": {"trigger": "nightly schedule", "min_new": 0, "profile": profile}}
            | retrain,
        ),
        (
            retrain_flow,
            retrain_entry,
            "feedback-threshold",
            {
                "schedules": [hourly],
                "parameters": {
                    "trigger": "feedback threshold",
                    "min_new": cfg.retrain.min_new_cases,
                    "profile": profile,
                },
            }
            | retrain,
        ),
        (
            retrain_flow,
            retrain_entry,
            "on-drift",
            {
                "triggers": [
                    DeploymentEventTrigger(
                        name="drift or quality drop -> retrain",
                        expect={DRIFT_EVENT, QUALITY_EVENT},
                        parameters={"trigger": EVENT_TRIGGER, "min_new": 1, "profile": profile},
                    )
                ],
                "parameters": {"trigger": "drift", "min_new": 1, "profile": profile},
            }
            | retrain,
        ),
    ]


def deployments(cfg: Config, profile: str | None) -> list[Any]:
    """The four deployments ``drspot schedule`` serves."""
    return [f.to_deployment(name, **kw) for f, _, name, kw in specs(cfg, profile)]


def deploy_to_pool(cfg: Config, profile: str | None, pool: str) -> list[str]:
    """Register the four deployments on the Prefect server of ``PREFECT_API_URL`` for the workers of ``pool``
    (a ``process`` pool, created if missing); their code is this checkout (``from_source``: each worker host needs
    the project at the same path, with its venv). Returns "flow/deployment" names."""
    from infra.env import CODE
    from infra.stack import create_pool

    if not os.environ.get("PREFECT_API_URL"):
        raise RuntimeError("set PREFECT_API_URL to the Prefect server the workers poll (drspot stack up prints it)")
    create_pool(pool)
    names = []
    for f, entry, name, kw in specs(cfg, profile):
        remote = f.from_source(source=str(CODE), entrypoint=entry)
        remote.deploy(name, work_pool_name=pool, build=False, push=False, print_next_steps=False, **kw)
        names.append(f"{f.name}/{name}")
    return names


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_local_server(port: int, log: Path, timeout: float = 180) -> tuple[str, subprocess.Popen | None]:
    """``prefect server start`` on 127.0.0.1:``port`` over the project's Prefect home (reused if one already
    answers there); returns its API URL and the process (None when reused)."""
    url = f"http://127.0.0.1:{port}/api"
    if _healthy(url):
        return url, None
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(log, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if _healthy(url):
            return url, proc
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the Prefect server did not answer on {url} within {timeout:.0f} s (log: {log})")


def watchdog(cfg: Config, since, stop, every_s: float = 300) -> None:
    """The schedule's own checks, every ``every_s`` until ``stop`` is set: a ``nightly_missed`` alert once per
    nightly cron time that passed (plus ``alerts.nightly_grace_h``) without a nightly retrain starting, and
    challengers whose approval deadline passed are rejected (components/model/approval.py)."""
    from components.model import approval
    from components.monitoring import alerts

    told: set = set()
    while not stop.wait(every_s):
        try:
            due = alerts.nightly_missed(cfg, since)
            if due is not None and due not in told:
                told.add(due)
                alerts.send(
                    cfg,
                    "nightly_missed",
                    f"the nightly retrain due at {due.isoformat()} has not run "
                    f"({cfg.alerts.nightly_grace_h:g} h after its cron time {cfg.retrain.cron!r})",
                    {"due": due.isoformat(), "cron": cfg.retrain.cron, "last_nightly": str(alerts.last_nightly(cfg))},
                    severity="error",
                )
            approval.expire(cfg)
        except Exception as e:  # noqa: BLE001 - the watchdog reports and keeps watching
            print(f"drspot schedule: watchdog: {type(e).__name__}: {e}", flush=True)


def run_schedule(cfg: Config, profile: str | None, port: int = 4200) -> int:
    """Serve the deployments until interrupted (Ctrl-C / SIGTERM)."""
    import signal

    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, server = os.environ.get("PREFECT_API_URL"), None
    if not url:
        url, server = start_local_server(port, cfg.runtime.prefect_log)
        print(f"Prefect server: {url} (UI http://127.0.0.1:{port}; log {cfg.runtime.prefect_log})")
    else:
        print(f"Prefect server: {url} (PREFECT_API_URL)")
    os.environ["PREFECT_API_URL"] = url  # the flow-run subprocesses report to the same server

    def _stop(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    import datetime as dt
    import threading

    stop = threading.Event()
    threading.Thread(
        target=watchdog, args=(cfg, dt.datetime.now(dt.UTC), stop), name="drspot-watchdog", daemon=True
    ).start()
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            deps = deployments(cfg, profile)
            for d in deps:
                when = ", ".join(str(s.schedule.cron) for s in d.schedules or []) or ON_EVENTS
                print(f"  {d.flow_name}/{d.name}: {when}  ({d.parameters})", flush=True)
            serve(*deps, print_starting_message=False)  # returns on SIGINT/SIGTERM, deployments paused
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        print("drspot schedule: stopped (deployments paused)", flush=True)
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    return 0
