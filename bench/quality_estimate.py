"""Does the label-free estimate (CBPE, components/monitoring/quality.py) track the measured accuracy under real
shifts, and how
many confirmed labels does the measured rule need to fire on a real drop in malignant sensitivity?

Real data: DermaMNIST (HAM10000 dermoscopy at 28 px, its official splits). A classifier is trained on the train
split as in bench/drift.py; the evaluation's temperature and malignant threshold are fitted on the validation
split, which is also CBPE's reference (what the monitor reads from ``performance_reference.npz``). The test split
is then served as is and through every shift of bench/drift.py (mild and moderate). Per window of ``--window``
predictions (``--repeats`` random windows per condition): measured accuracy (the labels), CBPE's estimate (no
labels) and, when NannyML is installed (``pip install .[quality-check]``), NannyML's own CBPE on the same window.

The rule: confirmations arrive one at a time in random order; the rule of ``monitor.quality`` (the newest
``last_cases``, judged from ``min_malignant`` malignant cases, fires when the 95% upper bound of malignant
sensitivity is under ``sensitivity_floor``) is evaluated after each; reported: the labels it took to fire on the
conditions whose true sensitivity is under the floor, and how often it fired within ``--stream`` labels where the
true sensitivity is above it (false alarms).

Writes bench/results/quality_estimate.json with ``mae`` (mean absolute error of the estimate over all windows;
goal <= 0.05) and ``labels_to_fire`` (median over streams, per dropped condition).
Run: .venv/bin/python bench/quality_estimate.py [--epochs 4] [--window 200] [--repeats 20]
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(ROOT / "bench"))
from drift import NPZ, SHIFTS, bench_config, shift  # noqa: E402


def conditions(cfg, epochs: int):
    """Train on DermaMNIST; the performance reference (val) and the served probabilities of every test condition."""
    from PIL import Image

    from components.data.ingest import ingest
    from components.data.preprocess import to_uint8
    from components.model.classifier import predict
    from components.model.evaluate import score
    from components.model.metrics import malignant_prob, softmax
    from components.model.train_classifier import train_classifier

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = tmp / "derma"
        ingest("medmnist", NPZ, ds, cfg)
        train_classifier(ds / "manifest.parquet", ds, tmp / "model", cfg, progress=lambda m: None)
        sc = score(tmp / "model", ds / "manifest.parquet", ds, cfg)
        mc, classes, malignant = sc.config, sc.config["classes"], sc.config["malignant"]
        ref = {
            "p": sc.pv,
            "y": sc.arrays["val"].y,
            "classes": classes,
            "malignant": malignant,
            "threshold": sc.threshold,
        }
        test = sc.rows["test"]
        originals = [Image.open(ds / r["path"]).convert("RGB") for r in test if r["label"] in classes]
        y = sc.arrays["test"].y
        out = {"no shift": sc.pt}
        for kind, (mild, moderate) in SHIFTS.items():
            for level, s in (("mild", mild), ("moderate", moderate)):
                x = np.stack(
                    [to_uint8(shift(im, kind, s), None, mc["crop_margin"], mc["input_size"]) for im in originals]
                )
                logits, _ = predict(sc.model, x, mc["mean"], mc["std"], tta=mc.get("tta", False))
                out[f"{kind} ({level})"] = softmax(logits, sc.temperature)
    mal = [classes.index(m) for m in malignant]
    return ref, y, out, lambda p: malignant_prob(p, classes, malignant) >= sc.threshold, mal


def nannyml_estimates(ref, windows: list[np.ndarray]) -> list[float] | None:
    """NannyML's CBPE (multiclass accuracy) on each window, fitted on the same reference; None if not installed."""
    import os

    os.environ["NML_DISABLE_USAGE_LOGGING"] = "1"  # NannyML otherwise reports usage to segment.io (offline here)
    try:
        import nannyml as nml
    except ImportError:
        return None
    import pandas as pd

    classes = ref["classes"]
    cols = {c: f"p_{c}" for c in classes}

    def frame(p, y=None):
        df = pd.DataFrame(p, columns=[cols[c] for c in classes])
        df["pred"] = [classes[k] for k in p.argmax(1)]
        if y is not None:
            df["y"] = [classes[k] for k in y]
        return df

    est = nml.CBPE(
        problem_type="classification_multiclass",
        y_pred_proba=cols,
        y_pred="pred",
        y_true="y",
        metrics=["accuracy"],
        chunk_number=1,
    )
    est.fit(frame(ref["p"], ref["y"]))
    out = []
    for p in windows:
        res = est.estimate(frame(p)).filter(period="analysis").to_df()
        out.append(float(res[("accuracy", "value")].iloc[0]))
    return out


