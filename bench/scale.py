"""The data gate at scale: local processes against a Dask cluster of 1 and 2 workers, and DVC at 10^4-10^5 files.

Run:  .venv/bin/python bench/scale.py [--sizes 10000 100000] [--configs local dask1 dask2] [--dvc]

For each size a dataset of distinct 600x450 JPEGs (HAM10000's original size; smooth random skin, one lesion
each, sensor noise: ~50 kB like a dermoscopy JPEG) is generated once under --work (default: a temporary folder,
deleted after), then the whole data gate (validate -> dedup -> split, components/data/gate.py) runs on each compute
target (infra/compute.py):
* local: the default pool of local processes (validate.workers: one per core);
* dask1 / dask2: an external `dask scheduler` and one `dask worker` process with 1 or 2 single-threaded worker
  processes, through prefect-dask's DaskTaskRunner, chunks of compute.chunk_size images.
Reported: wall time of the gate and of its per-image step (the image checks), images/s, peak memory (RSS) of the
driver, the scheduler and each worker, and whether the three outputs are byte-identical to the local run's.
With --dvc: `dvc add`, `dvc push` (to a local remote) and `dvc status -c` of the image folder at each size, and of
the same images in tar shards of 1,000 (one DVC-tracked file per shard).

Writes bench/results/scale.json with ``dask_2_vs_1_workers`` (per-image step, largest size run with both) and
``gate_1e5_s`` (the 2-worker gate at 10^5, when run).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import components  # noqa: E402,F401
from components.data import gate  # noqa: E402
from components.data.manifest import Row, write_manifest  # noqa: E402
from infra import compute  # noqa: E402
from infra.config import load_config  # noqa: E402

BIN = Path(sys.executable).parent
OUTPUTS = ("validate/validated.parquet", "dedup/deduplicated.parquet", "split/split.parquet")


# ------------------------------------------------------------------ data


def _image(i: int) -> tuple[bytes, list[float]]:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(1_000_003 + i)
    skin = rng.integers(150, 235, (6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(skin).resize((600, 450), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    w, h = rng.integers(80, 260), rng.integers(70, 220)
    x0, y0 = rng.integers(20, 600 - w - 20), rng.integers(20, 450 - h - 20)
    colour = tuple(int(c) for c in rng.integers(40, 140, 3))
    draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
    for _ in range(int(rng.integers(3, 9))):  # irregular blotches inside the lesion
        cx, cy = rng.integers(x0, x0 + w), rng.integers(y0, y0 + h)
        r = int(rng.integers(5, 30))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(c) for c in rng.integers(20, 120, 3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 4, (450, 600, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), [x0 / 600, y0 / 450, (x0 + w) / 600, (y0 + h) / 450]


def _write_images(args: tuple[Path, int, int]) -> list[dict]:
    folder, start, stop = args
    out = []
    for i in range(start, stop):
        data, box = _image(i)
        rel = f"images/{i // 1000:03d}/s{i:06d}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
        out.append({"i": i, "path": rel, "sha256": hashlib.sha256(data).hexdigest(), "box": box, "bytes": len(data)})
    return out


def generate(folder: Path, n: int, classes: list[str]) -> dict:
    start = time.perf_counter()
    parts = [(folder, a, min(n, a + 500)) for a in range(0, n, 500)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        made = [r for part in pool.map(_write_images, parts) for r in part]
    rows = (
        Row(
            image_id=f"s{r['i']:06d}",
            path=r["path"],
            sha256=r["sha256"],
            width=600,
            height=450,
            label=classes[r["i"] % len(classes)],
            lesion_id=f"L{r['i']:06d}",
            boxes=[r["box"]],
            source="scale",
            split=None,
        )
        for r in made
    )
    write_manifest(folder, rows)
    return {
        "generate_s": round(time.perf_counter() - start, 1),
        "mean_kb": round(sum(r["bytes"] for r in made) / n / 1024, 1),
    }


# ------------------------------------------------------------------ memory


class Peak:
    """Peak RSS (MiB) of named process trees, sampled every 0.2 s."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots, self.peak, self._stop = roots, dict.fromkeys(roots, 0.0), threading.Event()
        self.workers: dict[int, float] = {}
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for name, pid in self.roots.items():
                try:
                    p = psutil.Process(pid)
                    # the driver alone: its children (the local pool, Prefect's temporary server) are counted apart
                    procs = [p] if name == "driver" else [p, *p.children(recursive=True)]
                    if name == "driver":
                        kids = sum(q.memory_info().rss for q in p.children(recursive=True)) / 2**20
                        self.peak["driver_children"] = max(self.peak.get("driver_children", 0.0), kids)
                except psutil.NoSuchProcess:
                    continue
                rss = 0.0
                for q in procs:
                    try:
                        mib = q.memory_info().rss / 2**20
                    except psutil.NoSuchProcess:
                        continue
                    rss += mib
                    if name == "workers" and q.pid != pid:  # each process under `dask worker` (nanny, worker)
                        self.workers[q.pid] = max(self.workers.get(q.pid, 0.0), mib)
                self.peak[name] = max(self.peak[name], rss)
            self._stop.wait(0.2)

    def __enter__(self) -> Peak:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def result(self) -> dict:
        out = {f"peak_{k}_mib": round(v) for k, v in self.peak.items()}
        if self.workers:
            out["peak_each_worker_mib"] = sorted(round(v) for v in self.workers.values())
        return out


