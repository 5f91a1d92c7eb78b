"""Merging concurrent requests into one model call, in the API process (``serving.batching``).

Each prediction route awaits :meth:`Batcher.submit` with its decoded pictures; one consumer task runs the model on
everything waiting (up to ``serving.max_batch_size``), in a worker thread, one batch at a time, and hands each
request its own results. An idle model starts at once (no timer: a lone request is not held back); under load the
requests that arrive while a batch runs form the next one. (Holding an idle model up to 20 ms for requests still
being decoded was measured and dropped: at concurrency 8 on 2 workers, 914 and 844 model calls for 1,700 photos
against 890 and 437 without, 96-101 photos/s against 69-96: the batches' sizes are set by how the connections fall
on the workers, not by the decode.) Requests that waited longer than ``serving.max_latency_ms`` are refused with a
503 and ``Retry-After`` instead of adding to the queue's delay; a request whose client has gone (its task cancelled)
is dropped before it reaches the model. Each batch's size goes to the ``drspot_model_batch_size`` histogram.

This replaced BentoML's batchable API as the model stage (measured in ``bench/serving.py``): that stage is another
HTTP hop inside the service, so each photo was base64-encoded, sent, decoded a second time and its answer
JSON-encoded twice; here the picture the upload checks decoded is the one the model sees.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    """The model queue held a request longer than ``serving.max_latency_ms``."""

    def __init__(self, waited_ms: float, budget_ms: int) -> None:
        super().__init__(f"waited {waited_ms:.0f} ms for the model; the budget is {budget_ms} ms")
        self.waited_ms, self.budget_ms = waited_ms, budget_ms


@dataclass
class _Job:
    kind: str
    item: Any
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Batches of one kind of work (``kinds``: name -> a function from a list of items to a list of results), run in
    one thread of their own (``name``: the model's, or the prediction log's group commit in serving/service.py);
    ``observe(kind, size)`` is called with each batch before it runs."""

    def __init__(
        self,
        kinds: dict[str, Callable[[list[Any]], list[Any]]],
        max_size: int,
        max_latency_ms: int,
        name: str = "model",
        thread: ThreadPoolExecutor | None = None,
        observe: Callable[[str, int], None] | None = None,
    ) -> None:
        self.kinds, self.max_size, self.max_latency_ms = kinds, max_size, max_latency_ms
        self.observe = observe  # told each batch's kind and size (the service's batch-size histogram)
        self.queue: deque[_Job] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        # one thread runs every batch: the model's own thread pools (PyTorch's OpenMP team, ONNX Runtime's) belong to
        # the thread that calls them, so one caller keeps one team instead of one per worker thread that happens to
        # pick the batch up
        # (``thread``: a one-thread executor the caller also runs other work of that kind on)
        self.thread = thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"drspot-{name}")

    async def submit(self, kind: str, items: list[Any]) -> list[Any]:
        """The results for ``items``, computed in batches with other requests' items of the same kind."""
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._run())
        jobs = [_Job(kind, item, loop.create_future()) for item in items]
        self.queue.extend(jobs)
        self.wake.set()
        try:
            return list(await asyncio.gather(*(j.future for j in jobs)))
        except BaseException:
            for j in jobs:  # a client that left, or a sibling refused: its other items are not computed either
                j.future.cancel()
            raise

    def _next(self) -> list[_Job]:
        """The oldest live job's kind, and up to ``max_size`` live jobs of it in arrival order; jobs waiting longer
        than the budget are answered :class:`Overloaded` on the way."""
        now, batch, kind, keep = time.perf_counter(), [], None, deque()
        while self.queue:
            job = self.queue.popleft()
            if job.future.done():  # cancelled: its client left
                continue
            waited = (now - job.queued) * 1000
            if waited > self.max_latency_ms:
                job.future.set_exception(Overloaded(waited, self.max_latency_ms))
                continue
            if kind is None:
                kind = job.kind
            if job.kind == kind and len(batch) < self.max_size:
                batch.append(job)
            else:
                keep.append(job)
        self.queue = keep
        return batch

    async def _run(self) -> None:
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
            batch = self._next()
            if not batch:
                continue
            fn = self.kinds[batch[0].kind]
            if self.observe is not None:
                self.observe(batch[0].kind, len(batch))
            try:
                items = [j.item for j in batch]
                results = await asyncio.get_running_loop().run_in_executor(self.thread, fn, items)
            except Exception as e:  # noqa: BLE001 - the batch's requests get the failure; the loop lives on
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            for j, r in zip(batch, results, strict=True):
                if not j.future.done():
                    j.future.set_result(r)