def labels_to_fire(order, y_mal, flagged, q) -> int | None:
    """Confirmations in ``order``: after how many the rule fires (None: not within the stream)."""
    from components.model.metrics import wilson

    for n in range(1, len(order) + 1):
        last = order[max(0, n - q.last_cases) : n]
        pos = last[y_mal[last]]
        if len(pos) < q.min_malignant:
            continue
        if wilson(int(flagged[pos].sum()), len(pos))[1] < q.sensitivity_floor:
            return n
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--stream", type=int, default=1000, help="confirmations per simulated stream")
    ap.add_argument("--streams", type=int, default=50)
    args = ap.parse_args()
    if not NPZ.is_file():
        sys.exit(f"{NPZ} not found: this benchmark needs ../shared/data")
    from components.monitoring import quality

    cfg = bench_config(args.epochs)
    q = cfg.monitor.quality
    t0 = time.monotonic()
    ref, y, pools, flag_of, mal = conditions(cfg, args.epochs)
    t_train = time.monotonic() - t0
    model = quality.fit(ref)
    y_mal = np.isin(y, mal)
    rng = np.random.default_rng(0)
    table, errors, nml_errors, ours_vs_nml = [], [], [], []
    for name, p in pools.items():
        flagged = flag_of(p)
        windows = [rng.choice(len(p), size=min(args.window, len(p)), replace=False) for _ in range(args.repeats)]
        measured = [float((p[w].argmax(1) == y[w]).mean()) for w in windows]
        estimated = [quality.estimate(model, p[w], flagged[w])["accuracy"] for w in windows]
        nml = nannyml_estimates(ref, [p[w] for w in windows])
        err = [abs(a - b) for a, b in zip(measured, estimated, strict=True)]
        errors += err
        true_sens = float(flagged[y_mal].mean())
        row = {
            "condition": name,
            "measured_accuracy": round(float(np.mean(measured)), 4),
            "estimated_accuracy": round(float(np.mean(estimated)), 4),
            "mae": round(float(np.mean(err)), 4),
            "malignant_sensitivity": round(true_sens, 4),
            "estimated_sensitivity": round(quality.estimate(model, p, flagged)["malignant_sensitivity"], 4),
        }
        if nml is not None:
            nml_err = [abs(a - b) for a, b in zip(measured, nml, strict=True)]
            nml_errors += nml_err
            ours_vs_nml += [abs(a - b) for a, b in zip(estimated, nml, strict=True)]
            row |= {"nannyml_accuracy": round(float(np.mean(nml)), 4), "nannyml_mae": round(float(np.mean(nml_err)), 4)}
        # the label rule on streams of confirmations from this condition
        fired = []
        for k in range(args.streams):
            order = np.random.default_rng(10_000 + k).permutation(len(p))[: args.stream]
            fired.append(labels_to_fire(order, y_mal, flagged, q))
        hits = [f for f in fired if f is not None]
        row["rule_fired_share"] = round(len(hits) / len(fired), 3)
        row["labels_to_fire_median"] = int(np.median(hits)) if hits else None
        table.append(row)
        print(
            f"{name:<24} measured {row['measured_accuracy']:.3f} estimated {row['estimated_accuracy']:.3f} "
            f"(mae {row['mae']:.3f}"
            + (f"; nannyml {row['nannyml_accuracy']:.3f}, mae {row['nannyml_mae']:.3f}" if nml is not None else "")
            + f") sens {true_sens:.3f} (est {row['estimated_sensitivity']:.3f}) rule fired "
            f"{row['rule_fired_share']:.0%} median labels {row['labels_to_fire_median']}",
            flush=True,
        )
    dropped = [r for r in table if r["malignant_sensitivity"] < q.sensitivity_floor]
    kept = [r for r in table if r["malignant_sensitivity"] >= q.sensitivity_floor]
    result = {
        "mae": round(float(np.mean(errors)), 4),
        "mae_goal": 0.05,
        "nannyml_mae": round(float(np.mean(nml_errors)), 4) if nml_errors else None,
        "ours_vs_nannyml_mean_abs_diff": round(float(np.mean(ours_vs_nml)), 4) if ours_vs_nml else None,
        "labels_to_fire": {r["condition"]: r["labels_to_fire_median"] for r in dropped},
        "false_alarm_share": {r["condition"]: r["rule_fired_share"] for r in kept},
        "rule": q.model_dump(),
        "window": args.window,
        "repeats": args.repeats,
        "stream": args.stream,
        "streams": args.streams,
        "epochs": args.epochs,
        "train_and_predict_s": round(t_train, 1),
        "wall_s": round(time.monotonic() - t0, 1),
        "table": table,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    out = ROOT / "bench" / "results" / "quality_estimate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        f"\nCBPE accuracy estimate: mae {result['mae']:.4f} over {len(errors)} windows of {args.window} (goal <= 0.05)"
    )
    if result["nannyml_mae"] is not None:
        print(
            f"NannyML CBPE: mae {result['nannyml_mae']:.4f}; "
            f"|ours - NannyML| {result['ours_vs_nannyml_mean_abs_diff']:.4f}"
        )
    else:
        print("NannyML not installed (pip install .[quality-check]): not compared")
    print(f"labels to fire (median) where sensitivity fell under {q.sensitivity_floor}: {result['labels_to_fire']}")
    print(f"rule fired within {args.stream} labels where it did not fall (false alarms): {result['false_alarm_share']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
