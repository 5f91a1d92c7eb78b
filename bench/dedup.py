"""Near-duplicate search: DrSpot (multi-index hashing, numpy) against imagededup (idealo).

Run:  .venv/bin/pip install -e '.[bench]' && .venv/bin/python bench/dedup.py [--quick]

Both searches get the *same* 64-bit pHashes (DrSpot's, passed to imagededup as its
``encoding_map``) and the same Hamming threshold (DrSpot's default, ``dedup.max_distance``), so the
pairs must agree exactly and only the search differs. Image sets: synthetic with planted
near-duplicates (10^3, 10^4), the shared real DermaMNIST (10^4) and YOLO/HAM10000 (1,600) images
when ../shared/data is present. Search-only: 10^5 and 10^6 random hashes with planted pairs
(imagededup is not run at 10^6: its brute force is quadratic; its 10^5 time x 100 is shown as an
estimate). Also reported: recall of the planted near-duplicates by plain search and by DrSpot's
full pipeline (crop hashes + verification). Writes bench/results/dedup.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import components  # noqa: E402,F401
from components.data.dedup import confirmed as is_confirmed  # noqa: E402
from components.data.dedup import near_pairs, near_pairs_with_crops, verify  # noqa: E402
from infra.config import load_config  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def _hash_file(path: str) -> tuple[int, list[int]]:
    from components.data.images import CROP_HASHES, decode, phash

    rgb = decode(path).rgb
    return phash(rgb), [phash(rgb, c) for c in CROP_HASHES]


def encode(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, float]:
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        out = list(pool.map(_hash_file, [str(p) for p in paths], chunksize=64))
    full = np.array([o[0] for o in out], dtype=np.uint64)
    crops = np.array([o[1] for o in out], dtype=np.uint64)
    return full, crops, time.perf_counter() - t


def ours(h: np.ndarray, d: int) -> tuple[set[tuple[int, int]], float]:
    t = time.perf_counter()
    i, j, _ = near_pairs(h, d)
    return set(zip(i.tolist(), j.tolist(), strict=True)), time.perf_counter() - t


def _theirs_worker(hexes: list[str], d: int, method: str, queue) -> None:
    from imagededup.methods import PHash

    enc = {str(k): x for k, x in enumerate(hexes)}
    t = time.perf_counter()
    res = PHash(verbose=False).find_duplicates(
        encoding_map=enc,
        max_distance_threshold=d,
        scores=False,
        search_method=method,
        num_dist_workers=os.cpu_count() or 2,
    )
    dt = time.perf_counter() - t
    queue.put((sorted({(min(int(a), int(b)), max(int(a), int(b))) for a, dups in res.items() for b in dups}), dt))


def theirs(h: np.ndarray, d: int, method: str = "brute_force_cython", cap_s: float = 300) -> tuple[set | None, float]:
    """imagededup's search on the same hashes, in a subprocess stopped after ``cap_s`` seconds.

    Returns (pairs, seconds), or (None, cap_s) when it did not finish in time.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_theirs_worker, args=([f"{int(x):016x}" for x in h], d, method, queue))
    proc.start()
    try:
        pairs, dt = queue.get(timeout=cap_s)
    except Exception:  # queue.Empty: out of time
        for child in __import__("psutil").Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.join()
        return None, cap_s
    proc.join()
    return {tuple(p) for p in pairs}, dt


