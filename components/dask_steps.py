"""The Dask half of :func:`components.compute.map_chunks`: a Prefect flow whose tasks run on a Dask cluster through
prefect-dask's ``DaskTaskRunner`` (imported only when a cluster is configured)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from prefect import flow, task

from components.compute import ComputeError, Target, run_chunk
from components.config import Config


@contextmanager
def _prefect_api():
    """A Prefect API for the tasks on the Dask workers. Without one in force (no ``PREFECT_API_URL``), every worker
    process would start its own temporary server on a SQLite file (STACK.md: 4x slower, 'database is locked'); the
    settings of the submitting process travel with each task, so pointing them at this process's temporary server
    makes the workers report there."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same temporary server this process's flows use (one per process)
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


# the chunks of the runs in progress, by run key: the flow below reads them from here, so that neither its
# parameters (recorded by the Prefect server, which refuses more than 512 kB) nor the flow object (serialized into
# the context that travels with every task: a closure over the chunks put all of them into each task, 13 GB in
# the scheduler at 10^5 images) carry them; each chunk reaches its worker as that task's input only
_PARTS: dict[str, list[list[Any]]] = {}


@flow(name="data-steps-on-dask", log_prints=False)
def _mapped(key: str, fn_name: str) -> list[list[Any]]:
    fn = _FNS[key]
    chunk_task = task(run_chunk, name=f"{fn_name}-chunk", retries=0)
    futures = [chunk_task.submit(fn, part) for part in _PARTS[key]]
    return [f.result() for f in futures]


_FNS: dict[str, Callable[[Any], Any]] = {}


def on_dask(fn: Callable[[Any], Any], parts: list[list[Any]], t: Target, cfg: Config, workers: int) -> list[Any]:
    from prefect_dask import DaskTaskRunner

    timeout = cfg.compute.connect_timeout_s
    client_kwargs = {"timeout": f"{timeout}s"}
    if t.kind == "dask":
        runner = DaskTaskRunner(address=t.address, client_kwargs=client_kwargs)
    else:
        n = cfg.compute.local_workers or workers or os.cpu_count() or 1
        runner = DaskTaskRunner(
            cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "dashboard_address": ":0", "processes": True},
            client_kwargs=client_kwargs,
        )
    key = uuid.uuid4().hex
    _PARTS[key], _FNS[key] = parts, fn
    try:
        with _prefect_api():
            results = _mapped.with_options(task_runner=runner)(key, fn.__name__)
    except ComputeError:
        raise
    except OSError as e:  # the scheduler went away or refused the connection
        raise ComputeError(f"{t.describe()} failed: {e}") from e
    finally:
        _PARTS.pop(key, None)
        _FNS.pop(key, None)
    return [r for part in results for r in part]
