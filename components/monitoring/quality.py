"""Is the served model still right? Measured on confirmed cases, estimated between them (CBPE).

**Measured.** Every clinician confirmation joined with the prediction it confirms (the prediction log's
``feedback`` x ``predictions``): per served classifier version and period (the day or week the case was
confirmed), accuracy, balanced accuracy and the malignant view's sensitivity / specificity (a case is
flagged malignant when the service's risk was not "low", i.e. its malignant probability reached the
version's own threshold), each with a 95% interval (Wilson for proportions, bootstrap for balanced
accuracy). :func:`rule` is the alarm: on the newest ``monitor.quality.last_cases`` confirmations of the
version now served, malignant sensitivity is *confidently* below the floor (the upper end of its Wilson
interval under it) once at least ``min_malignant`` malignant cases are among them.

**Estimated (CBPE).** Between labels the served model's performance is estimated from its probabilities
alone, by confidence-based performance estimation (NannyML's CBPE, Kivimäki et al. 2023): probabilities
are re-calibrated per class by isotonic regression on the model's held-out validation split (stored with
it at evaluation: ``performance_reference.npz``), and a confusion matrix is filled with *expected* counts,
so the expected accuracy is the mean calibrated probability of the predicted class, the expected recall
of class k the calibrated mass of k that was predicted as k, and the malignant sensitivity the calibrated
malignant mass that was flagged. It is exact in expectation while the calibration holds, i.e. under shifts
of the inputs that leave P(label | probabilities) alone, and says nothing about label shift within a
class's probabilities (concept shift): the measured figures watch that. ``bench/quality_estimate.py``
checks it against measured accuracy on real data under each shift of ``bench/drift.py``, and against
NannyML's own CBPE when it is installed (``pip install .[quality-check]``).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from components.model.metrics import bacc_interval, balanced_accuracy, wilson

PERFORMANCE_REFERENCE = "performance_reference.npz"
QUALITY_EVENT = "drspot.quality.degraded"
MIN_CLASS_MASS = 1.0  # a class's expected recall is estimated when its calibrated mass in the window is at least this


# ---------------------------------------------------------------- measured on confirmed cases


def reported(row: dict[str, Any]) -> dict[str, Any]:
    """The lesion an answer reports (the riskiest: highest malignant probability), as the service logs it."""
    lesions = row.get("lesions") or []
    return max(lesions, key=lambda les: les["malignant_probability"]) if lesions else {}


def cases(confirmed: list[dict[str, Any]], malignant: list[str]) -> list[dict[str, Any]]:
    """The confirmed cases (``PredictionLog.confirmed()``) as flat rows: version, when, truth, prediction, flag."""
    out = []
    for r in confirmed:
        if not r.get("classifier_version") or r.get("label") is None:
            continue
        out.append(
            {
                "request_id": r["request_id"],
                "version": r["classifier_version"],
                "confirmed_at": r["created_at"],
                "truth": r["confirmed_label"],
                "predicted": r["label"],
                "flagged": (r.get("risk") or "low") != "low",
                "truly_malignant": r["confirmed_label"] in malignant,
            }
        )
    return out


def scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, malignant sensitivity / specificity of ``cases`` rows, with 95% intervals."""
    n = len(rows)
    right = sum(r["truth"] == r["predicted"] for r in rows)
    pos = [r for r in rows if r["truly_malignant"]]
    neg = [r for r in rows if not r["truly_malignant"]]
    tp, tn = sum(r["flagged"] for r in pos), sum(not r["flagged"] for r in neg)
    truth, pred = [r["truth"] for r in rows], [r["predicted"] for r in rows]
    return {
        "cases": n,
        "malignant_cases": len(pos),
        "accuracy": round(right / n, 4) if n else float("nan"),
        "accuracy_95": wilson(right, n),
        "balanced_accuracy": round(balanced_accuracy(truth, pred), 4) if n else float("nan"),
        "balanced_accuracy_95": bacc_interval(truth, pred),
        "malignant_sensitivity": round(tp / len(pos), 4) if pos else float("nan"),
        "malignant_sensitivity_95": wilson(tp, len(pos)),
        "malignant_specificity": round(tn / len(neg), 4) if neg else float("nan"),
        "malignant_specificity_95": wilson(tn, len(neg)),
    }


