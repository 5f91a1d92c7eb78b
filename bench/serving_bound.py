"""How close HTTP can come to the raw model on this machine: the bound the endpoint's own work puts on it.

Run:  .venv/bin/drspot deploy && .venv/bin/python bench/serving_bound.py [--workers 2] [--out serving_bound]

``bench/serving.py`` compares the endpoint at concurrency 8 with the raw pipeline batched at the service's batch size
(one process, the machine's cores). This benchmark asks what the best endpoint could reach, in one run, on ONNX
Runtime (the faster runtime on both champions):

* raw batched: the reference of bench/serving.py (one process, ``serving.max_batch_size`` photos a call);
* model ceiling: ``--workers`` processes at once, each on its share of the cores, each running the raw pipeline on
  ``concurrency / workers`` photos a call (the batches the API workers form at concurrency 8): the most the models
  give as the service runs them, with no HTTP at all;
* the stack's floor: ``drspot serve`` with those workers, POST /predict of a body that is not a photo (refused 415
  after the front, BentoML's ASGI stack, the body read and the multipart parse, before any decoding or model): the
  server's CPU per request (psutil over the process tree) is work every answer does too;
* the quality features every answer computes for monitoring (``components.data.images.quality``), CPU per photo;
* the prediction log's row every answer writes, in process: rows built from the pipeline's real results and written
  in groups of ``concurrency / workers`` (the service's group commit) to an SQLite log as the benchmark's server has,
  with the answer's JSON encoded: CPU per answer;
* the bound: the model ceiling with the floor's, the quality features' and the log row's CPU added to each photo
  (``cores / (cores / ceiling + floor + quality + log)``); still without the threads' hand-offs, and with every model
  call a full batch, so no endpoint can reach it;
* the endpoint itself: photos at concurrency 8, its rate and its CPU per answer.

Writes bench/results/<out>.json (keys ``raw_batched_rps``, ``model_ceiling_rps``, ``floor_cpu_ms``, ``quality_cpu_ms``,
``log_cpu_ms``, ``bound_vs_raw_batched``, ``required_share_of_bound`` (0.8 over the bound's ratio),
``endpoint_vs_raw_batched``, ``endpoint_cpu_ms``, ``connections_per_worker``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import deployed_pipeline, images, serve  # noqa: E402
from infra.config import load_config  # noqa: E402

CONCURRENCY = 8
PHOTOS = 960
REPEATS = 2  # each raw figure is the best of this many runs, the two kinds taken in turns


def raw_worker(batch: int, threads: int) -> None:
    """One process of the raw pipeline on ONNX Runtime: ``threads`` intra-op threads, ``batch`` photos a call; says
    ``ready`` once loaded, waits for a line on stdin (so that several processes start together), warms up again,
    then prints photos/s."""
    from components.data.images import decode

    p = deployed_pipeline("onnx", threads)
    imgs, side = images(48), p.cfg.serving.work_side

    def call(start: int) -> None:
        p.analyse_many([decode(imgs[k % len(imgs)], max_side=side).rgb for k in range(start, start + batch)])

    call(0)
    print("ready", flush=True)
    sys.stdin.readline()
    for s in range(0, 4 * batch, batch):  # warm again: an idle wait leaves the first calls after it slow
        call(s)
    t0 = time.perf_counter()
    for s in range(0, PHOTOS, batch):
        call(s)
    print(json.dumps({"rps": PHOTOS / (time.perf_counter() - t0)}), flush=True)


def raw(processes: int, batch: int, threads: int) -> float:
    """Photos/s of ``processes`` raw pipelines running at once, summed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the API workers run (serving/backend.py)
    cmd = [sys.executable, __file__, "--raw-worker", str(batch), str(threads)]
    procs = [
        subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    for p in procs:
        while p.stdout.readline().strip() != "ready":
            if p.poll() is not None:
                raise RuntimeError(f"a raw pipeline process exited with {p.returncode} before it was ready")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate()[0] for p in procs]
    return sum(json.loads(o.strip().splitlines()[-1])["rps"] for o in outs)


