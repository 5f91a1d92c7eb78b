"""Drift detection: false alarms on unshifted windows, detection rate per shift and window size.

Run:  .venv/bin/python bench/drift.py [--repeats 20] [--epochs 4] [--cache DIR]

``--cache DIR`` keeps the trained reference and every pool's rows in DIR, so a changed policy can be
judged again without retraining (features are recomputed only when DIR is empty).

Needs ../shared/data (DermaMNIST and the HAM10000 polygon set). In one run:
1. DermaMNIST's official train split is ingested and a classifier trained on it with the product's
   ``train_classifier`` (resnet18 at 32 px, a few epochs: the monitor needs its embedding and its
   training reference, not a good model), which writes the monitoring reference as in production;
2. every image of a pool is turned into the row the service would log (the quality features,
   size, the projected embedding, the predicted class and confidence; whole-image path, as
   DermaMNIST has no boxes): the held-out DermaMNIST test split as is (no shift), the same images
   through each shift at a mild and a moderate severity (brightness up, brightness down, blur,
   colour cast, JPEG quality), and a different real source, the HAM10000 photos of the polygon set;
3. windows of 50, 100, 200 and 500 rows are drawn from each pool (without replacement, 20 seeds)
   and judged by the product's ``components.monitoring.monitor.compare`` (Evidently 0.7, the ``monitor.*``
   policy of params.yaml).
Writes bench/results/drift.json: the full table, ``false_alarm_rate`` (all no-shift windows) and
``detection_rate_moderate_200`` (moderate shifts, windows of 200).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
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

SHARED = ROOT.parent / "shared" / "data"
NPZ = SHARED / "dermamnist_28" / "dermamnist_28_from_jpeg.npz"
HAM = SHARED / "ham10000_yolo_seg_roboflow"
WINDOWS = (50, 100, 200, 500)
# (mild, moderate) severity of each shift
SHIFTS = {
    "brighter": (1.1, 1.25),  # exposure gain
    "darker": (0.9, 0.75),
    "blur": (0.4, 0.8),  # Gaussian radius in pixels (of a 28 px image)
    "colour cast": ((1.04, 1.0, 0.96), (1.12, 0.97, 0.85)),  # RGB gains (the synthetic "other camera")
    "jpeg": (60, 25),  # JPEG quality
}


# the verdict's rules: key in drift.json -> key in compare()'s summary["rules_fired"]
RULES = {"image": "image features", "embedding": "embedding components", "prediction": "predicted class"}


def bench_config(epochs: int):
    """The demo profile with the classifier this benchmark trains (resnet18 at 32 px, whole images: DermaMNIST has
    no boxes); bench/quality_estimate.py trains the same one."""
    base = load_config("demo")
    update = {"input_size": 32, "epochs": epochs, "batch_size": 128, "crop_margin": 0.0}
    return base.model_copy(update={"classifier": base.classifier.model_copy(update=update)})


def shift(img, kind: str, s):
    from PIL import Image, ImageFilter

    if kind in ("brighter", "darker"):
        return Image.fromarray(np.clip(np.asarray(img, np.float32) * s, 0, 255).astype(np.uint8))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(s))
    if kind == "colour cast":
        return Image.fromarray(np.clip(np.asarray(img, np.float32) * np.array(s), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=s)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def rows_for(images, model, mc, projection):
    """The monitor's columns for PIL images (whole-image path: DermaMNIST has no boxes)."""
    from components.monitoring.reference import features

    return features(((im, None) for im in images), model, mc, projection)[0]


def build_pools(cfg) -> dict:
    """Train the classifier on DermaMNIST's train split (validation split held out); the reference it
    stores ("reference") and the monitor's rows of every pool."""
    from PIL import Image

    from components.data.ingest import ingest
    from components.model.classifier import load_model
    from components.model.train_classifier import train_classifier
    from components.monitoring import reference

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = tmp / "derma"
        ingest("medmnist", NPZ, ds, cfg)  # the official split; the gate is not what is measured here
        train_classifier(ds / "manifest.parquet", ds, tmp / "model", cfg, progress=lambda m: None)
        model, mc = load_model(tmp / "model")
        stored, projection = reference.load(tmp / "model")
        import pyarrow.parquet as pq

        manifest = pq.read_table(ds / "manifest.parquet").to_pylist()

        def split(name):
            return [Image.open(ds / r["path"]).convert("RGB") for r in manifest if r["split"] == name]

        frames = {"reference": stored}
        originals = split("test")
        frames["no shift"] = rows_for(originals, model, mc, projection)
        for kind, (mild, moderate) in SHIFTS.items():
            for level, s in (("mild", mild), ("moderate", moderate)):
                frames[f"{kind} ({level})"] = rows_for([shift(im, kind, s) for im in originals], model, mc, projection)
        ham = sorted(glob.glob(str(HAM / "*" / "images" / "*.jpg")))
        frames["HAM10000 photos (other source)"] = rows_for(
            [Image.open(p).convert("RGB") for p in ham], model, mc, projection
        )
    return frames


