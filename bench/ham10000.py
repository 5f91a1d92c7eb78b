"""The full HAM10000 (10,015 images at 200x150, a real lesion box each) through DrSpot's own ingest, data gate,
detector and classifier training and evaluation, on the lesion-grouped test split; the same classifier trained
from scratch in the same run is the baseline.

Run:  .venv/bin/python bench/ham10000.py [--epochs N] [--size PX] [--backbone NAME] [--no-scratch] [--cache DIR]

The `ham10000` profile of params.yaml is the recipe (an ImageNet-pretrained EfficientNet-Lite0 from the offline
weight source, LP-FT; YOLOv8n from scratch on a share of the training images); options override it. Writes
bench/results/ham10000.json: acc, bacc, macro_auc, malignant_auc, malignant_sensitivity, malignant_specificity
(at the threshold chosen on validation for sensitivity >= evaluate.malignant_target_sensitivity), map50, map50_95,
wall_s, and the scratch baseline's figures under "scratch".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import components  # noqa: E402,F401
from components.data import gate  # noqa: E402
from components.data.ingest import ingest  # noqa: E402
from components.model.evaluate import evaluate  # noqa: E402
from components.model.train_classifier import train_classifier  # noqa: E402
from components.model.train_detector import train_detector  # noqa: E402
from infra.config import load_config  # noqa: E402

SRC = ROOT.parent / "shared" / "data" / "ham10000_200x150"
KEYS = ("accuracy", "balanced_accuracy", "macro_auc", "malignant_auc", "malignant_pauc80")
KEYS += ("malignant_sensitivity", "malignant_specificity", "malignant_ppv", "malignant_npv")
SHORT = {"accuracy": "acc", "balanced_accuracy": "bacc"}
ANCHORS = [
    {"model": "seed 000 (HAM10000, 7 classes)", "acc": 0.87},
    {"model": "seed 001 binary ResNet50 (ImageNet)", "malignant_auc": 0.8585, "malignant_sensitivity": 0.818},
    {"model": "ISIC 2018 Task 3 best without external data (full resolution, GPU ensembles)", "bacc": 0.845},
]
REQUIRED = {"bacc": 0.70, "malignant_auc": 0.92, "wall_s": 1800}  # issue 23 (0.60 / 0.88 before)
GOAL = {"acc": 0.85, "bacc": 0.75, "mel_recall": 0.70, "malignant_sensitivity": 0.90, "map50": 0.95}


def figures(ev: dict) -> dict:
    """The headline figures, melanoma recall and the per-class recall, and what the logit adjustment gave (the
    test balanced accuracy of the plain argmax, the tau chosen on validation)."""
    recall = {r["class"]: r["recall"] for r in ev["per_class"]}
    adj = ev.get("logit_adjustment") or {}
    return {
        **{SHORT.get(k, k): ev["metrics"][k] for k in KEYS},
        "mel_recall": recall.get("mel"),
        "recall_per_class": recall,
        "bacc_plain_argmax": adj.get("test_balanced_accuracy_plain_argmax"),
        "logit_adjustment_tau": adj.get("tau"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, help="classifier epochs (default: the ham10000 profile)")
    ap.add_argument("--size", type=int, help="classifier input size in px")
    ap.add_argument("--backbone", help="timm backbone (pretrained weights from components/model/weights.py)")
    ap.add_argument("--det-epochs", type=int, help="detector epochs")
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch baseline")
    ap.add_argument("--no-detector", action="store_true", help="skip the detector")
    ap.add_argument("--cache", type=Path, help="keep the ingested, gated dataset here and reuse it")
    args = ap.parse_args()
    if not (SRC / "lesion_boxes.csv").is_file():
        sys.exit(f"{SRC} not found: this benchmark needs ../shared/data")
    base = load_config("ham10000")
    clf = base.classifier.model_copy(
        update={
            k: v for k, v in {"epochs": args.epochs, "input_size": args.size, "backbone": args.backbone}.items() if v
        }
    )
    det = base.detector.model_copy(update={"epochs": args.det_epochs} if args.det_epochs else {})
    cfg = base.model_copy(update={"classifier": clf, "detector": det})
    scratch = cfg.model_copy(
        update={
            "classifier": clf.model_copy(
                update={"pretrained": False, "lp_ft": clf.lp_ft.model_copy(update={"enabled": False})}
            )
        }
    )
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.monotonic() - since, 1)
        print(f"== {name}: {timings[name]:.0f}s", flush=True)
        return time.monotonic()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.cache or Path(tmp)
        ds, prep = work / "ham", work / "prep"
        split = prep / "split" / "split.parquet"
        t = time.monotonic()
        if not split.is_file():
            r = ingest("ham10000", SRC / "HAM10000_metadata.csv", ds, cfg, boxes=SRC / "lesion_boxes.csv")
            print(f"ingested {r.rows} rows, problems {r.problem_counts() or 'none'}", flush=True)
            t = lap("ingest", t)
            gate.run_validate(ds, prep, cfg)
            gate.run_dedup(ds, prep, cfg)
            report = gate.run_split(ds, prep, cfg).report
            print(f"split {report['rows_per_split']}, leakage {report['leakage']}", flush=True)
            t = lap("gate", t)
        det_metrics = {}
        if not args.no_detector:
            d = train_detector(split, ds, work / "detector", cfg)
            det_metrics = d["metrics"]
            t = lap("detector", t)
        mc = train_classifier(split, ds, work / "classifier", cfg, resume=False)["model_config"]
        t = lap("classifier", t)
        ev = evaluate(work / "classifier", split, ds, ROOT / "bench" / "results" / "ham10000_eval", cfg)
        t = lap("evaluate", t)
        wall = time.monotonic() - t0
        base_figures = None
        if not args.no_scratch:
            train_classifier(split, ds, work / "scratch", scratch, resume=False)
            ev_s = evaluate(work / "scratch", split, ds, work / "scratch_eval", scratch)
            t = lap("scratch baseline", t)
            base_figures = figures(ev_s)

    out = ROOT / "bench" / "results" / "ham10000.json"
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    scratch_note = "this run"
    if base_figures is None and earlier.get("scratch"):  # --no-scratch: the last measured baseline, said so
        base_figures, scratch_note = earlier["scratch"], earlier.get("scratch_measured", "an earlier run")
    result = {
        **figures(ev),
        "map50": det_metrics.get("map50"),
        "map50_95": det_metrics.get("map50_95"),
        "wall_s": round(wall, 1),
        "timings_s": timings,
        "test_crops": ev["test_images"],
        "malignant_threshold": ev["malignant_threshold"],
        # the test-time views the model serves with (classifier.tta_choices: chosen on validation)
        "tta": mc["tta"],
        "tta_val_balanced_accuracy": mc["logit_adjustment"].get("tta_val_balanced_accuracy"),
        "recipe": {"classifier": cfg.classifier.model_dump(), "detector": cfg.detector.model_dump()},
        "scratch": base_figures,
        "scratch_measured": scratch_note if base_figures else None,
        "required": REQUIRED,
        "goal": GOAL,
        "anchors": ANCHORS,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    result["meets_required"] = (
        result["bacc"] >= REQUIRED["bacc"] and result["malignant_auc"] >= REQUIRED["malignant_auc"] and wall <= 1800
    )
    out.write_text(json.dumps(result, indent=2, default=float))
    cols = (
        "acc",
        "bacc",
        "macro_auc",
        "malignant_auc",
        "malignant_pauc80",
        "malignant_sensitivity",
        "malignant_specificity",
    )
    print("\nmodel | " + " | ".join(cols) + " | mAP50 | wall s")
    c = cfg.classifier
    name = f"DrSpot {c.backbone} @ {c.input_size}px, {c.epochs} ep, pretrained"
    print(
        f"{name} | "
        + " | ".join(f"{result[k]:.3f}" for k in cols)
        + f" | {result['map50'] or float('nan'):.3f} | {wall:.0f}"
    )
    if base_figures:
        print(f"same, from scratch ({scratch_note}) | " + " | ".join(f"{base_figures[k]:.3f}" for k in cols) + " | | ")
    print(
        f"BACC {result['bacc']:.3f} (plain argmax {result['bacc_plain_argmax'] or float('nan'):.3f}, logit adjustment "
        f"tau {result['logit_adjustment_tau']}; test-time views {result['tta']}, validation BACC by views "
        f"{result['tta_val_balanced_accuracy']}); melanoma recall {result['mel_recall']:.3f}; recall per class "
        + ", ".join(f"{k} {v:.3f}" for k, v in result["recall_per_class"].items())
    )
    print(
        f"required BACC>={REQUIRED['bacc']}, malignant AUC>={REQUIRED['malignant_auc']} in <=1800 s: "
        f"{'met' if result['meets_required'] else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
