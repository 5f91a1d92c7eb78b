"""``drspot monitor``: does what the service sees still look like the champion's training data?

The window is a slice of the prediction log (the newest N, or everything since a time). Its
per-image features are the quality features the service logged, the classifier's logged embedding
projected with the projection saved with the model that served it, and the predicted class and
confidence. The reference is the table saved with that model at training time
(:mod:`components.reference`): nothing is recomputed from images. Evidently 0.7 compares the two
(K-S / chi-square or Z below 1,000 reference rows, normed Wasserstein / Jensen-Shannon above); the
verdict follows ``monitor.*``: drift when the share of drifted image features reaches
``drift_share``, or the share of drifted embedding components reaches ``embedding_share``, or the
predicted-class distribution drifted (``prediction_drift``). A window under ``min_rows`` gives
"not enough data", never a verdict.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from components.config import Config
from components.reference import FEATURES, project

IMAGE_FEATURES = (*FEATURES, "width", "height")


def window_features(rows: list[dict[str, Any]], projection: dict[str, Any]):
    """Logged predictions -> the reference's columns."""
    import pandas as pd

    df = pd.DataFrame(
        [{**{k: float(r["quality"][k]) for k in FEATURES}, "width": r["width"], "height": r["height"]} for r in rows]
    )
    pcs = project(np.asarray([r["embedding"] for r in rows], dtype=np.float64), projection)
    for k in range(pcs.shape[1]):
        df[f"pc_{k}"] = pcs[:, k]
    df["label"] = [r["label"] for r in rows]
    df["confidence"] = [float(r["confidence"]) for r in rows]
    return df


# Evidently's tests that return a p-value (drift below the threshold); the others return a distance
P_VALUE_TESTS = {"ks", "chisquare", "z", "fisher_exact", "g_test", "anderson", "cramer_von_mises", "mannw", "t_test"}


def _drifted(cfg_: dict[str, Any], value: float) -> bool:
    p_value = "p_value" in cfg_["method"] or cfg_["method"] in P_VALUE_TESTS
    return value < cfg_["threshold"] if p_value else value >= cfg_["threshold"]


def compare(reference, current, cfg: Config, report: bool = True) -> tuple[dict[str, Any], Any]:
    """Evidently's per-column drift tests over the shared columns; returns (summary, snapshot).

    ``report=True`` runs the ``DataDriftPreset`` (its snapshot renders the HTML report);
    ``report=False`` runs only the preset's per-column ``ValueDrift`` metrics with the same tests and
    thresholds (the same verdict, without the plots, which take ~90% of the time: bench/drift.py).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    m = cfg.monitor
    cols = [c for c in reference.columns if c in current.columns]
    categorical = [c for c in cols if c == "label"]
    # declared, not inferred: Evidently would call a constant numerical column (one image size) categorical
    definition = DataDefinition(
        numerical_columns=[c for c in cols if c not in categorical], categorical_columns=categorical
    )
    if report:
        metrics = [
            DataDriftPreset(
                drift_share=m.drift_share,
                num_method=m.num_method,
                cat_method=m.cat_method,
                threshold=m.threshold,
                include_tests=False,
            )
        ]
    else:
        metrics = [
            ValueDrift(column=c, method=m.cat_method if c in categorical else m.num_method, threshold=m.threshold)
            for c in cols
        ]
    snapshot = Report(metrics).run(
        current_data=Dataset.from_pandas(current[cols], data_definition=definition),
        reference_data=Dataset.from_pandas(reference[cols], data_definition=definition),
    )
    scores = {}
    for metric in snapshot.dict()["metrics"]:
        conf = metric.get("config", {})
        if conf.get("type", "").endswith("ValueDrift"):
            scores[conf["column"]] = {
                "method": conf["method"],
                "threshold": conf["threshold"],
                "score": float(metric["value"]),
                "drifted": _drifted(conf, float(metric["value"])),
            }
    image = [c for c in IMAGE_FEATURES if c in scores]
    pcs = [c for c in scores if c.startswith("pc_")]
    share_image = sum(scores[c]["drifted"] for c in image) / max(1, len(image))
    share_pcs = sum(scores[c]["drifted"] for c in pcs) / max(1, len(pcs))
    prediction = bool(scores.get("label", {}).get("drifted", False))
    reasons = []
    if share_image >= m.drift_share:
        reasons.append(f"{share_image:.0%} of image features drifted (policy: >= {m.drift_share:.0%})")
    if share_pcs >= m.embedding_share:
        reasons.append(f"{share_pcs:.0%} of embedding components drifted (policy: >= {m.embedding_share:.0%})")
    if m.prediction_drift and prediction:
        reasons.append("the predicted-class distribution drifted")
    summary = {
        "status": "drift" if reasons else "no drift",
        "drift": bool(reasons),
        "reasons": reasons,
        "share_image_features_drifted": share_image,
        "share_embedding_components_drifted": share_pcs,
        "prediction_drift": prediction,
        "drifted": sorted(c for c, s in scores.items() if s["drifted"]),
        "scores": scores,
        "rows": {"reference": len(reference), "current": len(current)},
        "predicted_classes": dict(Counter(current["label"])),
    }
    return summary, snapshot


def monitor(
    cfg: Config,
    log,
    reference_for,
    out_dir: Path,
    since: dt.datetime | None = None,
    last: int | None = None,
) -> dict[str, Any]:
    """Compare a window of the prediction log with the serving model's training reference.

    Args:
        log: a :class:`serving.store.PredictionLog`.
        reference_for: ``classifier version -> (reference DataFrame, projection)``.
        out_dir: where ``drift_report.html`` / ``drift_report.json`` / ``summary.json`` go.
    """
    rows = log.window(since=since, last=None if since else (last or cfg.monitor.last))
    window = {
        "since": since.isoformat() if since else None,
        "last": None if since else (last or cfg.monitor.last),
        "first": rows[0]["created_at"].isoformat() if rows else None,
        "newest": rows[-1]["created_at"].isoformat() if rows else None,
    }
    versions = Counter(r["classifier_version"] for r in rows)
    if len(rows) < cfg.monitor.min_rows:
        return _save(
            out_dir,
            {
                "status": "not enough data",
                "drift": False,
                "rows": {"current": len(rows)},
                "needed": cfg.monitor.min_rows,
                "window": window,
                "reasons": [f"{len(rows)} predictions in the window; at least {cfg.monitor.min_rows} are needed"],
            },
        )
    version = versions.most_common(1)[0][0]
    rows = [r for r in rows if r["classifier_version"] == version]  # one model's outputs at a time
    reference, projection = reference_for(version)
    current = window_features(rows, projection)
    summary, snapshot = compare(reference, current, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(out_dir / "drift_report.html"))
    snapshot.save_json(str(out_dir / "drift_report.json"))
    summary.update({"window": window, "classifier_version": version, "report": str(out_dir / "drift_report.html")})
    if len(versions) > 1:
        summary["note"] = f"the window held several classifier versions {dict(versions)}; compared {version} only"
    return _save(out_dir, summary)


def _save(out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
