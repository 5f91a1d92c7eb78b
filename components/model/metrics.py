"""The pure statistics DrSpot's evaluation, training, gate and monitoring share: softmax and temperature, the
malignant probability and its threshold, AUCs (macro, partial), balanced accuracy, calibration error, bootstrap
intervals, Wilson intervals, predictive values. Numbers in, numbers out: no models, files or configuration."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def malignant_prob(p: np.ndarray, classes: list[str], malignant: list[str]) -> np.ndarray:
    return p[:, [classes.index(m) for m in malignant]].sum(1)


def threshold_for_sensitivity(y_mal: np.ndarray, p_mal: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on (y_mal, p_mal) is at least ``target``."""
    pos = np.sort(p_mal[y_mal == 1])
    if len(pos) == 0:
        return 0.5
    k = int(math.floor((1 - target) * len(pos)))  # at most k positives may fall below the threshold
    return float(pos[min(k, len(pos) - 1)])


def partial_auc_above_tpr(y_mal: np.ndarray, p_mal: np.ndarray, min_tpr: float = 0.8) -> float:
    """The area under the ROC curve where sensitivity is at least ``min_tpr`` (ISIC 2024's pAUC; 0 to 1 - min_tpr).

    Computed as the partial AUC up to a false-positive rate of ``1 - min_tpr`` of the flipped problem (benign as
    positive, scores negated), then rescaled from McClish's standardisation back to an area.
    """
    from sklearn.metrics import roc_auc_score

    if not 0 < y_mal.sum() < len(y_mal):
        return float("nan")
    max_fpr = 1 - min_tpr
    scaled = roc_auc_score(1 - y_mal, -p_mal, max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / 0.5 * (scaled - 0.5))


def predictive_values(sens: float, spec: float, prevalence: float) -> tuple[float, float]:
    """PPV and NPV of a test with this sensitivity and specificity where the condition has ``prevalence`` (Bayes)."""
    tp, fp = sens * prevalence, (1 - spec) * (1 - prevalence)
    tn, fn = spec * (1 - prevalence), (1 - sens) * prevalence
    return (tp / (tp + fp) if tp + fp else float("nan")), (tn / (tn + fn) if tn + fn else float("nan"))


def decide(logits: np.ndarray, offsets: list[float] | None = None) -> np.ndarray:
    """The class each row is answered with: the argmax of its logits plus the model's per-class ``offsets`` (its
    logit adjustment, ``model_config["logit_adjustment"]["offsets"]``; none: the plain argmax)."""
    z = np.asarray(logits, dtype=np.float64)
    return (z + np.asarray(offsets, dtype=np.float64)).argmax(1) if offsets is not None else z.argmax(1)


def adjustment_offsets(model_config: dict[str, Any]) -> list[float] | None:
    """A model's logit-adjustment offsets (``model_config["logit_adjustment"]``); None for a model without."""
    return (model_config.get("logit_adjustment") or {}).get("offsets")


