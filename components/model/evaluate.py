"""``drspot evaluate``: the classifier (and detector) judged on the frozen test split.

Everything a clinical reviewer asks for, written to ``evaluation.json``, an HTML report with
plots and a model card:

* accuracy, balanced accuracy, macro one-vs-rest AUC, Cohen's kappa, per-class precision /
  recall / F1, confusion matrix, ROC and PR curves, with bootstrap 95% intervals;
* the benign/malignant view (malignant classes from config): AUC, and sensitivity/specificity at
  a threshold chosen on the *validation* split for a target sensitivity (recall first);
* calibration: ECE and a reliability plot, before and after temperature scaling fitted on val;
* metrics per slice where the manifest has the columns (sex, age band, localization, source);
* Grad-CAM overlays for a sample of correct and wrong test cases;
* complexity: parameters, MACs, CPU latency at batch 1 and 16, for both models;
* robustness: the same metrics on corrupted copies of the test crops (blur, noise, brightness,
  JPEG) at set severities.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.data.manifest import DataError
from components.model.metrics import (
    adjustment_offsets,
    bootstrap,
    core_metrics,
    decide,
    ece,
    fit_temperature,
    malignant_prob,
    softmax,
    threshold_for_sensitivity,
    wilson,
)
from components.model.model_card import model_card, report_html
from infra.config import Config

CALIBRATION = "calibration.json"


# --- metrics -------------------------------------------------------------------------------------


# --- complexity ----------------------------------------------------------------------------------


def complexity(module, input_size: int, repeats: int) -> dict[str, float]:
    """Parameters, MACs (one image) and median CPU latency per image at batch 1 and 16."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module.eval()
    params = sum(p.numel() for p in module.parameters())
    x1 = torch.randn(1, 3, input_size, input_size)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            module(x1)
        macs = counter.get_total_flops() / 2
        out = {"parameters": int(params), "macs": float(macs)}
        for b in (1, 16):
            xb = torch.randn(b, 3, input_size, input_size)
            module(xb)  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                module(xb)
                times.append(time.perf_counter() - t)
            out[f"latency_ms_per_image_batch{b}"] = float(np.median(times) / b * 1000)
    return out


# --- robustness ----------------------------------------------------------------------------------


def corrupt(x: np.ndarray, kind: str, severity: float, seed: int) -> np.ndarray:
    """Corrupted copies of uint8 crops (N, S, S, 3)."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    if kind == "noise":
        return np.clip(x + rng.normal(0, severity * 255, x.shape), 0, 255).astype(np.uint8)
    if kind == "brightness":
        return np.clip(x.astype(np.float32) * severity, 0, 255).astype(np.uint8)
    out = []
    for a in x:
        img = Image.fromarray(a)
        if kind == "blur":
            img = img.filter(ImageFilter.GaussianBlur(severity))
        elif kind == "jpeg":
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(severity))
            img = Image.open(buf).convert("RGB")
        else:
            raise ValueError(f"unknown corruption {kind!r}")
        out.append(np.asarray(img))
    return np.stack(out)


# --- Grad-CAM ------------------------------------------------------------------------------------


def gradcam(model, x_norm, target: int) -> np.ndarray | None:
    """Grad-CAM of ``target`` on the last feature map; None for models without one (e.g. ViT)."""
    import torch

    feats = model.forward_features(x_norm)
    if feats.ndim != 4:
        return None
    feats.retain_grad()
    logits = model.forward_head(feats)
    model.zero_grad()
    logits[0, target].backward()
    w = feats.grad.mean((2, 3), keepdim=True)
    cam = torch.relu((w * feats).sum(1))[0].detach().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def _overlay(crop: np.ndarray, cam: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps
    from PIL import Image

    heat = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(crop.shape[:2][::-1], Image.BILINEAR)) / 255
    colour = colormaps["jet"](heat)[..., :3] * 255
    return (0.55 * crop + 0.45 * colour).astype(np.uint8)


# --- the step ------------------------------------------------------------------------------------


def _age_band(age: float | None) -> str | None:
    if age is None or age != age:
        return None
    return "<30" if age < 30 else "30-49" if age < 50 else "50-69" if age < 70 else "70+"


@dataclass
class Scored:
    """A classifier's calibrated predictions on the val and test splits of a split manifest."""

    model: Any
    config: dict[str, Any]
    rows: dict[str, list[dict[str, Any]]]
    arrays: dict[str, Any]
    logits: dict[str, np.ndarray]
    temperature: float
    threshold: float
    pv: np.ndarray
    pt: np.ndarray
    metrics: dict[str, Any]
    slices: list[dict[str, Any]]
    pred: np.ndarray  # the test crops' answered classes (the model's logit adjustment applied)