def _period(t: dt.datetime | None, period: str) -> str:
    if t is None:
        return "unknown"
    if period == "week":
        y, w, _ = t.isocalendar()
        return f"{y}-W{w:02d}"
    return t.date().isoformat()


def over_time(rows: list[dict[str, Any]], period: str = "day") -> list[dict[str, Any]]:
    """:func:`scores` per served version and period, plus one ``all`` row per version; oldest first."""
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for r in rows:
        groups[(r["version"], _period(r["confirmed_at"], period))].append(r)
        groups[(r["version"], "all")].append(r)
    out = [{"version": v, "period": p, **scores(rs)} for (v, p), rs in groups.items()]
    return sorted(out, key=lambda x: (_version_key(x["version"]), x["period"] == "all", x["period"]))


def _version_key(version: str) -> tuple[str, int]:
    name, _, number = version.rpartition("/")
    return (name, int(number)) if number.isdigit() else (version, -1)


def rule(rows: list[dict[str, Any]], version: str | None, last_cases: int, min_malignant: int, floor: float):
    """The quality alarm on the newest ``last_cases`` confirmations of ``version`` (the one now served).

    Fires when malignant sensitivity is confidently below ``floor`` (the upper end of its 95% Wilson interval
    under it), judged once at least ``min_malignant`` malignant cases are among them.

    Returns:
        {"fired", "status", "reason", "version", and the window's :func:`scores`}.
    """
    mine = [r for r in rows if r["version"] == version] if version else []
    window = mine[-last_cases:]
    s = scores(window)
    out = {"version": version, "floor": floor, "last_cases": last_cases, **s}
    if s["malignant_cases"] < min_malignant:
        return {
            **out,
            "fired": False,
            "status": "not enough confirmed cases",
            "reason": f"{s['malignant_cases']} confirmed malignant case(s) of {version or 'the served version'} in "
            f"the newest {len(window)} confirmations; the rule judges from {min_malignant}",
        }
    lo, hi = s["malignant_sensitivity_95"]
    fired = hi < floor
    verdict = "below" if fired else "not confidently below"
    return {
        **out,
        "fired": fired,
        "status": "QUALITY DROP" if fired else "ok",
        "reason": f"malignant sensitivity of {version} on its newest {len(window)} confirmed cases: "
        f"{s['malignant_sensitivity']:.3f} (95% CI {lo:.3f}-{hi:.3f}, {s['malignant_cases']} malignant) is {verdict} "
        f"the floor {floor:g}",
    }


# ---------------------------------------------------------------- estimated without labels (CBPE)


def write_reference(folder: str | Path, p_val: np.ndarray, y_val: np.ndarray, classes, malignant, threshold) -> Path:
    """The served model's calibrated validation probabilities and true labels: what CBPE calibrates on."""
    path = Path(folder) / PERFORMANCE_REFERENCE
    np.savez_compressed(
        path,
        p=np.asarray(p_val, dtype=np.float32),
        y=np.asarray(y_val, dtype=np.int16),
        classes=np.asarray(classes),
        malignant=np.asarray(malignant),
        threshold=np.float64(threshold),
    )
    return path


def load_reference(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / PERFORMANCE_REFERENCE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {
            "p": z["p"].astype(np.float64),
            "y": z["y"].astype(int),
            "classes": [str(c) for c in z["classes"]],
            "malignant": [str(c) for c in z["malignant"]],
            "threshold": float(z["threshold"]),
        }


def _isotonic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An isotonic calibration curve (increasing), as points for ``np.interp``."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y)
    return np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_)


def fit(ref: dict[str, Any]) -> dict[str, Any]:
    """CBPE's calibrators from a :func:`load_reference` dict: one-vs-rest per class, and the malignant view."""
    p, y, classes = ref["p"], ref["y"], ref["classes"]
    mal_idx = [classes.index(m) for m in ref["malignant"]]
    curves = [_isotonic(p[:, k], (y == k).astype(float)) for k in range(len(classes))]
    mal_curve = _isotonic(p[:, mal_idx].sum(1), np.isin(y, mal_idx).astype(float))
    return {"curves": curves, "malignant_curve": mal_curve, "mal_idx": mal_idx, **ref}