def cpu_of(pid: int) -> float:
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def connections_per_worker(pid: int) -> list[int]:
    """Open TCP connections of each API worker process under ``pid`` (the front's keep-alive connections to it)."""
    import psutil

    counts = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker" in " ".join(p.cmdline()):
                counts.append(sum(c.status == psutil.CONN_ESTABLISHED for c in p.net_connections(kind="tcp")))
        except psutil.Error:
            pass
    return sorted(counts, reverse=True)


def quality_cpu_ms() -> float:
    """CPU per photo of the quality features the service computes on each decoded upload (serving/inputs.py)."""
    from components.data.images import decode, quality

    side = load_config().serving.work_side
    pictures = [decode(b, max_side=side).rgb for b in images(48)]
    t = time.process_time()
    for k in range(480):
        quality(pictures[k % len(pictures)])
    return (time.process_time() - t) / 480 * 1000


def log_cpu_ms(group: int) -> float:
    """CPU per answer of its prediction-log row (written ``group`` rows a transaction, as the service's group commit
    does at this concurrency) and its JSON answer, on the pipeline's own results for the benchmark's photos."""
    import datetime as dt
    import uuid

    from fastapi.responses import JSONResponse

    from components.data.images import decode
    from components.monitoring.quality import reported
    from serving.store import PredictionLog

    p = deployed_pipeline("onnx", 1)
    results = p.analyse_many([decode(b, max_side=p.cfg.serving.work_side).rgb for b in images(48)])

    def answered(k: int) -> dict:
        main, rid = results[k % len(results)], uuid.uuid4().hex
        top = reported(main)
        JSONResponse({"request_id": rid, "lesions": main["lesions"], "fallback": main["fallback"], "models": {}})
        return {
            "request_id": rid,
            "created_at": dt.datetime.now(dt.UTC),
            "image_sha256": "0" * 64,
            "width": 64,
            "height": 64,
            "format": "JPEG",
            "quality": {"blur": 1.0},
            **{k: main[k] for k in ("embedding", "lesions", "fallback", "fallback_reason")},
            "label": top["label"],
            "confidence": top["probabilities"][top["label"]],
            "malignant_probability": top["malignant_probability"],
            "risk": top["risk"],
            "preprocess": "none",
            "classifier_version": "1",
            "detector_version": "1",
        }

    with tempfile.TemporaryDirectory() as tmp:
        log = PredictionLog(f"sqlite:///{tmp}/log.db")
        log.record_many([answered(0) for _ in range(group)])
        t = time.process_time()
        for start in range(0, PHOTOS, group):
            log.record_many([answered(start + k) for k in range(group)])
        return (time.process_time() - t) / PHOTOS * 1000


