"""Serving throughput and latency: the raw in-process pipeline against the HTTP endpoint.

Run:  .venv/bin/drspot deploy && .venv/bin/python bench/serving.py [--images 48] [--requests 96]

In one run, on the same images (the project's data/images, else freshly generated synthetic ones):
* raw: the in-process two-stage pipeline (decode + detector + classifier, no HTTP), one image at a
  time, on the deployed champions;
* HTTP: ``drspot serve`` of the deployed Bento, multipart POST /predict at concurrency 1, 8 and 32,
  with BentoML adaptive batching on and off (``serving.batching``), and batching on with 2 API worker processes
  (``serving.workers``: each loads both models).
Reports requests/s and p50/p95/p99 latency, the HTTP/raw throughput ratio and p99/p50, and writes
bench/results/serving.json. The raw pipeline and the HTTP endpoint (batching on) also run on ONNX Runtime
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


def raw(imgs: list[bytes], n: int, runtime: str = "torch") -> dict[str, float]:
    """The in-process pipeline at batch 1 on ``runtime`` (eager PyTorch or ONNX Runtime on the deployed exports)."""
    import bentoml

    from components.data.images import decode
    from serving.pipeline import Pipeline

    cfg = load_config()
    cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"runtime": runtime})})
    tags = json.loads(cfg.runtime.deployed.read_text())["models"]
    cm, dm = bentoml.models.get(tags["classifier"]), bentoml.models.get(tags["detector"])
    p = Pipeline(cm.path, dm.path, cfg)
    for b in imgs[:4]:
        p.analyse(decode(b).rgb)  # warm-up
    lat = []
    t0 = time.perf_counter()
    for k in range(n):
        t = time.perf_counter()
        p.analyse(decode(imgs[k % len(imgs)]).rgb)
        lat.append(time.perf_counter() - t)
    return stats(lat, time.perf_counter() - t0)


async def load(url: str, imgs: list[bytes], n: int, concurrency: int) -> dict[str, float]:
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
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {**stats(lat, wall), "errors": errors}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--requests", type=int, default=96)
    args = ap.parse_args()
    imgs = images(args.images)
    print(f"{len(imgs)} images, {args.requests} requests per configuration", flush=True)
    rows = [{"config": "raw in-process (batch 1)", "concurrency": 1, **raw(imgs, args.requests)}]
    print(rows[-1], flush=True)
    rows.append(
        {"config": "raw in-process (batch 1), ONNX Runtime", "concurrency": 1, **raw(imgs, args.requests, "onnx")}
    )
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for batching, workers, runtime in (
            (True, 1, "torch"),
            (False, 1, "torch"),
            (True, 2, "torch"),
            (True, 1, "onnx"),
        ):
            server = serve(batching, workers, Path(tmp), runtime)
            label = f"HTTP, batching {'on' if batching else 'off'}" + (f", {workers} workers" if workers > 1 else "")
            label += ", ONNX Runtime" if runtime == "onnx" else ""
            try:
                for c in (1, 8, 32):
                    r = asyncio.run(load(server.url, imgs, args.requests, c))
                    rows.append({"config": label, "workers": workers, "runtime": runtime, "concurrency": c, **r})
                    print(rows[-1], flush=True)
            finally:
                server.stop()
    base = rows[0]["rps"]
    for r in rows:
        r["throughput_vs_raw"] = round(r["rps"] / base, 3)
        r["p99_over_p50"] = round(r["p99_ms"] / r["p50_ms"], 2)
    at8 = {r["config"]: r for r in rows if r["concurrency"] == 8}
    best = max(at8.values(), key=lambda r: r["rps"])
    result = {
        "rows": rows,
        "raw_rps": base,
        "http_c8_batching_on": at8["HTTP, batching on"],
        "http_c8_batching_off": at8["HTTP, batching off"],
        "http_c8_workers_2": at8["HTTP, batching on, 2 workers"],
        "workers_2_vs_1_at_c8": round(at8["HTTP, batching on, 2 workers"]["rps"] / at8["HTTP, batching on"]["rps"], 3),
        "best_at_concurrency_8": best["config"],
        "goal": {"throughput_vs_raw_at_c8": 0.8, "p99_over_p50": 2.5},
        "meets_goal": best["throughput_vs_raw"] >= 0.8 and best["p99_over_p50"] <= 2.5,
        "raw_onnx_rps": rows[1]["rps"],
        "onnx_vs_eager_raw": round(rows[1]["rps"] / base, 3),
        "http_c8_onnx": at8["HTTP, batching on, ONNX Runtime"],
        "onnx_vs_eager_http_c8": round(
            at8["HTTP, batching on, ONNX Runtime"]["rps"] / at8["HTTP, batching on"]["rps"], 3
        ),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "images": len(imgs),
    }
    (ROOT / "bench" / "results" / "serving.json").write_text(json.dumps(result, indent=2))
    print("\nconfig | concurrency | req/s | p50 ms | p95 ms | p99 ms | x raw | p99/p50")
    for r in rows:
        print(
            f"{r['config']} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
            f"{r['throughput_vs_raw']} | {r['p99_over_p50']}"
        )
    print(
        f"goal at concurrency 8 (>= 0.8x raw, p99 <= 2.5x p50): {'met' if result['meets_goal'] else 'NOT met'} "
        f"by {best['config']}"
    )
    print(
        f"ONNX Runtime vs eager PyTorch: raw batch 1 {result['onnx_vs_eager_raw']}x (goal >= 2), "
        f"HTTP at concurrency 8 {result['onnx_vs_eager_http_c8']}x"
    )


if __name__ == "__main__":
    main()
