"""Where the data steps' per-image work runs: local processes (the default) or a Dask cluster.

The per-image work of the data gate (decode checks, quality features, perceptual hashes), of the
near-duplicate verification and of the monitoring reference goes through :func:`map_chunks`, which
decides once where it runs:

* ``DRSPOT_DASK_ADDRESS`` (or ``compute.dask_address`` in params) names a running Dask scheduler
  (``tcp://host:8786``): one Prefect flow run on prefect-dask's ``DaskTaskRunner`` sends the work to the
  cluster, one Dask task per chunk of ``compute.chunk_size`` images (``infra/dask_steps.py``), so the
  scheduler holds ``n / chunk_size`` tasks, never one per image. ``local`` starts a ``LocalCluster`` for the run.
* otherwise a pool of local processes (``validate.workers``), as before.

Results come back in the order of the jobs, so the outputs are byte-identical wherever they were
computed. A scheduler that does not answer within ``compute.connect_timeout_s`` is a
:class:`ComputeError` naming the setting it came from, before anything is written.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from infra.config import Config
from infra.jobs import ComputeError, Target, _heap_for_images, chunks, run_chunk  # noqa: F401  (the API)

ADDRESS_ENV = "DRSPOT_DASK_ADDRESS"
LOCAL_CLUSTER = "local"


def target(cfg: Config) -> Target:
    """The run's compute target: ``DRSPOT_DASK_ADDRESS``, else ``compute.dask_address``, else local processes."""
    env = os.environ.get(ADDRESS_ENV, "").strip()
    if env:
        address, setting = env, f"{ADDRESS_ENV}={env}"
    elif cfg.compute.dask_address:
        address, setting = cfg.compute.dask_address, f"compute.dask_address={cfg.compute.dask_address} in params"
    else:
        return Target("processes")
    if address == LOCAL_CLUSTER:
        return Target("local_cluster", None, setting)
    if "://" not in address:
        address = f"tcp://{address}"
    return Target("dask", address, setting)


def check_reachable(t: Target, timeout_s: float) -> None:
    """Fail fast, naming the setting, when a scheduler's port does not accept a connection within ``timeout_s``."""
    if t.kind != "dask":
        return
    parsed = urlparse(t.address)
    if not parsed.hostname or not parsed.port:
        raise ComputeError(f"{t.setting}: not a Dask scheduler address (expected tcp://HOST:PORT)")
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            left = max(0.1, deadline - time.monotonic())
            with socket.create_connection((parsed.hostname, parsed.port), timeout=left):
                return
        except OSError as e:  # refused (nothing listens) or no route: retry until the deadline
            last = e
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise ComputeError(
        f"the Dask scheduler of {t.setting} did not answer within {timeout_s:g} s ({last}); "
        f"start it (dask scheduler), correct the address, or unset {ADDRESS_ENV} to use local processes"
    )


def _pool_process() -> None:
    """Each process of the local pool: one BLAS/OpenMP thread (the pool already has one process per core, and
    per-image arrays are too small for threads to pay; Dask's nanny sets the same for its workers), and
    :func:`_heap_for_images`."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    _heap_for_images()


def _processes(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, min_jobs: int) -> list[Any]:
    if workers <= 1 or len(jobs) < min_jobs:
        return [fn(j) for j in jobs]
    # spawn, not fork: the caller may be a threaded Prefect worker
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_pool_process) as pool:
        return list(pool.map(fn, jobs, chunksize=max(8, len(jobs) // (workers * 8))))


def map_chunks(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    cfg: Config,
    workers: int | None = None,
    min_jobs: int = 64,
    chunk_size: int | None = None,
) -> list[Any]:
    """``[fn(job) for job in jobs]``, in order, on the run's compute target (:func:`target`).

    ``fn`` must be a module-level function (it is pickled to other processes). ``workers`` sizes the local process
    pool (``validate.workers``, 0 = one per core); fewer than ``min_jobs`` jobs run in this process. On Dask, each
    task runs at most ``chunk_size`` jobs (default ``compute.chunk_size``, sized for images; cheaper jobs pass a
    larger one), and fewer when that would leave a worker thread without two chunks.
    """
    if not jobs:
        return []
    workers = workers if workers is not None else (cfg.validate_.workers or os.cpu_count() or 1)
    t = target(cfg)
    if t.kind == "processes":
        return _processes(fn, jobs, workers, min_jobs)
    check_reachable(t, cfg.compute.connect_timeout_s)
    from infra.dask_steps import on_dask

    return on_dask(fn, jobs, chunk_size or cfg.compute.chunk_size, t, cfg, workers)


class ExternalCluster:
    """A Dask cluster as a user runs one: a ``dask scheduler`` process and a ``dask worker`` process with ``workers``
    single-threaded worker processes, on loopback, each its own process group, stopped by process id on exit.
    What the tests and ``bench/scale.py`` run; ``address`` is what ``DRSPOT_DASK_ADDRESS`` takes."""

    def __init__(self, workers: int, logs: Path, timeout_s: float = 120) -> None:
        self.workers, self.logs, self.timeout_s = workers, Path(logs), timeout_s
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    def __enter__(self) -> ExternalCluster:
        from distributed import Client

        from infra.net import free_port

        dask = str(Path(sys.executable).parent / "dask")
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.logs.mkdir(parents=True, exist_ok=True)
        kw: dict[str, Any] = {"start_new_session": True, "stderr": subprocess.STDOUT}
        try:
            sched = [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"]
            self.procs.append(subprocess.Popen(sched, stdout=open(self.logs / "scheduler.log", "w"), **kw))
            check_reachable(Target("dask", self.address, "the test cluster"), 30)
            work = [dask, "worker", self.address, "--nworkers", str(self.workers), "--nthreads", "1"]
            work += ["--host", "127.0.0.1", "--dashboard-address", ":0"]
            self.procs.append(subprocess.Popen(work, stdout=open(self.logs / "workers.log", "w"), **kw))
            with Client(self.address, timeout="30s") as client:
                client.wait_for_workers(self.workers, timeout=self.timeout_s)
        except BaseException:
            self.__exit__()
            raise
        return self

    @property
    def pids(self) -> dict[str, int]:
        return {"scheduler": self.procs[0].pid, "workers": self.procs[1].pid}

    def __exit__(self, *exc: Any) -> None:
        for p in reversed(self.procs):  # the worker's nanny and its children are one process group
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
