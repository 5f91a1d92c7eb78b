"""Serving throughput and latency: the raw in-process pipeline against the HTTP endpoint.

Run:  .venv/bin/drspot deploy && .venv/bin/python bench/serving.py [--images 48] [--requests 400] [--out serving]

In one run, on the same images (the project's data/images, else freshly generated synthetic ones):
* raw: the in-process two-stage pipeline (decode + detector + classifier, no HTTP) on the deployed champions, one
  image at a time and in batches of ``serving.max_batch_size`` (the most this CPU gives: the endpoint's ceiling);
* HTTP: ``drspot serve`` of the deployed Bento, multipart POST /predict at concurrency 1, 8 and 32,
  with in-process batching on and off (``serving.batching``), and batching on with 2 API worker processes
  (``serving.workers``: each loads both models), on each runtime.
Reports requests/s and p50/p95/p99 latency, the HTTP/raw throughput ratios and p99/p50, the load generator's own
CPU per request (bench/loadgen.py; it shares the machine's cores with the service; at concurrency 8 httpx's
AsyncClient loads the same configuration too, ``httpx_client``), and writes
bench/results/<out>.json (keys ``raw_batched_rps`` per runtime, ``http_c8_vs_raw_batched``, ``onnx_vs_eager_raw``).
The raw pipeline and the HTTP endpoint (batching on) also run on ONNX Runtime
(``serving.runtime: onnx``, the exports ``drspot deploy`` wrote and checked), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import components  # noqa: E402,F401
from infra.config import load_config  # noqa: E402


def images(n: int) -> list[bytes]:
    """``n`` decodable photos (the dataset's planted corrupt files are left out)."""
    from components.data.images import ImageError, decode

    def good(paths):
        out = []
        for p in paths:
            try:
                decode(p)
            except ImageError:
                continue
            out.append(p.read_bytes())
            if len(out) == n:
                break
        return out

    found = good(sorted((ROOT / "data" / "images").glob("*.jpg")))
    if len(found) < n:
        from components.data.synthetic import Spec, generate

        out = Path(tempfile.mkdtemp()) / "syn"
        generate(out, Spec.from_config(load_config("demo")))
        found = good(sorted(out.rglob("*.jpg")))
    return found


def stats(lat: list[float], wall: float) -> dict[str, float]:
    a = np.asarray(lat) * 1000
    return {
        "requests": len(lat),
        "rps": round(len(lat) / wall, 2),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p95_ms": round(float(np.percentile(a, 95)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
    }


def deployed_pipeline(runtime: str, threads: int | None = None):
    """The in-process pipeline on the deployed champions, on ``runtime`` (and ``threads`` intra-op threads when
    given; else ``serving.threads``)."""
    import bentoml

    from serving.pipeline import Pipeline

    cfg = load_config()
    update = {"runtime": runtime} | ({"threads": threads} if threads is not None else {})
    cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update=update)})
    tags = json.loads(cfg.runtime.deployed.read_text())["models"]
    return Pipeline(bentoml.models.get(tags["classifier"]).path, bentoml.models.get(tags["detector"]).path, cfg)


def raw(imgs: list[bytes], n: int, runtime: str = "torch", batch: int = 1) -> dict[str, float]:
    """The in-process pipeline on ``runtime`` (eager PyTorch or ONNX Runtime on the deployed exports), ``batch``
    photos per model call: decode as the service does (``serving.work_side``), detector, crops, classifier. Latency
    is per photo (a batch's time over its photos)."""
    from components.data.images import decode

    p = deployed_pipeline(runtime)
    side = p.cfg.serving.work_side
    p.analyse_many([decode(b, max_side=side).rgb for b in imgs[:batch]])  # warm-up
    lat = []
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        t = time.perf_counter()
        p.analyse_many([decode(imgs[k % len(imgs)], max_side=side).rgb for k in range(start, min(start + batch, n))])
        lat += [(time.perf_counter() - t) / min(batch, n - start)] * min(batch, n - start)
    return stats(lat, time.perf_counter() - t0)


async def load(url: str, imgs: list[bytes], n: int, concurrency: int) -> dict[str, float]:
    """``n`` multipart POSTs to /predict at ``concurrency`` from the lean load generator (bench/loadgen.py)."""
    from bench.loadgen import multipart_request, run

    r = await run(url, [multipart_request(url, "/predict", b) for b in imgs], n, concurrency)
    # the load generator shares the CPU with the service: its own CPU per request is part of what the cores gave
    cpu = r["client_cpu_ms_per_request"]
    return {**stats(r["latencies"], r["wall"]), "errors": r["errors"], "client_cpu_ms_per_request": cpu}