def save_cache(folder: Path, frames: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(frames)
    for i, name in enumerate(names):
        frames[name].to_parquet(
            folder / ("reference.parquet" if name == "reference" else f"{i:02d}.parquet"), index=False
        )
    (folder / "names.json").write_text(json.dumps(names))


def load_cache(folder: Path) -> dict:
    import pandas as pd

    names = json.loads((folder / "names.json").read_text())
    return {
        n: pd.read_parquet(folder / ("reference.parquet" if n == "reference" else f"{i:02d}.parquet"))
        for i, n in enumerate(names)
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument(
        "--reference",
        choices=["stored", "train", "val"],
        default="stored",
        help="the reference the model stores (image features of the training images, model outputs on the "
        "validation images) or, as an experiment, every column from the training (or validation) images",
    )
    ap.add_argument("--only", help="run only conditions whose name contains this (e.g. 'no shift')")
    ap.add_argument(
        "--cache",
        type=Path,
        help="keep the reference and the pools' rows in this folder and reuse them (to re-judge a new policy "
        "without retraining)",
    )
    args = ap.parse_args()
    if not NPZ.is_file() or not HAM.is_dir():
        sys.exit(f"{NPZ} or {HAM} not found: this benchmark needs ../shared/data")
    from components.monitoring.monitor import compare

    cfg = bench_config(args.epochs)
    t0 = time.monotonic()
    cached = args.cache and (args.cache / "reference.parquet").is_file()
    frames = load_cache(args.cache) if cached else build_pools(cfg)
    if args.cache and not cached:
        save_cache(args.cache, frames)
    stored = frames.pop("reference")
    ref = stored if args.reference == "stored" else stored[stored["part"] == args.reference].drop(columns="part")
    pools = frames
    t_pools = time.monotonic() - t0
    table = []
    for name, pool in pools.items():
        if args.only and args.only not in name:
            continue
        row = {"condition": name, "pool": len(pool), "by_rule": {}}
        for n in WINDOWS:
            hits, rules = 0, dict.fromkeys(RULES, 0)
            for k in range(args.repeats):
                idx = np.random.default_rng(1000 * n + k).choice(len(pool), size=min(n, len(pool)), replace=False)
                summary, _ = compare(ref, pool.iloc[idx].reset_index(drop=True), cfg, report=False)
                hits += summary["drift"]
                for rule, name in RULES.items():
                    rules[rule] += summary["rules_fired"][name]
            row[str(n)] = hits / args.repeats
            row["by_rule"][str(n)] = {rule: v / args.repeats for rule, v in rules.items()}
        table.append(row)
        print(f"{name:<32} " + "  ".join(f"n={n}: {row[str(n)]:.2f}" for n in WINDOWS), flush=True)
    wall = time.monotonic() - t0

    false_alarm = table[0]
    moderate = [r for r in table if "(moderate)" in r["condition"]]
    result = {
        "false_alarm_rate": float(np.mean([false_alarm[str(n)] for n in WINDOWS])),
        "false_alarm_rate_by_window": {str(n): false_alarm[str(n)] for n in WINDOWS},
        "detection_rate_moderate_200": float(np.mean([r["200"] for r in moderate])) if moderate else None,
        "table": table,
        "reference_rows": len(ref),
        "repeats": args.repeats,
        "policy": cfg.monitor.model_dump(),
        "shifts": {k: {"mild": v[0], "moderate": v[1]} for k, v in SHIFTS.items()},
        "classifier": {
            "backbone": cfg.classifier.backbone,
            "input_size": cfg.classifier.input_size,
            "epochs": args.epochs,
        },
        "seconds": {"train_and_features": round(t_pools, 1), "total": round(wall, 1)},
        "cached_pools": bool(cached),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    result["reference"] = args.reference
    if args.reference != "stored" or args.only:  # experiments do not overwrite the benchmark's figures
        out = ROOT / "bench" / "results" / f"drift_{args.reference}_{(args.only or 'all').replace(' ', '_')}.json"
    else:
        out = ROOT / "bench" / "results" / "drift.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print("\n| condition | " + " | ".join(f"window {n}" for n in WINDOWS) + " |")
    print("|---|" + "---|" * len(WINDOWS))
    for r in table:
        print(f"| {r['condition']} | " + " | ".join(f"{r[str(n)]:.2f}" for n in WINDOWS) + " |")
    print("\nshare of windows of 200 called drift by each rule (image features / embedding / predicted class):")
    for r in table:
        by = r["by_rule"]["200"]
        print(f"  {r['condition']:<32} " + " / ".join(f"{by[k]:.2f}" for k in RULES))
    print(f"\nfalse alarm rate (no shift, all windows): {result['false_alarm_rate']:.3f} (goal <= 0.05)")
    if moderate:
        print(
            f"detection rate, moderate shifts, window 200: {result['detection_rate_moderate_200']:.3f} (goal >= 0.95)"
        )
    print(f"wrote {out} ({wall:.0f}s)")


if __name__ == "__main__":
    main()