def synthetic_set(n_images: int, seed: int, work: Path) -> tuple[list[Path], list[tuple[int, int]]]:
    """A generated set of about n_images with ~2% planted near-duplicates; returns paths and true pairs."""
    from components.data.synthetic import Spec, generate

    cfg = load_config("demo")
    n_near = max(10, n_images // 50)
    spec = Spec.from_config(
        cfg,
        seed=seed,
        n_lesions=int(n_images / 2.1),
        exact_duplicates=0,
        near_duplicates=n_near,
        corrupt=0,
        unknown_labels=0,
        tiny=0,
    )
    out = work / f"syn{n_images}"
    generate(out, spec)
    import csv

    rows = list(csv.DictReader(open(out / "labels.csv")))
    index = {r["image_id"]: k for k, r in enumerate(rows)}
    faults = json.loads((out / "faults.json").read_text())
    truth = [tuple(sorted((index[f["image_id"]], index[f["of"]]))) for f in faults if f["kind"] == "near_duplicate"]
    return [out / r["file"] for r in rows], truth


def real_sets(work: Path) -> dict[str, list[Path]]:
    sets = {}
    yolo = SHARED / "ham10000_yolo_seg_roboflow"
    if yolo.is_dir():
        sets["real HAM10000 (YOLO set, 640 px)"] = sorted(yolo.glob("*/images/*.jpg"))
    npz = SHARED / "dermamnist_28" / "dermamnist_28_from_jpeg.npz"
    if npz.is_file():
        from PIL import Image

        d = work / "derma"
        d.mkdir(exist_ok=True)
        data = np.load(npz)
        paths = []
        for split in ("train", "val", "test"):
            for k, arr in enumerate(data[f"{split}_images"]):
                p = d / f"{split}_{k:05d}.png"
                if not p.exists():
                    buf = io.BytesIO()
                    Image.fromarray(arr).save(buf, "PNG")
                    p.write_bytes(buf.getvalue())
                paths.append(p)
        sets["real DermaMNIST (28 px)"] = paths
    return sets


def random_hashes(n: int, planted: int, max_distance: int, rng: np.random.Generator) -> tuple[np.ndarray, set]:
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    truth = set()
    for k in range(planted):
        a, b = 2 * k, 2 * k + 1
        bits = rng.choice(64, size=int(rng.integers(1, max_distance + 1)), replace=False)
        h[b] = h[a] ^ np.uint64(sum(1 << int(x) for x in bits))
        truth.add((a, b))
    return h, truth


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10^3 images and 10^5 hashes only")
    ap.add_argument("--cap", type=float, default=300, help="seconds before an imagededup search is stopped")
    args = ap.parse_args()
    cfg = load_config("demo")
    d = cfg.dedup.max_distance
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image_sets: dict[str, tuple[list[Path], list]] = {}
        for n in (1000,) if args.quick else (1000, 10000):
            image_sets[f"synthetic ~{n}"] = synthetic_set(n, seed=n, work=work)
        if not args.quick:
            for name, paths in real_sets(work).items():
                image_sets[name] = (paths, [])
        for name, (paths, truth) in image_sets.items():
            full, crops, t_enc = encode(paths)
            p_ours, t_ours = ours(full, d)
            p_theirs, t_theirs = theirs(full, d, cap_s=args.cap)
            done = p_theirs is not None
            row = {
                "set": name,
                "images": len(paths),
                "threshold": d,
                "encode_s": round(t_enc, 2),
                "drspot_search_s": round(t_ours, 3),
                "imagededup_search_s": round(t_theirs, 3) if done else f">{args.cap:.0f} (stopped)",
                "speedup": round(t_theirs / max(t_ours, 1e-6), 1) if done else f">{t_theirs / max(t_ours, 1e-6):.0f}",
                "pairs_drspot": len(p_ours),
                "pairs_imagededup": len(p_theirs) if done else None,
                "agreement": round(len(p_ours & p_theirs) / max(1, len(p_ours | p_theirs)), 4) if done else None,
            }
            if truth:
                truth_set = set(truth)
                row["planted_near_duplicates"] = len(truth_set)
                row["recall_plain_search"] = round(len(truth_set & p_ours) / len(truth_set), 4)
                found = near_pairs_with_crops(full, crops, d)
                ids = [str(k) for k in range(len(paths))]
                corr = verify([(ids[a], ids[b]) for a, b in found], dict(zip(ids, paths, strict=True)))
                confirmed = {(a, b) for a, b in found if is_confirmed(corr[(str(a), str(b))], cfg)}
                row["recall_drspot_pipeline"] = round(len(truth_set & confirmed) / len(truth_set), 4)
                row["false_pair_share_drspot_pipeline"] = round(len(confirmed - truth_set) / max(1, len(confirmed)), 4)
            rows.append(row)
            print(row, flush=True)

    search = []
    for n in (10**4, 10**5) if args.quick else (10**4, 10**5, 10**6):
        h, truth = random_hashes(n, planted=min(1000, n // 10), max_distance=d, rng=rng)
        p_ours, t_ours = ours(h, d)
        entry = {
            "hashes": n,
            "threshold": d,
            "drspot_s": round(t_ours, 2),
            "planted": len(truth),
            "planted_found": len(truth & p_ours),
            "pairs_drspot": len(p_ours),
        }
        if n <= 10**5:
            for method in ("brute_force_cython", "bktree"):
                p_theirs, t_theirs = theirs(h, d, method, cap_s=args.cap)
                if p_theirs is None:
                    entry[f"imagededup_{method}_s"] = f">{args.cap:.0f} (stopped)"
                    entry[f"speedup_vs_{method}"] = f">{t_theirs / t_ours:.0f}"
                else:
                    entry[f"imagededup_{method}_s"] = round(t_theirs, 2)
                    entry[f"speedup_vs_{method}"] = round(t_theirs / t_ours, 1)
                    entry[f"same_pairs_as_{method}"] = p_ours == p_theirs
                print(entry, flush=True)
        search.append(entry)
        print(entry, flush=True)

    print("\nimage sets (same hashes, same threshold)")
    cols = [
        "set",
        "images",
        "drspot_search_s",
        "imagededup_search_s",
        "speedup",
        "pairs_drspot",
        "pairs_imagededup",
        "agreement",
        "recall_plain_search",
        "recall_drspot_pipeline",
        "false_pair_share_drspot_pipeline",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    print("\nsearch only, random hashes with planted pairs")
    for e in search:
        print(e)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "threshold": d,
        "image_sets": rows,
        "search_only": search,
        "speedup_search_1e5": next(
            (e.get("speedup_vs_brute_force_cython") for e in search if e["hashes"] == 10**5), None
        ),
        "speedup_search_1e5_vs_bktree": next(
            (e.get("speedup_vs_bktree") for e in search if e["hashes"] == 10**5), None
        ),
        "imagededup_cap_s": args.cap,
        "search_1e6_s": next((e["drspot_s"] for e in search if e["hashes"] == 10**6), None),
    }
    out = ROOT / "bench" / "results" / "dedup.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
