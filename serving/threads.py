"""How many threads the served models run on, and on which thread PyTorch may start a team of them.

PyTorch's CPU kernels run on OpenMP, and OpenMP keeps one team of threads per thread that calls it. Once two threads
of a process have each run a parallel region on more than one thread, both teams' work is slower: measured on two
cores, a ResNet-18 at 64 px 4.9 ms a photo from one thread, 9.7-10.2 ms from either thread once the other had run
too (for good: the first thread stayed slow); the served pipeline on eager PyTorch 6.0 + 9.0 ms (detector +
classifier) from the thread that built it, 16 + 20 ms from the service's model thread. So the thread that builds a
pipeline loads the models on one thread (no team: :func:`one_thread`), and each model call gives the thread that
makes it the configured count (``Pipeline.use_threads``): in the service only the model thread ever starts a team.
ONNX Runtime's sessions keep their own pools and are not concerned.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def model_threads(s) -> int:
    """Intra-op threads of one API worker's models: ``serving.threads``, or the machine's cores shared among
    ``serving.workers``."""
    return s.threads or max(1, (os.cpu_count() or 1) // s.workers)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch work of the calling thread on one thread (no OpenMP team of its own), its count restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
