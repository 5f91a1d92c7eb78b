"""How DrSpot's flow tasks fail: every task has a timeout, and retries back off and are spent only on what a retry
can fix.

``flows.timeout_s`` gives each kind of task its limit (a data step, a training, the evaluation, registration with
the gate and the serving check, the deployment, the flywheel's own steps); a task past it fails with Prefect's
``TaskRunTimeoutError``, which is not retried (it would take as long again). A task that runs in the flow's main
thread is interrupted (SIGALRM), and a DVC stage it runs is stopped with its whole process group
(:func:`components.data.versioning.dvc`).

:func:`transient` decides what is worth a retry: a connection refused or reset, a name that did not resolve, a
server's 5xx, a lock held by another process (DVC's repository lock, SQLite's "database is locked"), a timeout of a
network call. Everything else fails at once: a data error, a bug, a missing file, a model that does not load, an
out-of-memory, the task's own timeout. Retries wait ``flows.retry_delay_s`` x 1, 2, 4, ... seconds with jitter.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

from components.data.manifest import DataError
from components.monitoring import alerts
from infra.config import Config, load_config

# words in an error's text that mark a condition that passes by itself
TRANSIENT_TEXT = (
    "unable to acquire lock",
    "is locked",
    "lock is held",
    "connection refused",
    "connection reset",
    "connection aborted",
    "temporary failure in name resolution",
    "name or service not known",
    "timed out",
    "service unavailable",
    "bad gateway",
    "gateway timeout",
    "too many requests",
    "remote end closed connection",
)


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth a retry (see the module's doc)."""
    from prefect.task_engine import TaskRunTimeoutError

    if isinstance(exc, DataError | TaskRunTimeoutError | MemoryError | KeyboardInterrupt):
        return False
    if isinstance(exc, ConnectionError | BlockingIOError | InterruptedError | TimeoutError):
        return True
    try:
        import httpx

        if isinstance(exc, httpx.TransportError):
            return True
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code in (429, 502, 503, 504)
    except ImportError:  # pragma: no cover
        pass
    # errors of libraries and tools that say in their text whether they are passing conditions
    if type(exc).__name__ in ("OperationalError", "RestException", "MlflowException", "DvcError", "CalledProcessError"):
        text = str(exc).lower()
        return any(t in text for t in TRANSIENT_TEXT) or re.search(r"\b(429|502|503|504)\b", text) is not None
    return False


def _retry_if_transient(task_, task_run, state) -> bool:
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - judged by transient()
        return transient(e)
    return False


def options(cfg: Config, kind: str) -> dict[str, Any]:
    """Prefect task options for a task of ``kind`` (a key of ``flows.timeout_s``)."""
    from prefect.tasks import exponential_backoff

    f = cfg.flows
    return {
        "timeout_seconds": getattr(f.timeout_s, kind),
        "retries": f.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=f.retry_delay_s),
        "retry_jitter_factor": 0.5,
        "retry_condition_fn": _retry_if_transient,
    }


def bound(task, cfg: Config, kind: str):
    """``task`` with the policy of ``kind`` (call the result as the task)."""
    return task.with_options(**options(cfg, kind))


# the defaults every task is declared with (the run's configuration replaces them through `bound`)
DECLARED: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [5, 10], "retry_condition_fn": _retry_if_transient}

KILL_AT = "DRSPOT_KILL_AT"


def checkpoint(step: str) -> None:
    """A named point of the retrain (a step starting). Fault injection for the resume test: with
    ``$DRSPOT_KILL_AT`` naming this step the process SIGKILLs itself here, as an OOM killer or a power cut would."""
    if os.environ.get(KILL_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def run_config(cfg: Config | None = None, profile: str | None = None, root: str | None = None) -> Config:
    """The configuration of a flow run, decided once at the flow's entry: the one it was handed (``cfg``: the CLI's
    or the calling flow's), else resolved from ``profile``; ``root`` moves its state home to another project
    folder. Everything below the entry is handed this object."""
    cfg = cfg or load_config(profile)
    return cfg.at(root) if root else cfg


def _failed_run_config(parameters: dict[str, Any]) -> Config:
    """The configuration the failed run was handed (its ``cfg`` parameter, at its ``root``), else its profile's."""
    cfg = parameters.get("cfg")
    if isinstance(cfg, dict):
        cfg = Config.model_validate(cfg)
    return run_config(cfg if isinstance(cfg, Config) else None, parameters.get("profile"), parameters.get("root"))


def flow_failed(flow, flow_run, state) -> None:
    """Prefect ``on_failure`` / ``on_crashed`` hook of every DrSpot flow; a subflow's failure is told once, by the
    outermost flow it failed."""
    if getattr(flow_run, "parent_task_run_id", None):
        return
    try:
        cfg = _failed_run_config(flow_run.parameters or {})
    except Exception:  # noqa: BLE001 - the configuration itself may be what failed: there is nowhere to record it
        return
    alerts.send(
        cfg,
        "flow_failed",
        f"flow {flow.name} run {flow_run.name} {state.type.value.lower()}: {str(state.message or '')[:300]}",
        {"flow": flow.name, "flow_run": flow_run.name, "flow_run_id": str(flow_run.id), "state": state.type.value},
        severity="error",
    )


HOOKS = {"on_failure": [flow_failed], "on_crashed": [flow_failed]}
