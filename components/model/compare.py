"""``drspot compare``: several classifier backbones trained the same way on the same split, the distilled student
of their ensemble, and one table of what a clinician-facing study reports about each.

Every backbone is trained by :func:`components.model.train_classifier.train_classifier` with the configuration in force
(only ``classifier.backbone`` differs) and evaluated by :func:`components.model.evaluate.evaluate` on the test split, so
the figures are the ones a registered model would carry: ACC, macro F1 / precision / recall, the F1 of the named
class (``compare.named_class``), macro one-vs-rest AUROC, Cohen's kappa, the median CPU latency per image at batch
1, parameters, MACs, and the mean accuracy under the corruption set (``evaluate.robustness``) with its ratio to
the clean accuracy. The ensemble (the backbones' calibrated probabilities averaged) gets a row of its own, and the
student (``compare.student``) is trained on the ensemble's soft labels (``classifier.distillation``). The table is
written as markdown, HTML and JSON, and logged to MLflow as one parent run with a child run per model.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from infra.config import Config

COLUMNS = [
    ("model", "model", "{}"),
    ("acc", "ACC", "{:.3f}"),
    ("macro_f1", "macro F1", "{:.3f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("named_f1", "F1 ({named})", "{:.3f}"),
    ("auroc", "AUROC", "{:.3f}"),
    ("kappa", "kappa", "{:.3f}"),
    ("latency_ms", "CPU ms/img (batch 1)", "{:.2f}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("mmacs", "MMACs", "{:.1f}"),
    ("corrupted_acc", "ACC corrupted", "{:.3f}"),
    ("robustness", "corrupted / clean", "{:.2f}"),
    ("train_s", "train s", "{:.0f}"),
]


class CompareError(ValueError):
    """A comparison that cannot run as configured (what and where)."""


def _with(cfg: Config, **classifier: Any) -> Config:
    return cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update=classifier)})


def row(name: str, ev: dict[str, Any], named: str, train_s: float | None) -> dict[str, Any]:
    """One line of the table from an evaluation (:func:`components.model.evaluate.evaluate`'s result)."""
    m, per = ev["metrics"], {c["class"]: c for c in ev["per_class"]}
    cx = ev["complexity"]["classifier"]
    corrupted = [r["accuracy"] for r in ev["robustness"]]
    mean_corrupted = float(np.mean(corrupted)) if corrupted else float("nan")
    return {
        "model": name,
        "backbone": ev["backbone"],
        "acc": m["accuracy"],
        "macro_f1": float(np.mean([c["f1"] for c in ev["per_class"]])),
        "precision": float(np.mean([c["precision"] for c in ev["per_class"]])),
        "recall": float(np.mean([c["recall"] for c in ev["per_class"]])),
        "named_f1": per[named]["f1"],
        "auroc": m["macro_auc"],
        "kappa": m["kappa"],
        "latency_ms": cx.get("latency_ms_per_image_batch1", float("nan")),
        "params_m": cx["parameters"] / 1e6,
        "mmacs": cx.get("macs", float("nan")) / 1e6,
        "corrupted_acc": mean_corrupted,
        "robustness": mean_corrupted / m["accuracy"] if m["accuracy"] else float("nan"),
        "train_s": train_s,
        "balanced_accuracy": m["balanced_accuracy"],
        "malignant_sensitivity": m["malignant_sensitivity"],
        "malignant_specificity": m["malignant_specificity"],
    }


def ensemble_row(
    names: list[str], model_dirs: list[Path], split: Path, dataset: Path, cfg: Config, named: str, rows: list[dict]
) -> dict[str, Any]:
    """The backbones' calibrated test probabilities averaged: what the student learns from."""
    from sklearn.metrics import precision_recall_fscore_support

    from components.model.evaluate import score
    from components.model.metrics import core_metrics

    scored = [score(d, split, dataset, cfg) for d in model_dirs]
    first = scored[0]
    classes, malignant = first.config["classes"], first.config["malignant"]
    y = first.arrays["test"].y
    p = np.mean([s.pt for s in scored], axis=0)
    m = core_metrics(y, p, classes, malignant, float(np.mean([s.threshold for s in scored])))
    prec, rec, f1, _ = precision_recall_fscore_support(y, p.argmax(1), labels=range(len(classes)), zero_division=0)
    by_name = {r["model"]: r for r in rows}
    members = [by_name[n] for n in names]
    return {
        "model": f"ensemble of {len(names)}",
        "backbone": "+".join(r["backbone"] for r in members),
        "acc": m["accuracy"],
        "macro_f1": float(f1.mean()),
        "precision": float(prec.mean()),
        "recall": float(rec.mean()),
        "named_f1": float(f1[classes.index(named)]),
        "auroc": m["macro_auc"],
        "kappa": m["kappa"],
        "latency_ms": sum(r["latency_ms"] for r in members),
        "params_m": sum(r["params_m"] for r in members),
        "mmacs": sum(r["mmacs"] for r in members),
        "corrupted_acc": float("nan"),  # not re-run: each member's own row has it
        "robustness": float("nan"),
        "train_s": sum(r["train_s"] or 0 for r in members),
        "balanced_accuracy": m["balanced_accuracy"],
        "malignant_sensitivity": m["malignant_sensitivity"],
        "malignant_specificity": m["malignant_specificity"],
    }


def _cell(fmt: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return fmt.format(v)


def markdown(rows: list[dict[str, Any]], named: str) -> str:
    head = [title.format(named=named) for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(fmt, r.get(key)) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def html_table(rows: list[dict[str, Any]], named: str, meta: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(title.format(named=named))}</th>" for _, title, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(fmt, r.get(key)))}</td>" for key, _, fmt in COLUMNS) + "</tr>"
        for r in rows
    )
    facts = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in meta.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>DrSpot backbone comparison</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:1.5rem}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccd;padding:.3rem .6rem;text-align:right}td:first-child{text-align:left}"
        "</style></head><body><h1>Backbone comparison</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><ul>{facts}</ul></body></html>"
    )


