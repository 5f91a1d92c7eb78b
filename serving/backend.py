"""``python serving/backend.py METRICS_DIR serve BENTO ...``: ``bentoml serve`` with its own Prometheus directory.

BentoML keeps its worker processes' metrics in ``$BENTOML_HOME/prometheus_multiproc_dir`` and empties that folder
whenever a service starts. Two services on one state home (the live service and a candidate under its serving
check, or a second ``drspot serve``) would wipe each other's counters: the live ``/metrics`` lost every count the
moment the other one started. Each backend DrSpot starts gets a folder of its own instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def command(target: str, host: str, port: int, metrics: Path) -> list[str]:
    """``bentoml serve target`` on host:port, through this file, with ``metrics`` as its Prometheus folder.

    Run by its path, not as ``-m serving.backend``: importing the ``serving`` package in the process that loads the
    Bento made the Bento's own ``serving`` resolve to this installation's copy beside the Bento's ``components``
    (seen: a Bento of another commit failed to load with a mixed import)."""
    script = str(Path(__file__).resolve())
    return [sys.executable, script, str(metrics), "serve", target, "--host", host, "--port", str(port)]


def main() -> None:
    metrics_dir, args = sys.argv[1], sys.argv[2:]
    # every thread that calls PyTorch starts an OpenMP team of OMP_NUM_THREADS (default: one per core) whose threads
    # spin while idle; only the model thread should run one, and it sets its own count per call (serving.threads,
    # serving/threads.py). Its default for the API workers this spawns, one: request threads, the log writer and
    # ultralytics' tensor steps get no team. Measured (bench, 2 cores, 2 workers on ONNX Runtime, concurrency 8): 55
    # -> 100 photos/s, the server's CPU per answer 35 -> 19.6 ms; the benchmark had run with it set all along, as
    # importing ultralytics in its own process sets it, and `drspot serve` from a shell did not.
    os.environ["OMP_NUM_THREADS"] = "1"
    from bentoml._internal.configuration.containers import BentoMLContainer

    BentoMLContainer.prometheus_multiproc_dir.set(metrics_dir)
    from bentoml_cli.cli import cli

    sys.argv = ["bentoml", *args]
    cli()


if __name__ == "__main__":
    # run as a script, Python put this folder first on the path: its modules (app, store, ...) would shadow others
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    main()