REPORT_SLICES = ("sex", "age_band", "localization", "source")


def slice_metrics(
    rows: list[dict[str, Any]],
    y: np.ndarray,
    p: np.ndarray,
    classes: list[str],
    malignant: list[str],
    threshold: float,
    columns,
    min_rows: int,
    pred: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The headline metrics per value of each column (``age_band`` from ``age``) with at least ``min_rows`` test
    crops: n, malignant n, accuracy, balanced accuracy, macro AUC, malignant sensitivity with its Wilson 95%
    interval. A column with one value is skipped (it is the whole split), except ``source``."""
    mal = np.isin(y, [classes.index(m) for m in malignant])
    flagged = malignant_prob(p, classes, malignant) >= threshold
    pred = p.argmax(1) if pred is None else pred
    out = []
    for col in columns:
        values: dict[str, list[int]] = {}
        for k, r in enumerate(rows):
            v = _age_band(r.get("age")) if col == "age_band" else r.get(col)
            if v is not None:
                values.setdefault(str(v), []).append(k)
        if len(values) < 2 and col != "source":
            continue
        for v, idx in sorted(values.items()):
            if len(idx) < min_rows:
                continue
            m = core_metrics(y[idx], p[idx], classes, malignant, threshold, pred=pred[idx])
            n_mal = int(mal[idx].sum())
            out.append(
                {
                    "column": col,
                    "value": v,
                    "n": len(idx),
                    "n_malignant": n_mal,
                    **{k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_auc", "malignant_sensitivity")},
                    "malignant_sensitivity_ci95": wilson(int((flagged[idx] & mal[idx]).sum()), n_mal),
                }
            )
    return out


def score(model_dir: str | Path, split_manifest: str | Path, dataset_dir: str | Path, cfg: Config) -> Scored:
    """Predict val and test, fit temperature and the malignant threshold on val, score test.

    This is what the gate needs to judge a model on a split manifest; :func:`evaluate` builds its
    report on it, and the gate uses it alone to re-judge a champion on a newer frozen test split.
    """
    import pyarrow.parquet as pq

    from components.model.classifier import load_arrays, load_model, predict

    model, mc = load_model(model_dir)
    classes, malignant = mc["classes"], mc["malignant"]
    cols = ["image_id", "path", "label", "boxes", "split", "source", "sex", "age", "localization"]
    # any other manifest column the gate slices by
    named = set(pq.read_schema(split_manifest).names)
    cols += [c for c in cfg.gate.slices.columns if c in named and c not in cols]
    rows = pq.read_table(split_manifest, columns=cols).to_pylist()
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("val", "test")}
    if not by_split["test"]:
        raise DataError(f"the test split of {split_manifest} is empty")
    arrays = {
        s: load_arrays(by_split[s], Path(dataset_dir), classes, mc["input_size"], mc["crop_margin"])
        for s in ("val", "test")
    }
    logits = {}
    for s, a in arrays.items():
        logits[s], _ = predict(model, a.x, mc["mean"], mc["std"], tta=mc.get("tta", False))
    yv, yt = arrays["val"].y, arrays["test"].y
    temperature = fit_temperature(logits["val"], yv) if len(yv) else 1.0
    pv, pt = softmax(logits["val"], temperature), softmax(logits["test"], temperature)
    y_mal_v = np.isin(yv, [classes.index(m) for m in malignant]).astype(int)
    threshold = threshold_for_sensitivity(
        y_mal_v, malignant_prob(pv, classes, malignant), cfg.evaluate.malignant_target_sensitivity
    )
    pred = decide(logits["test"], adjustment_offsets(mc))
    metrics = core_metrics(yt, pt, classes, malignant, threshold, cfg.evaluate.malignant_prevalence, pred)
    meta = {r["image_id"]: r for r in by_split["test"]}
    test_rows = [meta[i] for i in arrays["test"].image_ids]
    columns = list(dict.fromkeys([*REPORT_SLICES, *cfg.gate.slices.columns]))
    slices = slice_metrics(test_rows, yt, pt, classes, malignant, threshold, columns, cfg.evaluate.slice_min_rows, pred)
    return Scored(model, mc, by_split, arrays, logits, temperature, threshold, pv, pt, metrics, slices, pred)


def _robustness(model, mc, x, yt, temperature, threshold, corruptions, seed: int) -> list[dict[str, Any]]:
    """The answered figures on the test crops ``x`` under each corruption (``evaluate.robustness``: kind ->
    severities)."""
    from components.model.classifier import predict

    out = []
    for kind, severities in corruptions.items():
        for sev in severities:
            lc, _ = predict(model, corrupt(x, kind, sev, seed), mc["mean"], mc["std"], tta=mc.get("tta", False))
            pc = decide(lc, adjustment_offsets(mc))
            m = core_metrics(yt, softmax(lc, temperature), mc["classes"], mc["malignant"], threshold, pred=pc)
            out.append(
                {
                    "corruption": kind,
                    "severity": sev,
                    **{k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_auc", "malignant_sensitivity")},
                }
            )
    return out


def _plots(folder: Path, cm, yt, pt, classes, malignant, reliability, temperature, ece_before, ece_after) -> None:
    """The confusion matrix and the curves (ROC one vs rest and malignant, PR malignant, reliability) in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(folder / "confusion_matrix.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for k, c in enumerate(classes):
        if 0 < (yt == k).sum() < len(yt):
            fpr, tpr, _ = roc_curve(yt == k, pt[:, k])
            axes[0].plot(fpr, tpr, label=c)
    y_mal_t = np.isin(yt, [classes.index(m) for m in malignant]).astype(int)
    p_mal_t = malignant_prob(pt, classes, malignant)
    if 0 < y_mal_t.sum() < len(y_mal_t):
        fpr, tpr, _ = roc_curve(y_mal_t, p_mal_t)
        axes[0].plot(fpr, tpr, "k--", label="malignant")
        pr, rc, _ = precision_recall_curve(y_mal_t, p_mal_t)
        axes[1].plot(rc, pr, "k")
    axes[0].set(title="ROC (one vs rest)", xlabel="false positive rate", ylabel="true positive rate")
    axes[0].legend(fontsize=7)
    axes[1].set(title="PR, malignant vs benign", xlabel="recall", ylabel="precision")
    axes[2].plot([0, 1], [0, 1], ":", color="grey")
    axes[2].plot(
        [r["confidence"] for r in reliability],
        [r["accuracy"] for r in reliability],
        "o-",
        label=f"T={temperature:.2f}, ECE {ece_after:.3f} (was {ece_before:.3f})",
    )
    axes[2].set(title="reliability (calibrated)", xlabel="confidence", ylabel="accuracy")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=110)
    plt.close(fig)


def _gradcams(model, mc, test, yt, pred, classes, samples: int, folder: Path) -> list[str]:
    """Grad-CAM overlays of up to ``samples`` correct and ``samples`` wrong test crops, for the class the service
    answers (``pred``), written to ``folder``; their file names."""
    import torch
    from PIL import Image

    from components.data.preprocess import normalise

    folder.mkdir(exist_ok=True)
    cams = []
    for kind, idx in (("correct", np.flatnonzero(pred == yt)), ("wrong", np.flatnonzero(pred != yt))):
        for k in idx[:samples]:
            x = torch.from_numpy(normalise(test.x[k : k + 1], mc["mean"], mc["std"])).requires_grad_(False)
            cam = gradcam(model, x, int(pred[k]))
            if cam is None:
                break
            name = f"{kind}_{test.image_ids[k]}_{classes[yt[k]]}_as_{classes[pred[k]]}.png"
            Image.fromarray(_overlay(test.x[k], cam)).resize((128, 128)).save(folder / name)
            cams.append(name)
    return cams


def evaluate(
    model_dir: str | Path,
    split_manifest: str | Path,
    dataset_dir: str | Path,
    out_dir: str | Path,
    cfg: Config,
    detector_dir: str | Path | None = None,
    data_version: str | None = None,
) -> dict[str, Any]:
    """Evaluate the classifier in ``model_dir`` (and the detector in ``detector_dir``) on the test split."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    e = cfg.evaluate
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    sc = score(model_dir, split_manifest, dataset_dir, cfg)
    model, mc, by_split, arrays, logits = sc.model, sc.config, sc.rows, sc.arrays, sc.logits
    classes, malignant = mc["classes"], mc["malignant"]
    yv, yt = arrays["val"].y, arrays["test"].y
    temperature, threshold, pt, metrics = sc.temperature, sc.threshold, sc.pt, sc.metrics
    pred_t = sc.pred
    intervals = bootstrap(
        yt, pt, classes, malignant, threshold, e.n_bootstrap, cfg.seed, e.malignant_prevalence, pred_t
    )
    prec, rec, f1, support = precision_recall_fscore_support(yt, pred_t, labels=range(len(classes)), zero_division=0)
    npv = [  # one class against the rest: how often "not this class" is right
        float(((pred_t != k) & (yt != k)).sum() / max(1, (pred_t != k).sum())) for k in range(len(classes))
    ]
    per_class = [
        {
            "class": c,
            "precision": float(prec[k]),  # = PPV on the test split
            "recall": float(rec[k]),
            "f1": float(f1[k]),
            "npv": npv[k],
            "support": int(support[k]),
        }
        for k, c in enumerate(classes)
    ]
    ece_before, _ = ece(yt, softmax(logits["test"]), e.ece_bins)
    ece_after, reliability = ece(yt, pt, e.ece_bins)
    cm = confusion_matrix(yt, pred_t, labels=range(len(classes)))
    robustness = _robustness(model, mc, arrays["test"].x, yt, temperature, threshold, e.robustness, cfg.seed)
    _plots(out_dir / "plots", cm, yt, pt, classes, malignant, reliability, temperature, ece_before, ece_after)
    cams = _gradcams(model, mc, arrays["test"], yt, pred_t, classes, e.gradcam_samples, out_dir / "gradcam")

    cx = {"classifier": complexity(model, mc["input_size"], e.latency_repeats)}
    if detector_dir and (Path(detector_dir) / "detector.pt").is_file():
        from infra.env import ultralytics

        dc = json.loads((Path(detector_dir) / "detector_config.json").read_text())
        yolo = ultralytics().YOLO(str(Path(detector_dir) / "detector.pt"))
        cx["detector"] = complexity(yolo.model.float(), dc["imgsz"], e.latency_repeats)
        cx["detector"]["test_metrics"] = dc["metrics"]

    result = {
        "metrics": metrics,
        "intervals_95": intervals,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "classes": classes,
        "malignant": malignant,
        "malignant_threshold": threshold,
        "target_sensitivity": e.malignant_target_sensitivity,
        "temperature": temperature,
        "logit_adjustment": {  # what the answered classes gained over the plain argmax, on the test split
            **(mc.get("logit_adjustment") or {"tau": 0.0}),
            "test_balanced_accuracy_plain_argmax": core_metrics(yt, pt, classes, malignant, threshold)[
                "balanced_accuracy"
            ],
        },
        "ece_before": ece_before,
        "ece_after": ece_after,
        "reliability": reliability,
        "slices": sc.slices,
        "robustness": robustness,
        "complexity": cx,
        "gradcam": cams,
        "test_crops": int(len(yt)),
        "test_images": len(by_split["test"]),
        "val_crops": int(len(yv)),
        "data_version": data_version,
        "backbone": mc["backbone"],
        "input_size": mc["input_size"],
    }
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2, default=float))
    # the serving threshold and temperature; registration merges them into the registered model
    # (the trained model folder is a DVC stage output and is never modified here)
    (out_dir / CALIBRATION).write_text(
        json.dumps({"temperature": temperature, "malignant_threshold": threshold}, indent=2)
    )
    # what the monitor's label-free performance estimate (CBPE) calibrates on: served probabilities on validation
    from components.monitoring.quality import write_reference

    write_reference(out_dir, sc.pv, yv, classes, malignant, threshold)
    (out_dir / "model_card.md").write_text(model_card(result))
    cfg.write(out_dir / "config.yaml")  # the resolved configuration, beside the figures it produced
    report_html(out_dir, result)
    return result
