"""What a chunk of per-image jobs is and how one chunk runs, in a local pool process or on a Dask worker: the part
of :mod:`infra.compute` that both of its backends (the local pool and :mod:`infra.dask_steps`) share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class ComputeError(ConnectionError):
    """The configured cluster cannot be used (not answering, refused, lost): a connection problem, so the flows'
    retry policy (flows/policy.py) tries the step again."""


@dataclass(frozen=True)
class Target:
    """Where :func:`map_chunks` runs: ``kind`` is ``processes``, ``dask`` or ``local_cluster``; ``setting`` names
    where an address came from (for error messages)."""

    kind: str
    address: str | None = None
    setting: str | None = None

    def describe(self) -> str:
        if self.kind == "dask":
            return f"the Dask cluster at {self.address} ({self.setting})"
        if self.kind == "local_cluster":
            return f"a Dask LocalCluster ({self.setting})"
        return "local processes"


def chunks(jobs: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]


_MALLOC_TUNED = False


def _heap_for_images() -> None:
    """Keep image-sized arrays on the heap in a process doing per-image work. glibc serves an allocation above its
    mmap threshold with a fresh ``mmap`` whose pages are faulted in again each time; the threshold adapts upwards
    by itself, unless ``MALLOC_TRIM_THRESHOLD_`` is set, which Dask's nanny does for every worker (to give memory
    back to the OS). Measured on 300 photos of 600x450: a nanny's worker 6.8 s, a plain process 4.0 s, either with
    a 32 MB mmap threshold and a 64 MB trim threshold 2.5 s. Set once per process; results are unchanged."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        libc.mallopt(m_trim_threshold, 64 * 2**20)
    except (OSError, AttributeError):  # not glibc
        pass


def run_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    """One chunk's work, in whichever process or Dask worker runs it."""
    _heap_for_images()
    return [fn(job) for job in chunk]
