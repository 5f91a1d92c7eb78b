"""The backbone comparison (`drspot compare`, components/model/compare.py) on DermaMNIST's official splits.

Run:  .venv/bin/python bench/compare.py [--epochs N] [--size PX] [--backbones a,b,c] [--student NAME]

Ingests ../shared/data/dermamnist_28 with DrSpot's ingest and data gate (official splits kept), then trains every
backbone of `compare.backbones` (params.yaml; at least four, a MobileNet among them) the same way, from scratch,
on CPU, evaluates each on the official test split, averages them into an ensemble and trains the distilled
student on the ensemble's soft labels. Prints the table and writes bench/results/compare.json (the rows, the
settings, wall time) and bench/results/compare/ (git-ignored: compare.md, compare.html, each model's evaluation);
the run is logged to the project's MLflow store as one parent run with a child per model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from dermamnist import NPZ, prepare  # noqa: E402

import components  # noqa: E402,F401
from components.model.compare import compare, markdown  # noqa: E402
from infra.config import load_config  # noqa: E402

OUT = ROOT / "bench" / "results"


def settings(args: argparse.Namespace):
    """The demo profile with DermaMNIST's needs: official splits, whole 28 px images (no crop margin), a fixed
    number of epochs for every model (no early stop), the comparison's backbones."""
    base = load_config("demo")
    c = base.classifier
    classifier = c.model_copy(
        update={
            "input_size": args.size,
            "epochs": args.epochs,
            "batch_size": 128,
            "crop_margin": 0.0,
            "imbalance": "loss_weights",
            "early_stopping": c.early_stopping.model_copy(update={"patience": args.epochs}),
        }
    )
    comp = base.compare.model_copy(
        update={
            **({"backbones": args.backbones.split(",")} if args.backbones else {}),
            **({"student": args.student} if args.student else {}),
            "epochs": args.epochs,
        }
    )
    return base.model_copy(
        update={
            "split": base.split.model_copy(update={"source_split": "keep"}),
            "classifier": classifier,
            "compare": comp,
            "evaluate": base.evaluate.model_copy(update={"gradcam_samples": 1, "latency_repeats": 5}),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--backbones", help="comma-separated timm names (default: compare.backbones)")
    ap.add_argument("--student", help="the distilled student's backbone (default: compare.student)")
    args = ap.parse_args()
    if not NPZ.is_file():
        sys.exit(f"{NPZ} not found: this benchmark needs ../shared/data")
    cfg = settings(args)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        ds, split, _ = prepare(Path(tmp), cfg)
        t_data = time.monotonic() - t0
        out = OUT / "compare"
        shutil.rmtree(out, ignore_errors=True)
        result = compare(split, ds, out, cfg)
    for model in out.glob("*/model"):  # the tables and evaluations are the result; the weights are not kept
        shutil.rmtree(model)
    wall = time.monotonic() - t0
    summary = {
        "rows": result["rows"],
        "meta": result["meta"],
        "named_class": result["named_class"],
        "dataset": "DermaMNIST 28 px, official MedMNIST v2 splits",
        "settings": {
            "epochs": args.epochs,
            "input_size": args.size,
            "backbones": cfg.compare.backbones,
            "student": cfg.compare.student,
            "distillation": cfg.classifier.distillation.model_dump(include={"alpha", "temperature"}),
        },
        "data_s": round(t_data, 1),
        "wall_s": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    (OUT / "compare.json").write_text(json.dumps(summary, indent=2, default=float))
    print()
    print(markdown(result["rows"], result["named_class"]))
    print(f"wall {wall:.0f} s (data {t_data:.0f} s); MLflow run {result['meta']['mlflow run']}")


if __name__ == "__main__":
    main()