def estimate(
    model: dict[str, Any], p: np.ndarray, flagged: np.ndarray | None = None, pred: np.ndarray | None = None
) -> dict[str, float]:
    """CBPE's expected accuracy, balanced accuracy and malignant sensitivity / specificity for probabilities ``p``.

    ``flagged``: the service's malignant flags (risk not "low"); by default ``p``'s malignant mass at the
    reference's threshold. ``pred``: the answered classes (the served labels: a model with a logit adjustment does
    not answer ``p``'s argmax); by default ``p``'s argmax.
    """
    p = np.asarray(p, dtype=np.float64)
    n = len(p)
    if n == 0:
        return {}
    cal = np.column_stack([np.interp(p[:, k], *model["curves"][k]) for k in range(p.shape[1])])
    cal = cal / np.clip(cal.sum(1, keepdims=True), 1e-12, None)
    pred = p.argmax(1) if pred is None else np.asarray(pred, dtype=int)
    recalls = []
    for k in range(p.shape[1]):
        mass = cal[:, k].sum()
        if mass >= MIN_CLASS_MASS:
            recalls.append(cal[pred == k, k].sum() / mass)
    p_mal = p[:, model["mal_idx"]].sum(1)
    m = np.interp(p_mal, *model["malignant_curve"])
    flag = (p_mal >= model["threshold"]) if flagged is None else np.asarray(flagged, dtype=bool)
    return {
        "accuracy": round(float(cal[np.arange(n), pred].mean()), 4),
        "balanced_accuracy": round(float(np.mean(recalls)), 4) if recalls else float("nan"),
        "malignant_sensitivity": round(float(m[flag].sum() / m.sum()), 4) if m.sum() > 0 else float("nan"),
        "malignant_specificity": round(float((1 - m)[~flag].sum() / (1 - m).sum()), 4)
        if (1 - m).sum() > 0
        else float("nan"),
    }