def compare(
    split: str | Path,
    dataset: str | Path,
    out_dir: str | Path,
    cfg: Config,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and evaluate ``compare.backbones`` and the distilled student on one split; write the table.

    Raises:
        CompareError: no backbones, an unknown backbone or named class, before any training.
        TrainingError / DataError: as training raises them.
    """
    import mlflow
    from components.model import registry
    from components.model.classifier import check_backbone
    from components.model.evaluate import evaluate
    from components.model.train_classifier import train_classifier

    c = cfg.compare
    split, dataset, out = Path(split), Path(dataset), Path(out_dir)
    names = list(c.backbones)
    if not names:
        raise CompareError("compare.backbones is empty: name at least one timm backbone")
    if c.named_class not in cfg.classes.names:
        raise CompareError(f"compare.named_class {c.named_class!r} is not one of {', '.join(cfg.classes.names)}")
    for b in names + ([c.student] if c.distill else []):
        check_backbone(b)  # every name checked before the first model trains
    if c.distill and len(names) < 2:
        raise CompareError("compare.distill needs at least two backbones to form an ensemble")
    # the same recipe for every backbone: from scratch (offline pretrained weights exist for few of them)
    base = _with(cfg, **({"epochs": c.epochs} if c.epochs else {}), pretrained=False)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    dirs: list[Path] = []
    registry.use_experiment(registry.EXPERIMENT)
    with mlflow.start_run(run_name="compare", tags={"kind": "compare", "backbones": ",".join(names)}) as parent:
        mlflow.log_params({"split": str(split), "named_class": c.named_class, "epochs": base.classifier.epochs})

        def one(name: str, run_cfg: Config) -> dict[str, Any]:
            folder = out / name
            progress(f"compare: training {name} ({run_cfg.classifier.backbone})")
            t0 = time.monotonic()
            train_classifier(split, dataset, folder / "model", run_cfg, progress=lambda m: None)
            train_s = time.monotonic() - t0
            ev = evaluate(folder / "model", split, dataset, folder / "evaluation", run_cfg)
            r = row(name, ev, c.named_class, train_s)
            with mlflow.start_run(run_name=name, nested=True, tags={"kind": "compare-member"}):
                mlflow.log_params({"backbone": run_cfg.classifier.backbone, "distilled": name == "student"})
                mlflow.log_metrics({k: float(v) for k, v in r.items() if isinstance(v, int | float) and np.isfinite(v)})
                mlflow.log_artifacts(str(folder / "evaluation"), artifact_path="evaluation")
            progress(
                f"compare: {name}: ACC {r['acc']:.3f}, macro F1 {r['macro_f1']:.3f}, AUROC {r['auroc']:.3f}, "
                f"{r['latency_ms']:.2f} ms/img, {r['params_m']:.2f} M params ({train_s:.0f} s)"
            )
            return r

        for name in names:
            rows.append(one(name, _with(base, backbone=name)))
            dirs.append(out / name / "model")
        if len(names) > 1:
            rows.append(ensemble_row(names, dirs, split, dataset, base, c.named_class, rows))
        if c.distill:
            distill = base.classifier.distillation.model_copy(
                update={"enabled": True, "teachers": [str(d) for d in dirs]}
            )
            student = one("student", _with(base, backbone=c.student, distillation=distill))
            student["model"] = f"student ({c.student}, distilled)"
            rows.append(student)
        meta = {
            "split": str(split),
            "test images": json.loads((out / names[0] / "evaluation" / "evaluation.json").read_text())["test_images"],
            "epochs": base.classifier.epochs,
            "input size": base.classifier.input_size,
            "corruptions": ", ".join(f"{k} {v}" for k, v in cfg.evaluate.robustness.items()),
            "named class": c.named_class,
            "mlflow run": parent.info.run_id,
        }
        md = markdown(rows, c.named_class)
        (out / "compare.md").write_text(md)
        (out / "compare.html").write_text(html_table(rows, c.named_class, meta))
        result = {"rows": rows, "meta": meta, "named_class": c.named_class}
        (out / "compare.json").write_text(json.dumps(result, indent=2, default=float))
        for f in ("compare.md", "compare.html", "compare.json"):
            mlflow.log_artifact(str(out / f))
    return result