# ------------------------------------------------------------------ cluster


# ------------------------------------------------------------------ the gate


def run_gate(ds: Path, out: Path, cfg) -> dict:
    """The whole gate into ``out``; wall times of the gate and of its per-image step (the image checks)."""
    from components.data import validate as validate_module

    timed: dict[str, float] = {}
    original = validate_module.map_chunks

    def timed_map(fn, jobs, cfg_, workers=None, min_jobs=64):
        t = time.perf_counter()
        try:
            return original(fn, jobs, cfg_, workers, min_jobs)
        finally:
            timed["per_image_s"] = time.perf_counter() - t

    validate_module.map_chunks = timed_map
    try:
        steps = {}
        for name, step in (("validate", gate.run_validate), ("dedup", gate.run_dedup), ("split", gate.run_split)):
            start = time.perf_counter()
            step(ds, out, cfg)
            steps[f"{name}_s"] = round(time.perf_counter() - start, 1)
    finally:
        validate_module.map_chunks = original
    report = json.loads((out / "dedup" / "dedup_report.json").read_text())
    return {
        "gate_s": round(sum(steps.values()), 1),
        "per_image_s": round(timed["per_image_s"], 1),
        **steps,
        "near_candidates": report["near_candidates"],  # each verified by the crop correlation (in dedup_s)
    }


def bench_gate(ds: Path, n: int, config: str, work: Path, cfg, reference: Path | None) -> dict:
    out = work / f"prep-{config}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    os.environ.pop(compute.ADDRESS_ENV, None)
    row: dict = {"images": n, "config": config}
    if config == "local":
        with Peak({"driver": os.getpid()}) as peak:
            row |= run_gate(ds, out, cfg)
    else:
        logs = work / f"dask-{config}-{n}"
        logs.mkdir(exist_ok=True)
        with compute.ExternalCluster(int(config[-1]), logs) as cluster:
            os.environ[compute.ADDRESS_ENV] = cluster.address
            try:
                with Peak({"driver": os.getpid(), **cluster.pids}) as peak:
                    row |= run_gate(ds, out, cfg)
            finally:
                os.environ.pop(compute.ADDRESS_ENV, None)
    row |= peak.result()
    row["images_per_s"] = round(n / row["per_image_s"], 1)
    if reference is not None:
        row["identical_to_local"] = all((out / o).read_bytes() == (reference / o).read_bytes() for o in OUTPUTS)
    print(
        f"{n:>7} {config:<6} gate {row['gate_s']:>7.1f} s  image checks {row['per_image_s']:>7.1f} s "
        f"({row['images_per_s']:>6.1f} img/s)  de-dup {row['dedup_s']} s ({row['near_candidates']:,} candidate pairs)"
        f"  peak MiB {json.dumps(peak.result())}"
        + (f"  identical: {row['identical_to_local']}" if reference is not None else ""),
        flush=True,
    )
    return row


# ------------------------------------------------------------------ DVC