async def load_httpx(url: str, imgs: list[bytes], n: int, concurrency: int) -> dict[str, float]:
    """The same load from httpx's AsyncClient (the generator of the earlier runs: ~1 CPU ms a request of its own)."""
    import httpx

    lat: list[float] = []
    errors = 0
    queue = list(range(n))

    async def worker(client):
        nonlocal errors
        while queue:
            k = queue.pop()
            t = time.perf_counter()
            r = await client.post(f"{url}/predict", files={"image": ("x.jpg", imgs[k % len(imgs)], "image/jpeg")})
            lat.append(time.perf_counter() - t)
            errors += r.status_code != 200

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        for b in imgs[:4]:  # warm-up
            await client.post(f"{url}/predict", files={"image": ("x.jpg", b, "image/jpeg")})
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {**stats(lat, wall), "errors": errors, "client_cpu_ms_per_request": round(cpu / n * 1000, 2)}


def serve(batching: bool, workers: int, tmp: Path, runtime: str = "torch"):
    """``drspot serve`` with ``serving.batching``, ``serving.workers`` and ``serving.runtime`` set in a copy of
    params.yaml."""
    import re

    from serving.launch import Server

    params = (ROOT / "params.yaml").read_text().replace("    batching: true", f"    batching: {str(batching).lower()}")
    params, n = re.subn(r"(?m)^    workers: 1( +# API worker)", rf"    workers: {workers}\1", params)
    assert n == 1, "serving.workers not found in params.yaml"
    params, n = re.subn(r"(?m)^    runtime: torch( +# torch)", rf"    runtime: {runtime}\1", params)
    assert n == 1, "serving.runtime not found in params.yaml"
    name = f"{batching}-{workers}-{runtime}"
    (tmp / f"params-{name}.yaml").write_text(params)
    env = {
        **os.environ,
        "DRSPOT_PARAMS": str(tmp / f"params-{name}.yaml"),
        "DRSPOT_DATABASE_URL": f"sqlite:///{tmp / f'log-{name}.db'}",
    }
    return Server(env, tmp / f"serve-{name}.log")


HTTP_CONFIGS = (  # batching, workers, runtime
    (True, 1, "torch"),
    (False, 1, "torch"),
    (True, 2, "torch"),
    (True, 1, "onnx"),
    (True, 2, "onnx"),
)


def label(batching: bool, workers: int, runtime: str) -> str:
    text = f"HTTP, batching {'on' if batching else 'off'}" + (f", {workers} workers" if workers > 1 else "")
    return text + (", ONNX Runtime" if runtime == "onnx" else "")


def measure(imgs: list[bytes], n: int) -> list[dict]:
    batch = load_config().serving.max_batch_size
    rows = []
    for runtime in ("torch", "onnx"):
        name = "" if runtime == "torch" else ", ONNX Runtime"
        for b in (1, batch):
            rows.append(
                {
                    "config": f"raw in-process (batch {b}){name}",
                    "runtime": runtime,
                    "batch": b,
                    "concurrency": 1,
                    **raw(imgs, n, runtime, b),
                }
            )
            print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for batching, workers, runtime in HTTP_CONFIGS:
            server = serve(batching, workers, Path(tmp), runtime)
            try:
                for c in (1, 8, 32):
                    r = asyncio.run(load(server.url, imgs, n, c))
                    if c == 8:  # the same load from httpx, as the earlier runs measured it
                        h = asyncio.run(load_httpx(server.url, imgs, n, c))
                        r["httpx_client"] = {k: h[k] for k in ("rps", "p50_ms", "p99_ms", "client_cpu_ms_per_request")}
                    rows.append(
                        {
                            "config": label(batching, workers, runtime),
                            "workers": workers,
                            "runtime": runtime,
                            "concurrency": c,
                            **r,
                        }
                    )
                    print(rows[-1], flush=True)
            finally:
                server.stop()
    return rows


