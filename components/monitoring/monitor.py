"""``drspot monitor``: does what the service sees still look like the champion's training data?

The window is a slice of the prediction log (the newest N, or everything since a time). Its
per-image features are the quality features the service logged, the classifier's logged embedding
projected with the projection saved with the model that served it, and the predicted class and
confidence. The reference is the table saved with that model at training time
(:mod:`components.monitoring.reference`: image features of its training images, model outputs on its
validation images): nothing is recomputed from images. Evidently 0.7 compares the two
with the tests ``monitor.*`` names (K-S per numerical column; for the predicted class a
chi-square test of homogeneity with rare classes pooled, :func:`_chisquare_pooled`). The verdict:
drift when the share of drifted image features reaches ``drift_share``, or the share of drifted
embedding components reaches ``embedding_share``, or the predicted-class distribution drifted
(``prediction_drift``). With ``correction: bonferroni`` a column of a family of m columns (image
features, embedding components) counts as drifted when its p-value is below ``threshold / m``, so
each of the three rules raises a false alarm on at most ``threshold`` of unshifted windows and the
verdict on at most 3 x ``threshold`` (bench/drift.py measures it). A window under ``min_rows`` gives
"not enough data", never a verdict.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from components.monitoring.reference import FEATURES, for_comparison, project
from infra.config import Config

IMAGE_FEATURES = (*FEATURES, "width", "height")


def window_features(rows: list[dict[str, Any]], projection: dict[str, Any]):
    """Logged predictions -> the reference's columns (a quality feature that some rows lack, being
    logged before the feature existed, is left out of the comparison)."""
    import pandas as pd

    logged = [k for k in FEATURES if all(k in r["quality"] for r in rows)]
    df = pd.DataFrame(
        [{**{k: float(r["quality"][k]) for k in logged}, "width": r["width"], "height": r["height"]} for r in rows]
    )
    pcs = project(np.asarray([r["embedding"] for r in rows], dtype=np.float64), projection)
    for k in range(pcs.shape[1]):
        df[f"pc_{k}"] = pcs[:, k]
    df["label"] = [r["label"] for r in rows]
    df["confidence"] = [float(r["confidence"]) for r in rows]
    return df


MIN_EXPECTED = 5  # Cochran's rule: a chi-square p-value is trusted when every expected count is at least 5


def _chisquare_pooled(reference, current, feature_type, threshold: float) -> tuple[float, bool]:
    """Chi-square test of homogeneity (reference vs window counts, both samples' noise counted) over
    the categories whose expected count in the window is at least :data:`MIN_EXPECTED`; the rarer
    ones are pooled into one cell (with the next rarest until that cell reaches it too).

    Evidently's ``chisquare`` is a goodness-of-fit test against the reference shares, cell by cell:
    a class the model predicted for 2 of 7,007 training images has an expected count of 0.06 in a
    window of 200, so a window that happens to hold one such prediction "drifts" at p < 0.01.
    On DermaMNIST that alone raised false alarms on 25% of unshifted windows of 200 (bench/drift.py).
    """
    from scipy.stats import chi2_contingency

    ref, cur = reference.value_counts(), current.value_counts()
    n_ref, n_cur = max(1, int(ref.sum())), int(cur.sum())
    keys = sorted(set(ref.index) | set(cur.index), key=lambda k: (-ref.get(k, 0), str(k)))
    common = [k for k in keys if ref.get(k, 0) / n_ref * n_cur >= MIN_EXPECTED]
    rare = [k for k in keys if k not in common]
    while rare and common and sum(ref.get(k, 0) for k in rare) / n_ref * n_cur < MIN_EXPECTED:
        rare.append(common.pop())
    cells = [[k] for k in common] + ([rare] if rare else [])
    if len(cells) < 2:
        return 1.0, False  # one cell: nothing to compare
    table = np.array([[sum(ref.get(k, 0) for k in c) for c in cells], [sum(cur.get(k, 0) for k in c) for c in cells]])
    p_value = float(chi2_contingency(table, correction=False)[1])
    return p_value, p_value < threshold


@functools.cache
def _register_stattests() -> None:
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    register_stattest(
        StatTest(
            name="chisquare_pooled",
            display_name="chi-square (rare classes pooled) p_value",
            allowed_feature_types=[ColumnType.Categorical],
        ),
        default_impl=_chisquare_pooled,
    )


# Evidently's tests that return a p-value (drift below the threshold); the others return a distance
P_VALUE_TESTS = {
    "ks",
    "chisquare",
    "chisquare_pooled",
    "z",
    "fisher_exact",
    "g_test",
    "anderson",
    "cramer_von_mises",
    "mannw",
    "t_test",
}


def _drifted(cfg_: dict[str, Any], value: float) -> bool:
    p_value = "p_value" in cfg_["method"] or cfg_["method"] in P_VALUE_TESTS
    return value < cfg_["threshold"] if p_value else value >= cfg_["threshold"]


def family(column: str) -> str:
    """The family a column's false-alarm budget is shared with: the image features, the embedding
    components, or the column alone (the predicted class, the confidence)."""
    return (
        "image features" if column in IMAGE_FEATURES else "embedding components" if column.startswith("pc_") else column
    )


def column_thresholds(cols: list[str], m) -> dict[str, float]:
    """Each column's p-value threshold: ``m.threshold`` divided, under ``correction: bonferroni``, by
    the size of its :func:`family`."""
    size = Counter(family(c) for c in cols)
    return {c: m.threshold / size[family(c)] if m.correction == "bonferroni" else m.threshold for c in cols}


def compare(reference, current, cfg: Config, report: bool = True) -> tuple[dict[str, Any], Any]:
    """Evidently's per-column drift tests over the shared columns; returns (summary, snapshot).

    ``report=True`` runs the ``DataDriftPreset`` (its snapshot renders the HTML report);
    ``report=False`` runs only the preset's per-column ``ValueDrift`` metrics with the same tests and
    thresholds (the same verdict, without the plots, which take ~90% of the time: bench/drift.py).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    _register_stattests()
    m = cfg.monitor
    parts = dict(Counter(reference["part"])) if "part" in reference.columns else {"train": len(reference)}
    reference = for_comparison(reference)
    cols = [c for c in reference.columns if c in current.columns]
    categorical = [c for c in cols if c == "label"]
    thresholds = column_thresholds(cols, m)
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
                per_column_threshold=thresholds,
                include_tests=False,
            )
        ]
    else:
        metrics = [
            ValueDrift(column=c, method=m.cat_method if c in categorical else m.num_method, threshold=thresholds[c])
            for c in cols
        ]
    # numpy's "invalid value in divide": Evidently's plots correlate constant columns (one image size)
    with np.errstate(divide="ignore", invalid="ignore"):
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

    def which(columns):
        return ", ".join(
            f"{c} p={scores[c]['score']:.1e} < {scores[c]['threshold']:.1e}" for c in columns if scores[c]["drifted"]
        )

    reasons, shares, fired = [], {}, {}
    for name, policy in (("image features", m.drift_share), ("embedding components", m.embedding_share)):
        columns = [c for c in scores if family(c) == name]
        n = sum(scores[c]["drifted"] for c in columns)
        shares[name] = n / max(1, len(columns))
        fired[name] = shares[name] >= policy
        if fired[name]:
            reasons.append(f"{n} of {len(columns)} {name} drifted ({which(columns)}; policy: >= {policy:.0%} of them)")
    prediction = bool(scores.get("label", {}).get("drifted", False))
    fired["predicted class"] = m.prediction_drift and prediction
    if fired["predicted class"]:
        reasons.append(f"the predicted-class distribution drifted ({which(['label'])})")
    summary = {
        "status": "drift" if reasons else "no drift",
        "drift": bool(reasons),
        "reasons": reasons,
        "rules_fired": fired,
        "share_image_features_drifted": shares["image features"],
        "share_embedding_components_drifted": shares["embedding components"],
        "prediction_drift": prediction,
        "drifted": sorted(c for c, s in scores.items() if s["drifted"]),
        "scores": scores,
        "rows": {"reference": len(reference), "reference_parts": parts, "current": len(current)},
        "predicted_classes": dict(Counter(current["label"])),
    }
    return summary, snapshot


def window_rows(cfg: Config, log, since: dt.datetime | None = None, last: int | None = None) -> list[dict[str, Any]]:
    """The monitored window of the prediction log: everything since ``since``, else the newest ``last``
    (default ``monitor.last``)."""
    return log.window(since=since, last=None if since else (last or cfg.monitor.last))


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
    rows = window_rows(cfg, log, since, last)
    window = {
        "since": since.isoformat() if since else None,
        "last": None if since else (last or cfg.monitor.last),
        "first": rows[0]["created_at"].isoformat() if rows else None,
        "newest": rows[-1]["created_at"].isoformat() if rows else None,
    }
    versions = Counter(r["classifier_version"] for r in rows)
    if len(rows) < cfg.monitor.min_rows:
        return save_summary(
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
    return save_summary(out_dir, summary)


def save_summary(out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