def fit_logit_adjustment(
    logits: np.ndarray, y: np.ndarray, train_counts, taus, sources=None, min_rows: int = 0
) -> dict[str, Any]:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): offsets ``-tau * log(prior)``, ``prior`` the training
    class shares (add-one smoothed), with the ``tau`` of ``taus`` whose answers reach the best balanced accuracy on
    the validation ``logits`` (ties to the smaller tau). A model trained mostly on one class leans towards it;
    the offsets take the lean back by as much as validation shows pays.

    ``sources`` (one per validation row): with more than one, the criterion is the mean of each source's balanced
    accuracy, as the gate judges each source (``gate.slices.sources``): a new clinic's few validation photos weigh
    as much as the old clinic's many (pooled, the old clinic's 90% chose the tau, and the new clinic got the one that
    suits the old). A source with fewer than ``min_rows`` validation rows is too few to judge on its own (one
    photo would move its balanced accuracy by a class's share): its rows count with the largest source's."""
    from sklearn.metrics import balanced_accuracy_score

    counts = np.asarray(train_counts, dtype=np.float64)
    log_prior = np.log((counts + 1) / (counts.sum() + len(counts)))
    src, few = _judged_sources(sources, min_rows)
    groups = sorted(set(src.tolist())) if src is not None else []
    tried, by_source = {}, {}
    for tau in sorted(set(float(t) for t in taus)):
        pred = decide(logits, -tau * log_prior)
        if len(groups) > 1:
            per = {g: float(balanced_accuracy_score(y[src == g], pred[src == g])) for g in groups}
            by_source[f"{tau:g}"] = {g: round(v, 4) for g, v in per.items()}
            tried[tau] = float(np.mean(list(per.values())))
        else:
            tried[tau] = float(balanced_accuracy_score(y, pred)) if len(y) else float("nan")
    best = min(tried, key=lambda t: (-np.nan_to_num(tried[t], nan=-1.0), t))
    out = {
        "tau": best,
        "offsets": [round(float(v), 6) for v in -best * log_prior],
        "val_balanced_accuracy": {f"{t:g}": round(v, 4) for t, v in tried.items()},
    }
    if by_source:
        out["criterion"] = f"mean over sources ({', '.join(groups)})"
        out["val_balanced_accuracy_by_source"] = by_source
    if few:
        out["pooled_sources"] = few
    return out


def _judged_sources(sources, min_rows: int) -> tuple[np.ndarray | None, dict[str, str]]:
    """The validation rows' sources as :func:`fit_logit_adjustment` judges them: one with fewer than ``min_rows``
    rows relabelled as the largest (ties: the first by name), and why, by source."""
    if sources is None:
        return None, {}
    src = np.asarray(sources, dtype=object)
    names, n = np.unique(src, return_counts=True)
    largest = names[int(np.argmax(n))]
    few = {
        str(g): f"{c} validation rows (< {min_rows}): judged with {largest}"
        for g, c in zip(names, n, strict=True)
        if c < min_rows
    }
    few.pop(str(largest), None)
    if few:
        src = np.where(np.isin(src, list(few)), largest, src)
    return src, few


def core_metrics(
    y: np.ndarray,
    p: np.ndarray,
    classes: list[str],
    malignant: list[str],
    threshold: float,
    prevalence: float | None = None,
    pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """The headline figures: multiclass (ACC, BMCA, macro AUC, kappa) and the malignant view at ``threshold``
    (AUC, pAUC above 80% sensitivity, sensitivity, specificity, PPV and NPV on this set and, given a deployment
    ``prevalence``, where malignancy is that common). ``pred``: the answered classes (:func:`decide`), by default
    ``p``'s argmax."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, roc_auc_score

    pred = p.argmax(1) if pred is None else np.asarray(pred)
    y_mal = np.isin(y, [classes.index(m) for m in malignant]).astype(int)
    p_mal = malignant_prob(p, classes, malignant)
    flagged = p_mal >= threshold
    tp, fp = int((flagged & (y_mal == 1)).sum()), int((flagged & (y_mal == 0)).sum())
    tn, fn = int((~flagged & (y_mal == 0)).sum()), int((~flagged & (y_mal == 1)).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_auc": macro_auc(y, p),
        "kappa": float(cohen_kappa_score(y, pred)) if len(set(y)) > 1 else float("nan"),
        "malignant_auc": float(roc_auc_score(y_mal, p_mal)) if 0 < y_mal.sum() < len(y_mal) else float("nan"),
        "malignant_pauc80": partial_auc_above_tpr(y_mal, p_mal, 0.8),
        "malignant_sensitivity": sens,
        "malignant_specificity": spec,
        "malignant_ppv": tp / (tp + fp) if tp + fp else float("nan"),
        "malignant_npv": tn / (tn + fn) if tn + fn else float("nan"),
    }
    if prevalence is not None:
        out["malignant_ppv_at_prevalence"], out["malignant_npv_at_prevalence"] = predictive_values(
            sens, spec, prevalence
        )
    return out


def bootstrap(
    y, p, classes, malignant, threshold, n: int, seed: int, prevalence=None, pred=None
) -> dict[str, list[float]]:
    """95% percentile intervals of :func:`core_metrics` over ``n`` resamples of the test set."""
    rng = np.random.default_rng(seed)
    pred = p.argmax(1) if pred is None else np.asarray(pred)
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        for k, v in core_metrics(y[idx], p[idx], classes, malignant, threshold, prevalence, pred[idx]).items():
            draws.setdefault(k, []).append(v)
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in draws.items()}


def ece(y: np.ndarray, p: np.ndarray, bins: int = 15) -> tuple[float, list[dict[str, float]]]:
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total, rows = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            acc, c = float((pred[m] == y[m]).mean()), float(conf[m].mean())
            total += m.mean() * abs(acc - c)
            rows.append({"bin": f"{lo:.2f}-{hi:.2f}", "confidence": c, "accuracy": acc, "count": int(m.sum())})
    return float(total), rows


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation NLL (searched on log T in [-3, 3])."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / math.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    return float(math.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def softmax(logits: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = logits / t
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a proportion (hits of n); [nan, nan] for n = 0."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(float(centre - half), 4), round(float(centre + half), 4)]


def macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the classes that have positives and negatives in ``y``."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y == k, p[:, k]) for k in range(p.shape[1]) if 0 < (y == k).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def quick_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    pred = p.argmax(1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_auc": macro_auc(y, p),
    }


def bacc_interval(truth: list[str], predicted: list[str], n_boot: int = 200, seed: int = 0) -> list[float]:
    if len(truth) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    t, p = np.asarray(truth), np.asarray(predicted)
    vals = [balanced_accuracy(t[idx], p[idx]) for idx in (rng.integers(0, len(t), len(t)) for _ in range(n_boot))]
    return [round(float(np.percentile(vals, 2.5)), 4), round(float(np.percentile(vals, 97.5)), 4)]


def balanced_accuracy(truth, predicted) -> float:
    """Mean recall over the classes present among the confirmed labels."""
    t, p = np.asarray(truth), np.asarray(predicted)
    recalls = [float(np.mean(p[t == k] == k)) for k in np.unique(t)]
    return float(np.mean(recalls)) if recalls else float("nan")