def window_probabilities(rows: list[dict[str, Any]], classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reported lesion's probabilities (columns in ``classes`` order), malignant flags and answered classes
    (indices in ``classes``) of logged rows."""
    p, flags, pred = [], [], []
    for r in rows:
        les = reported(r)
        probs = les.get("probabilities") or {}
        if not probs:
            continue
        p.append([float(probs.get(c, 0.0)) for c in classes])
        flags.append((r.get("risk") or les.get("risk") or "low") != "low")
        label = les.get("label") or r.get("label")
        pred.append(classes.index(label) if label in classes else int(np.argmax(p[-1])))
    return (
        np.asarray(p, dtype=np.float64).reshape(-1, len(classes)),
        np.asarray(flags, dtype=bool),
        np.asarray(pred, dtype=int),
    )


# ---------------------------------------------------------------- the report


def _fmt(v: float, ci: list[float] | None = None) -> str:
    if v != v:  # nan
        return "–"
    return f"{v:.3f}" + (f" <small>({ci[0]:.3f}–{ci[1]:.3f})</small>" if ci and ci[0] == ci[0] else "")


def _chart(table: list[dict[str, Any]]) -> str:
    """Accuracy and malignant sensitivity per period of each version, with their intervals, as an inline PNG."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r["period"] != "all"]
    if not rows:
        return ""
    periods = sorted({r["period"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, key, title in (
        (axes[0], "accuracy", "accuracy"),
        (axes[1], "malignant_sensitivity", "malignant sensitivity"),
    ):
        for version in sorted({r["version"] for r in rows}, key=_version_key):
            mine = [r for r in rows if r["version"] == version and r[key] == r[key]]
            if not mine:
                continue
            x = [periods.index(r["period"]) for r in mine]
            y = [r[key] for r in mine]
            lo = [r[key] - r[f"{key}_95"][0] for r in mine]
            hi = [r[f"{key}_95"][1] - r[key] for r in mine]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=version)
        ax.set(title=title, ylim=(0, 1.02), xticks=range(len(periods)))
        ax.set_xticklabels(periods, rotation=30, fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return f'<img alt="quality over time" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def html(result: dict[str, Any]) -> str:
    """A self-contained page: the rule's verdict, the estimate, and the measured table per version and period."""
    import html as h

    r, est = result["rule"], result.get("estimate") or {}
    head = (
        "<tr><th>version</th><th>period</th><th>cases</th><th>accuracy</th><th>balanced accuracy</th>"
        "<th>malignant sensitivity</th><th>malignant specificity</th></tr>"
    )
    body = "".join(
        f"<tr{' class=all' if t['period'] == 'all' else ''}><td>{h.escape(t['version'])}</td><td>{t['period']}</td>"
        f"<td>{t['cases']} ({t['malignant_cases']} malignant)</td>"
        f"<td>{_fmt(t['accuracy'], t['accuracy_95'])}</td>"
        f"<td>{_fmt(t['balanced_accuracy'], t['balanced_accuracy_95'])}</td>"
        f"<td>{_fmt(t['malignant_sensitivity'], t['malignant_sensitivity_95'])}</td>"
        f"<td>{_fmt(t['malignant_specificity'], t['malignant_specificity_95'])}</td></tr>"
        for t in result["measured"]
    )
    estimate = (
        "<p>Estimated from the served probabilities of the window's "
        f"{est.get('rows', 0)} predictions of {h.escape(str(est.get('version')))} (CBPE, no labels): "
        + ", ".join(f"{k.replace('_', ' ')} {_fmt(est[k])}" for k in ESTIMATED if k in est)
        + "</p>"
        if est.get("rows")
        else f"<p>No label-free estimate: {h.escape(result.get('estimate_note', 'no predictions in the window'))}</p>"
    )
    return (
        "<!doctype html><meta charset=utf-8><title>DrSpot model quality</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:3px 8px;border-bottom:1px solid #ddd}"
        "tr.all{font-weight:bold}.fired{color:#b00}</style>"
        f"<h1>Model quality</h1><p class='{'fired' if r['fired'] else ''}'><b>{h.escape(r['status'])}</b>: "
        f"{h.escape(r['reason'])}</p>{estimate}<h2>Measured on confirmed cases</h2>"
        f"<p>95% intervals: Wilson for proportions, bootstrap for balanced accuracy. Confirmations joined with the "
        f"predictions they confirm; a case counts as flagged malignant when the answer's risk was not low.</p>"
        f"<table>{head}{body}</table>{_chart(result['measured'])}"
    )


ESTIMATED = ("accuracy", "balanced_accuracy", "malignant_sensitivity", "malignant_specificity")


def assess(cfg, log, performance_for, out_dir: Path, window_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The monitor's quality part: measured figures and the rule on confirmed cases, the CBPE estimate of the
    window; writes ``quality.html`` and ``quality.json`` in ``out_dir``.

    Args:
        log: a :class:`serving.store.PredictionLog`.
        performance_for: ``classifier version -> load_reference() dict or None``.
        window_rows: the monitor's window (the estimate's input); the newest ``monitor.last`` predictions if None.
    """
    import json

    q = cfg.monitor.quality
    rows = cases(log.confirmed(), list(cfg.classes.malignant))
    newest = log.window(last=1)
    served = newest[-1]["classifier_version"] if newest else None
    window_rows = log.window(last=cfg.monitor.last) if window_rows is None else window_rows
    result: dict[str, Any] = {
        "served_version": served,
        "confirmed_cases": len(rows),
        "measured": over_time(rows, q.period),
        "rule": rule(rows, served, q.last_cases, q.min_malignant, q.sensitivity_floor),
    }
    mine = [r for r in window_rows if r["classifier_version"] == served]
    ref = performance_for(served) if (served and mine) else None
    if ref is None:
        result["estimate_note"] = (
            "no predictions of the served version in the window"
            if not mine
            else f"{served} has no performance reference (evaluated before it was stored); retrain it"
        )
    else:
        p, flags, pred = window_probabilities(mine, ref["classes"])
        result["estimate"] = {"version": served, "rows": len(p), **estimate(fit(ref), p, flags, pred)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "quality.html").write_text(html(result), encoding="utf-8")
    result["report"] = str(out_dir / "quality.html")
    return result


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of an :func:`assess` result: the served version's measured figures (all confirmed cases so
    far), the label-free estimate of the window, and whether the rule fired (MLflow keeps each run's value:
    the history is the figure over time)."""
    served = [t for t in result["measured"] if t["version"] == result["served_version"] and t["period"] == "all"]
    out = {f"measured.{k}": float(served[0][k]) for k in (*ESTIMATED, "cases")} if served else {}
    out |= {f"estimated.{k}": float(v) for k, v in (result.get("estimate") or {}).items() if k in ESTIMATED}
    out["quality_rule_fired"] = float(result["rule"]["fired"])
    return {k: v for k, v in out.items() if v == v}  # nan (a figure without cases) is not logged
