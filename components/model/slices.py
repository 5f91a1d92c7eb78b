"""The gate's slices of the frozen test split: their metrics as registry tags, and the rules a challenger's slices
must pass (``gate.slices``: floors, drops against the champion on the same slice, and the per-clinic rules on the
``source`` slices). :func:`components.model.registry.decide` applies them."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from infra.config import Config

SLICE_TAG = "slice."  # + column.value: one test-split slice's metrics (JSON), for the gate's per-slice rules


def slice_tags(slices: list[dict[str, Any]], prefix: str = SLICE_TAG) -> dict[str, str]:
    """One tag per slice: ``slice.<column>.<value>`` -> its metrics as compact JSON (NaN as null)."""

    def num(v):
        if isinstance(v, list):
            return [num(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else round(v, 4) if isinstance(v, float) else v

    out = {}
    for s in slices:
        value = re.sub(r"[^\w\-. /]", "_", str(s["value"]))  # what MLflow allows in a tag key
        key = f"{prefix}{s['column']}.{value}"[:250]
        out[key] = json.dumps({k: num(v) for k, v in s.items()}, separators=(",", ":"))[:5000]
    return out


def tagged_slices(tags: dict[str, str], prefix: str = SLICE_TAG) -> dict[str, dict[str, Any]]:
    """``{"column.value": metrics}`` from a version's tags written by :func:`slice_tags`."""
    return {k[len(prefix) :]: json.loads(v) for k, v in tags.items() if k.startswith(prefix)}


def slice_problem(
    challenger: dict[str, dict[str, Any]], champion_: dict[str, dict[str, Any]] | None, cfg: Config
) -> str | None:
    """The first slice rule the challenger breaks (``gate.slices``), named with its slice, its size and, for
    malignant sensitivity, its Wilson 95% interval; None when every judged slice passes. A slice is judged where
    it holds ``min_cases`` test crops (malignant sensitivity: ``min_malignant`` malignant ones), in both models
    for a drop. A ``source`` slice (a clinic's test rows) is judged on ``sources.metric`` too: one named in
    ``sources.improve`` must beat the champion's, every one may fall at most ``sources.max_drop``."""
    g = cfg.gate.slices

    def value(s: dict[str, Any] | None, metric: str) -> float | None:
        if s is None or s.get("n", 0) < g.min_cases:
            return None
        if metric == "malignant_sensitivity" and s.get("n_malignant", 0) < g.min_malignant:
            return None
        v = s.get(metric)
        return float(v) if v is not None and math.isfinite(float(v)) else None

    def named(key: str, s: dict[str, Any], metric: str, v: float) -> str:
        col, val = s.get("column", key), s.get("value", "")
        ci = s.get("malignant_sensitivity_ci95") if metric == "malignant_sensitivity" else None
        interval = f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})" if ci and None not in ci else ""
        return f"slice {col}={val} ({s['n']} cases, {s.get('n_malignant', 0)} malignant): {metric} {v:.3f}{interval}"

    src = g.sources
    for key, s in sorted(challenger.items()):
        if s.get("column") == "source":
            v, old = value(s, src.metric), value((champion_ or {}).get(key), src.metric)
            if v is not None and old is not None and s.get("value") in src.improve and not v > old:
                rule = "gate.slices.sources.improve"
                return f"{named(key, s, src.metric, v)} does not beat the champion's {old:.3f} on it ({rule})"
            if v is not None and old is not None and old - v > src.max_drop:
                down = f"down {old - v:.3f} > {src.max_drop} (gate.slices.sources.max_drop)"
                return f"{named(key, s, src.metric, v)} vs the champion's {old:.3f} on the same source: {down}"
        for rule, floor in g.floors.items():
            metric = cfg.gate.primary_metric if rule == "primary" else rule
            v = value(s, metric)
            if v is not None and v < floor:
                return f"{named(key, s, metric, v)} is below the slice floor {floor}"
        for rule, drop in g.max_drop.items():
            metric = cfg.gate.primary_metric if rule == "primary" else rule
            v, old = value(s, metric), value((champion_ or {}).get(key), metric)
            if v is not None and old is not None and old - v > drop:
                down = f"down {old - v:.3f} > {drop}"
                return f"{named(key, s, metric, v)} vs the champion's {old:.3f} on the same slice: {down}"
    return None