def summarise(rows: list[dict], n_images: int) -> dict:
    """The keys the README and issue 24 quote: each runtime's raw batched ceiling, the endpoint over it."""
    raw1 = {r["runtime"]: r for r in rows if r["config"].startswith("raw") and r["batch"] == 1}
    rawb = {r["runtime"]: r for r in rows if r["config"].startswith("raw") and r["batch"] > 1}
    base = raw1["torch"]["rps"]
    for r in rows:
        r["throughput_vs_raw"] = round(r["rps"] / base, 3)
        r["p99_over_p50"] = round(r["p99_ms"] / r["p50_ms"], 2)
        if not r["config"].startswith("raw"):
            r["vs_raw_batched"] = round(r["rps"] / rawb[r["runtime"]]["rps"], 3)
    at8 = {r["config"]: r for r in rows if r["concurrency"] == 8}
    best = max(at8.values(), key=lambda r: r["rps"])
    # each runtime's fastest endpoint at concurrency 8 (batching on; one or two API worker processes)
    on = {rt: max((r for r in at8.values() if r["runtime"] == rt), key=lambda r: r["rps"]) for rt in ("torch", "onnx")}
    fastest = max(on, key=lambda rt: on[rt]["rps"])
    return {
        "rows": rows,
        "raw_rps": base,
        "raw_batched_rps": {rt: r["rps"] for rt, r in rawb.items()},
        "batch_size": rawb["torch"]["batch"],
        "http_c8_best_runtime": fastest,
        "http_c8_best_config": on[fastest]["config"],
        "http_c8_vs_raw_batched": on[fastest]["vs_raw_batched"],
        "http_c8_p99_over_p50": on[fastest]["p99_over_p50"],
        "http_c8_batching_on": at8[label(True, 1, "torch")],
        "http_c8_batching_off": at8[label(False, 1, "torch")],
        "http_c8_workers_2": at8[label(True, 2, "torch")],
        "workers_2_vs_1_at_c8": {
            rt: round(at8[label(True, 2, rt)]["rps"] / at8[label(True, 1, rt)]["rps"], 3) for rt in ("torch", "onnx")
        },
        "best_at_concurrency_8": best["config"],
        "goal": {"http_c8_vs_raw_batched": 0.8, "p99_over_p50": 2.0},
        "meets_goal": on[fastest]["vs_raw_batched"] >= 0.8 and on[fastest]["p99_over_p50"] <= 2.0,
        "raw_onnx_rps": raw1["onnx"]["rps"],
        "onnx_vs_eager_raw": round(raw1["onnx"]["rps"] / base, 3),
        "onnx_vs_eager_raw_batched": round(rawb["onnx"]["rps"] / rawb["torch"]["rps"], 3),
        "http_c8_onnx": on["onnx"],
        "onnx_vs_eager_http_c8": round(on["onnx"]["rps"] / on["torch"]["rps"], 3),
        "client_cpu_ms_per_request_c8": on[fastest]["client_cpu_ms_per_request"],
        "load_generator": "bench/loadgen.py (keep-alive HTTP/1.1, prebuilt requests)",
        # the same configuration loaded by httpx's AsyncClient (~1 CPU ms a request of its own, on the same cores)
        "http_c8_vs_raw_batched_httpx_client": round(on[fastest]["httpx_client"]["rps"] / rawb[fastest]["rps"], 3),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "images": n_images,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument(
        "--out", default="serving", help="bench/results/<out>.json (serving_ham10000 for the real champion)"
    )
    args = ap.parse_args()
    imgs = images(args.images)
    print(f"{len(imgs)} images, {args.requests} requests per configuration", flush=True)
    result = summarise(measure(imgs, args.requests), len(imgs))
    (ROOT / "bench" / "results" / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    print("\nconfig | concurrency | req/s | p50 ms | p95 ms | p99 ms | x raw batch 1 | x raw batched | p99/p50")
    for r in result["rows"]:
        print(
            f"{r['config']} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
            f"{r['throughput_vs_raw']} | {r.get('vs_raw_batched', '')} | {r['p99_over_p50']}"
        )
    print(
        f"goal at concurrency 8 (the endpoint >= 0.8x the raw batched pipeline on its runtime, p99 <= 2x p50): "
        f"{'met' if result['meets_goal'] else 'NOT met'} ({result['http_c8_best_config']}: "
        f"{result['http_c8_vs_raw_batched']}x, p99/p50 {result['http_c8_p99_over_p50']})"
    )
    print(
        f"ONNX Runtime vs eager PyTorch: raw batch 1 {result['onnx_vs_eager_raw']}x, raw batched "
        f"{result['onnx_vs_eager_raw_batched']}x, HTTP at concurrency 8 {result['onnx_vs_eager_http_c8']}x"
    )


if __name__ == "__main__":
    main()
