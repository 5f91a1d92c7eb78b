"""The Dask half of :func:`infra.compute.map_chunks`: one Prefect flow run on prefect-dask's ``DaskTaskRunner``
that sends the chunks to the cluster as Dask tasks (imported only when a cluster is configured)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

from prefect import flow

from infra.config import Config
from infra.jobs import ComputeError, Target, chunks, run_chunk

# (function, jobs, chunk size) of the runs in progress, by run key: the flow below reads them from here, so that
# neither its parameters (recorded by the Prefect server, which refuses more than 512 kB) nor the flow object
# (serialized into the context Prefect sends with each task) carry them
_RUNS: dict[str, tuple[Callable[[Any], Any], Sequence[Any], int]] = {}


@flow(name="data-steps-on-dask", log_prints=False)
def _mapped(key: str, fn_name: str) -> list[list[Any]]:  # fn_name: what the run shows in Prefect
    """One flow run on the DaskTaskRunner's cluster; the chunks go to the workers as plain Dask tasks through the
    runner's own client (connected when first used). Not one Prefect task per chunk: prefect-dask serializes the
    flow run's context into every task it submits, which cost 0.2 s and ~2.5 MB of scheduler memory per task
    (200 trivial chunks: 42 s, scheduler 503 MB, workers 500 MB each; as plain Dask tasks: 3.3 s, 89 MB, 99 MB),
    and grew the scheduler to 8 GB gating 10^5 photos."""
    from distributed import as_completed
    from prefect.context import FlowRunContext

    fn, jobs, size = _RUNS[key]
    client = FlowRunContext.get().task_runner.client
    threads = max(1, sum(client.nthreads().values()))
    # chunks of at most `size` jobs (cheap jobs pass a larger size: fewer tasks, less overhead per job), but at least
    # two per worker thread so that a small input still uses every worker
    parts = chunks(jobs, max(1, min(size, -(-len(jobs) // (2 * threads)))))
    # a bounded window of chunks in flight, not all of them at once: each submitted chunk's jobs and each finished
    # chunk's result are held on the cluster until gathered, so its memory would grow with the data set
    window = max(4, 2 * threads)
    results: list[list[Any] | None] = [None] * len(parts)
    pending = iter(enumerate(parts))
    index: dict[str, int] = {}  # a future's key -> its chunk's place

    def submit(i: int, part: list[Any]):
        # the chunk's jobs go to a worker directly (scatter), not inside the task the scheduler deserializes
        [data] = client.scatter([part], hash=False)
        fut = client.submit(run_chunk, fn, data, pure=False, key=f"run_chunk-{key}-{i}")
        index[fut.key] = i
        return fut

    running = as_completed([submit(i, part) for i, part in islice(pending, window)], loop=client.loop)
    for fut in running:
        results[index.pop(fut.key)] = fut.result()
        fut.release()
        nxt = next(pending, None)
        if nxt is not None:
            running.add(submit(*nxt))
    return results  # type: ignore[return-value]


def on_dask(
    fn: Callable[[Any], Any], jobs: Sequence[Any], size: int, t: Target, cfg: Config, workers: int
) -> list[Any]:
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
    _RUNS[key] = (fn, jobs, size)
    try:
        results = _mapped.with_options(task_runner=runner)(key, fn.__name__)
    except OSError as e:  # the scheduler went away or refused the connection
        raise ComputeError(f"{t.describe()} failed: {e}") from e
    finally:
        _RUNS.pop(key, None)
    return [r for part in results for r in part]
