"""The classifier's gate per slice (components/model/registry.py: slice_problem, decide): floors and drops against the
champion on the same slice, judged only where a slice is large enough, the failing slice named with its interval."""

from __future__ import annotations

import math

from components.model.evaluate import slice_metrics
from components.model.metrics import wilson
from components.model.registry import decide
from components.model.slices import slice_tags, tagged_slices
from infra.config import load_config


def _slice(col, value, n=60, n_mal=20, sens=0.85, auc=0.9):
    hits = round(sens * n_mal)
    return {
        "column": col,
        "value": value,
        "n": n,
        "n_malignant": n_mal,
        "accuracy": 0.8,
        "balanced_accuracy": 0.7,
        "macro_auc": auc,
        "malignant_sensitivity": sens,
        "malignant_sensitivity_ci95": wilson(hits, n_mal),
    }


def _keyed(*slices):
    return tagged_slices(slice_tags(list(slices)))  # through the registry's tags, as the gate reads them


OVERALL = {"macro_auc": 0.9, "malignant_sensitivity": 0.9}


def test_a_slice_below_its_floor_is_named_with_its_interval():
    cfg = load_config("demo")
    chal = _keyed(_slice("sex", "male"), _slice("localization", "back", n=64, n_mal=12, sens=0.25))
    d = decide("classifier", OVERALL, None, cfg, (chal, None))
    assert not d.promote
    assert d.reason.startswith("slice localization=back (64 cases, 12 malignant): malignant_sensitivity 0.250")
    assert "(95% CI 0.09-0.53)" in d.reason and "below the slice floor 0.5" in d.reason


def test_a_drop_against_the_champion_on_the_same_slice_is_refused():
    cfg = load_config("demo")
    champ = _keyed(_slice("age_band", "<30", auc=0.92), _slice("sex", "female"))
    chal = _keyed(_slice("age_band", "<30", auc=0.78), _slice("sex", "female"))
    d = decide("classifier", OVERALL, dict(OVERALL), cfg, (chal, champ))
    assert not d.promote
    assert "slice age_band=<30 (60 cases, 20 malignant): macro_auc 0.780 vs the champion's 0.920" in d.reason
    assert "down 0.140 > 0.1" in d.reason
    # within the allowed drop: promoted on the overall rule
    ok = _keyed(_slice("age_band", "<30", auc=0.85), _slice("sex", "female"))
    assert decide("classifier", OVERALL, dict(OVERALL), cfg, (ok, champ)).promote


def test_small_slices_and_few_malignant_cases_are_not_judged():
    cfg = load_config("demo")
    tiny = _keyed(_slice("localization", "ear", n=12, sens=0.0), _slice("sex", "male", n=80, n_mal=4, sens=0.0))
    assert decide("classifier", OVERALL, None, cfg, (tiny, None)).promote
    # the detector has no slices
    assert decide("detector", {"map50": 0.9}, None, cfg, (tiny, None)).promote


def test_slice_metrics_per_column_value_with_wilson_intervals():
    import numpy as np

    classes, malignant = ["nv", "mel", "bcc"], ["mel", "bcc"]
    rows = [{"sex": "male" if k % 2 else "female", "age": 25 + k, "source": "a"} for k in range(40)]
    y = np.array([k % 3 for k in range(40)])
    p = np.eye(3)[y] * 0.8 + 0.2 / 3
    out = slice_metrics(rows, y, p, classes, malignant, 0.5, ["sex", "age_band", "source", "localization"], 10)
    by = {(s["column"], s["value"]): s for s in out}
    # ages 25-64: "<30" holds 5 rows (under the minimum of 10, not reported); localization is absent
    assert set(by) == {("sex", "female"), ("sex", "male"), ("age_band", "30-49"), ("age_band", "50-69")} | {
        ("source", "a")
    }
    s = by[("sex", "male")]
    assert s["n"] == 20 and s["n_malignant"] == 13 and s["malignant_sensitivity"] == 1.0
    assert s["malignant_sensitivity_ci95"] == wilson(13, 13) and s["malignant_sensitivity_ci95"][1] == 1.0
    assert all(math.isnan(x) for x in wilson(0, 0))  # no malignant case: no interval


def test_a_new_clinic_must_improve_and_the_old_one_may_not_fall():
    """ham10000's profile: the challenger of a Barcelona retrain must beat the champion's balanced accuracy on the
    Barcelona test rows and may lose at most 0.02 of it on HAM10000's; a source too small is not judged."""
    cfg = load_config("ham10000")
    assert cfg.gate.slices.sources.improve == ["bcn20000"] and cfg.gate.slices.sources.max_drop == 0.02

    def src(value, bacc, n=300):
        return {**_slice("source", value, n=n, n_mal=60), "balanced_accuracy": bacc}

    champ = _keyed(src("ham10000", 0.66), src("bcn20000", 0.36))
    better = _keyed(src("ham10000", 0.65), src("bcn20000", 0.55))
    assert decide("classifier", OVERALL, dict(OVERALL), cfg, (better, champ)).promote
    same_bcn = decide(
        "classifier", OVERALL, dict(OVERALL), cfg, (_keyed(src("ham10000", 0.66), src("bcn20000", 0.36)), champ)
    )
    assert not same_bcn.promote
    assert same_bcn.reason == (
        "slice source=bcn20000 (300 cases, 60 malignant): balanced_accuracy 0.360 does not beat the champion's "
        "0.360 on it (gate.slices.sources.improve)"
    )
    forgets = decide(
        "classifier", OVERALL, dict(OVERALL), cfg, (_keyed(src("ham10000", 0.60), src("bcn20000", 0.6)), champ)
    )
    assert not forgets.promote
    assert forgets.reason == (
        "slice source=ham10000 (300 cases, 60 malignant): balanced_accuracy 0.600 vs the champion's 0.660 on the same "
        "source: down 0.060 > 0.02 (gate.slices.sources.max_drop)"
    )
    tiny = _keyed(src("ham10000", 0.66), src("bcn20000", 0.2, n=10))  # 10 Barcelona crops: below min_cases
    assert decide("classifier", OVERALL, dict(OVERALL), cfg, (tiny, champ)).promote
    # the demo profile names no source to improve: only the drop rule holds
    demo = load_config("demo")
    assert decide(
        "classifier", OVERALL, dict(OVERALL), demo, (_keyed(src("ham10000", 0.66), src("bcn20000", 0.36)), champ)
    ).promote