def _dvc(*args: str, cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return round(time.perf_counter() - start, 1)


def bench_dvc(ds: Path, n: int, work: Path) -> list[dict]:
    rows = []
    for layout in ("files", "shards of 1,000"):
        repo = work / f"dvc-{n}-{layout.split()[0]}"
        shutil.rmtree(repo, ignore_errors=True)
        (repo / "data").mkdir(parents=True)
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        _dvc("init", "-q", cwd=repo)
        _dvc("remote", "add", "-d", "local", str(work / f"remote-{n}-{layout.split()[0]}"), cwd=repo)
        images = sorted((ds / "images").rglob("*.jpg"))
        start = time.perf_counter()
        if layout == "files":
            for p in images:  # hard links: the same bytes, no copy
                dst = repo / "data" / p.relative_to(ds)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, dst)
        else:
            for k in range(0, len(images), 1000):
                with tarfile.open(repo / "data" / f"shard-{k // 1000:04d}.tar", "w") as tar:
                    for p in images[k : k + 1000]:
                        tar.add(p, arcname=str(p.relative_to(ds)))
        prepare = round(time.perf_counter() - start, 1)
        row = {"images": n, "layout": layout, "prepare_s": prepare}
        row["add_s"] = _dvc("add", "-q", "data", cwd=repo)
        row["push_s"] = _dvc("push", "-q", cwd=repo)
        row["status_cloud_s"] = _dvc("status", "-c", cwd=repo)
        (repo / "data" / "extra.txt").write_text("one more file")  # the next version: one file added
        row["add_again_s"] = _dvc("add", "-q", "data", cwd=repo)
        print(f"{n:>7} dvc {layout:<16} {json.dumps(row)}", flush=True)
        rows.append(row)
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(work / f"remote-{n}-{layout.split()[0]}", ignore_errors=True)
    return rows


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--configs", nargs="+", default=["local", "dask1", "dask2"])
    ap.add_argument("--large-configs", nargs="+", default=None, help="configs at sizes above 10^4 (default: all)")
    ap.add_argument("--dvc", action="store_true", help="also time dvc add/push/status at each size")
    ap.add_argument("--work", type=Path, default=None, help="keep the generated data here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = ap.parse_args()

    cfg = load_config("full")  # the data gate's settings are the defaults in every profile
    work = args.work or Path(tempfile.mkdtemp(prefix="drspot-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "chunk_size": cfg.compute.chunk_size,
        "pair_chunk_size": cfg.compute.pair_chunk_size,
        "gate": [],
        "data": [],
        "dvc": [],
    }
    if args.out.is_file():  # the figures of sizes not run now stay (e.g. 10^4 kept while 10^5 is re-run)
        before = json.loads(args.out.read_text())
        rerun = {"gate": True, "data": False, "dvc": args.dvc}  # a size's generation figure goes when it is redone
        for part in ("gate", "data", "dvc"):
            result[part] = [r for r in before.get(part, []) if not (rerun[part] and r["images"] in args.sizes)]
    try:
        for n in args.sizes:
            ds = work / f"ds-{n}"
            if not (ds / "manifest.parquet").is_file():
                made = generate(ds, n, cfg.classes.names)
                result["data"] = [r for r in result["data"] if r["images"] != n] + [{"images": n, **made}]
                print(f"{n:>7} generated in {made['generate_s']} s, mean {made['mean_kb']} kB per JPEG", flush=True)
            configs = args.configs if n <= 10_000 or args.large_configs is None else args.large_configs
            reference = None
            for config in configs:
                row = bench_gate(ds, n, config, work, cfg, reference)
                result["gate"].append(row)
                if config == configs[0]:
                    reference = work / f"prep-{config}-{n}"
            if args.dvc:
                result["dvc"] += bench_dvc(ds, n, work)
            json.dump(result, open(args.out, "w"), indent=2)  # each size as it finishes
            for config in configs:
                shutil.rmtree(work / f"prep-{config}-{n}", ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    per = {(r["images"], r["config"]): r for r in result["gate"]}
    both = sorted({n for n, _ in per if (n, "dask1") in per and (n, "dask2") in per})
    if both:
        n = max(both)
        result["dask_2_vs_1_workers"] = round(per[(n, "dask1")]["per_image_s"] / per[(n, "dask2")]["per_image_s"], 3)
        result["dask_2_vs_1_workers_at"] = n
    if (100_000, "dask2") in per:
        result["gate_1e5_s"] = per[(100_000, "dask2")]["gate_s"]
    json.dump(result, open(args.out, "w"), indent=2)
    print(
        "\n| images | config | gate s | image checks s | img/s | de-dup s (candidate pairs) | peak driver MiB | "
        "scheduler | workers | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["gate"]:
        print(
            f"| {r['images']:,} | {r['config']} | {r['gate_s']} | {r['per_image_s']} | {r['images_per_s']} | "
            f"{r.get('dedup_s', '-')} ({r.get('near_candidates', 0):,}) | "
            f"{r.get('peak_driver_mib')} | {r.get('peak_scheduler_mib', '-')} | {r.get('peak_each_worker_mib', '-')} | "
            f"{r.get('identical_to_local', '(reference)')} |"
        )
    for key in ("dask_2_vs_1_workers", "gate_1e5_s"):
        if key in result:
            print(f"{key}: {result[key]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
