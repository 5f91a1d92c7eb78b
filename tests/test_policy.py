"""Flow tasks: a timeout stops a task (and is not retried), retries are spent only on what a retry can fix."""

from __future__ import annotations

import time

import pytest
from prefect import flow, task

from components.data.manifest import DataError
from flows.policy import bound, transient
from infra.config import load_config


def test_what_is_worth_a_retry():
    import httpx
    from prefect.task_engine import TaskRunTimeoutError

    from components.data.versioning import DvcError

    worth = [
        ConnectionRefusedError("connection refused"),
        TimeoutError("read timed out"),
        httpx.ConnectError("refused"),
        DvcError("`dvc repro` failed: ERROR: Unable to acquire lock. Most likely another DVC process is running"),
        DvcError("`dvc push` failed: ERROR: 503 Service Unavailable"),
    ]
    not_worth = [
        DataError("3 rows have labels outside the classes"),
        TaskRunTimeoutError("Scope timed out after 5 second(s)."),
        ValueError("bad parameter"),
        FileNotFoundError("models/classifier/model.pt"),
        RuntimeError("CUDA out of memory"),
        MemoryError(),
        DvcError("`dvc repro` failed: drspot train-classifier: error: unknown backbone 'resnet99'"),
    ]
    assert all(transient(e) for e in worth), [e for e in worth if not transient(e)]
    assert not any(transient(e) for e in not_worth), [e for e in not_worth if transient(e)]


def _cfg(timeout: float = 60, retries: int = 2):
    cfg = load_config("test")
    f = cfg.flows
    flows = f.model_copy(
        update={"timeout_s": f.timeout_s.model_copy(update={"data": timeout}), "retries": retries, "retry_delay_s": 0}
    )
    return cfg.model_copy(update={"flows": flows})


def test_a_task_past_its_timeout_fails_and_is_not_retried():
    calls = []

    @task
    def hangs():
        calls.append(1)
        time.sleep(30)

    @flow
    def f():
        bound(hangs, _cfg(timeout=1), "data")()

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 1"):
        f()
    assert time.monotonic() - t0 < 15 and calls == [1]


def test_a_passing_failure_is_retried_and_a_bug_is_not():
    calls = {"flaky": 0, "bug": 0}

    @task
    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    @task
    def bug():
        calls["bug"] += 1
        raise KeyError("label")

    @flow
    def f():
        return bound(flaky, _cfg(), "data")()

    @flow
    def g():
        bound(bug, _cfg(), "data")()

    assert f() == "done" and calls["flaky"] == 2
    with pytest.raises(KeyError):
        g()
    assert calls["bug"] == 1