def http(workers: int, n: int) -> dict[str, float]:
    """The server's CPU per request on refused bodies (the floor) and on photos, the photos' rate, and how the
    front's connections fell on the API workers (the kernel hands each new connection to one of them)."""
    import threading

    from bench.loadgen import multipart_request, run

    with tempfile.TemporaryDirectory() as tmp:
        s = serve(True, workers, Path(tmp), "onnx")
        try:
            out = {}
            cases = {
                "floor": [multipart_request(s.url, "/predict", b"not a photo " * 256)],
                "photos": [multipart_request(s.url, "/predict", b) for b in images(48)],
            }
            for name, reqs in cases.items():
                asyncio.run(run(s.url, reqs, 200, CONCURRENCY))  # warm-up
                before = cpu_of(s.proc.pid)
                seen: list[list[int]] = []
                probe = threading.Timer(2.0, lambda into=seen: into.append(connections_per_worker(s.proc.pid)))
                probe.start()
                r = asyncio.run(run(s.url, reqs, n, CONCURRENCY))
                probe.join()
                out[f"{name}_connections_per_worker"] = seen[0] if seen else []
                out[f"{name}_cpu_ms"] = (cpu_of(s.proc.pid) - before) / n * 1000
                out[f"{name}_rps"] = n / r["wall"]
                out[f"{name}_errors"] = r["errors"]
            return out
        finally:
            s.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2, help="API workers (serving.workers) of the endpoint measured")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--out", default="serving_bound")
    ap.add_argument("--raw-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_worker:
        raw_worker(int(args.raw_worker[0]), int(args.raw_worker[1]))
        return
    cfg, cores = load_config(), os.cpu_count() or 1
    w = args.workers
    rows = {"raw_batched_rps": 0.0, "model_ceiling_rps": 0.0}
    for _ in range(REPEATS):  # a run of a few seconds on a shared machine varies by 10-15%: best of each, in turns
        rows["raw_batched_rps"] = max(rows["raw_batched_rps"], raw(1, cfg.serving.max_batch_size, cores))
        rows["model_ceiling_rps"] = max(rows["model_ceiling_rps"], raw(w, max(1, CONCURRENCY // w), max(1, cores // w)))
    h = http(w, args.requests)
    q, lg = quality_cpu_ms(), log_cpu_ms(max(1, CONCURRENCY // w))
    bound = cores / (cores / rows["model_ceiling_rps"] + (h["floor_cpu_ms"] + q + lg) / 1000)
    ref = rows["raw_batched_rps"]
    result = {
        **{k: round(v, 1) for k, v in rows.items()},
        "workers": w,
        "cores": cores,
        "batch_per_worker": max(1, CONCURRENCY // w),
        "floor_cpu_ms": round(h["floor_cpu_ms"], 2),
        "floor_answered_4xx": h["floor_errors"] == args.requests,
        "quality_cpu_ms": round(q, 2),
        "log_cpu_ms": round(lg, 2),
        "bound_rps": round(bound, 1),
        "model_ceiling_vs_raw_batched": round(rows["model_ceiling_rps"] / ref, 3),
        "bound_vs_raw_batched": round(bound / ref, 3),
        # the share of the bound the endpoint must reach for bench/serving.py's 0.8x
        "required_share_of_bound": round(0.8 / (bound / ref), 3),
        "endpoint_rps": round(h["photos_rps"], 1),
        "endpoint_errors": h["photos_errors"],
        "endpoint_cpu_ms": round(h["photos_cpu_ms"], 2),
        "endpoint_vs_raw_batched": round(h["photos_rps"] / ref, 3),
        "connections_per_worker": h["photos_connections_per_worker"],
        "endpoint_cpu_beyond_bound_ms": round(
            h["photos_cpu_ms"] - h["floor_cpu_ms"] - q - lg - cores / rows["model_ceiling_rps"] * 1000, 2
        ),
        "runtime": "onnx",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (ROOT / "bench" / "results" / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    print("\nwhat | photos/s | x raw batched | CPU ms per photo (all processes)")
    print(f"raw batched (1 process, batch {cfg.serving.max_batch_size}) | {ref:.1f} | 1.0 | {cores / ref * 1000:.2f}")
    print(
        f"model ceiling ({w} processes, batch {result['batch_per_worker']}) | {rows['model_ceiling_rps']:.1f} | "
        f"{result['model_ceiling_vs_raw_batched']} | {cores / rows['model_ceiling_rps'] * 1000:.2f}"
    )
    print(f"the stack's floor (refused body, no model) | {h['floor_rps']:.1f} req/s | | {h['floor_cpu_ms']:.2f}")
    print(f"the quality features (in process) | | | {q:.2f}")
    print(f"the log row and JSON answer (in process, {result['batch_per_worker']} rows a commit) | | | {lg:.2f}")
    print(f"bound: ceiling + floor + quality + log | {bound:.1f} | {result['bound_vs_raw_batched']} |")
    print(
        f"endpoint ({w} workers, concurrency {CONCURRENCY}) | {h['photos_rps']:.1f} | "
        f"{result['endpoint_vs_raw_batched']} | {h['photos_cpu_ms']:.2f}"
    )
    print(f"the front's connections per API worker, during the photos: {result['connections_per_worker']}")


if __name__ == "__main__":
    main()
