"""Model quality: measured on confirmed cases (with intervals, per version and period), the label rule, and the
label-free CBPE estimate."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import numpy as np
import pytest

from components.monitoring import quality
from infra.config import load_config

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
MALIGNANT = ["mel", "bcc", "akiec"]


def _probs(label: str, confidence: float) -> dict[str, float]:
    rest = (1 - confidence) / (len(CLASSES) - 1)
    return {c: confidence if c == label else rest for c in CLASSES}


def _log_case(log, version: str, predicted: str, truth: str, flagged: bool, when: dt.datetime | None = None):
    rid = uuid.uuid4().hex
    probs = _probs(predicted, 0.8)
    log.record(
        {
            "request_id": rid,
            **({"created_at": when} if when else {}),
            "image_sha256": uuid.uuid4().hex * 2,
            "width": 64,
            "height": 64,
            "quality": {},
            "embedding": [0.0],
            "lesions": [{"label": predicted, "probabilities": probs, "malignant_probability": 0.6 if flagged else 0.1}],
            "label": predicted,
            "confidence": 0.8,
            "malignant_probability": 0.6 if flagged else 0.1,
            "risk": "medium" if flagged else "low",
            "fallback": False,
            "classifier_version": version,
            "detector_version": "drspot-detector/1",
        }
    )
    log.add_feedback(rid, truth, "dr test")
    return rid


@pytest.fixture
def log(tmp_path):
    from serving.store import PredictionLog

    return PredictionLog(f"sqlite:///{tmp_path / 'log.db'}")


def test_measured_figures_per_version_with_intervals_and_the_rule_fires_on_a_sensitivity_drop(log, tmp_path):
    cfg = load_config("test")
    # version 1: 20 malignant cases, 18 flagged; 20 benign, 16 right
    for i in range(20):
        _log_case(log, "drspot-classifier/1", "mel" if i < 18 else "nv", "mel", flagged=i < 18)
        _log_case(log, "drspot-classifier/1", "nv" if i < 16 else "bkl", "nv", flagged=False)
    # version 2 (now served): 20 malignant cases, only 4 flagged
    for i in range(20):
        _log_case(log, "drspot-classifier/2", "mel" if i < 4 else "nv", "mel", flagged=i < 4)
    result = quality.assess(cfg, log, lambda v: None, tmp_path / "q")
    by = {(t["version"], t["period"]): t for t in result["measured"]}
    v1 = by[("drspot-classifier/1", "all")]
    assert v1["cases"] == 40 and v1["malignant_cases"] == 20
    assert v1["malignant_sensitivity"] == 0.9 and v1["malignant_sensitivity_95"] == [0.699, 0.9721]
    assert v1["malignant_specificity"] == 1.0 and v1["accuracy"] == round(34 / 40, 4)
    assert v1["balanced_accuracy"] == round((18 / 20 + 16 / 20) / 2, 4)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert by[("drspot-classifier/2", today)]["malignant_sensitivity"] == 0.2
    r = result["rule"]
    assert result["served_version"] == "drspot-classifier/2" and r["fired"] and r["status"] == "QUALITY DROP"
    assert "malignant sensitivity of drspot-classifier/2 on its newest 20 confirmed cases: 0.200" in r["reason"]
    assert "below the floor 0.7" in r["reason"]
    page = (tmp_path / "q" / "quality.html").read_text()
    assert "QUALITY DROP" in page and "drspot-classifier/1" in page and "0.900" in page and "<img" in page
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["rule"]["fired"] is True
    m = quality.metrics(result)
    assert m["measured.malignant_sensitivity"] == 0.2 and m["quality_rule_fired"] == 1.0


def test_the_rule_waits_for_enough_malignant_cases_and_does_not_fire_on_noise(log, tmp_path):
    cfg = load_config("test")
    for i in range(9):  # 9 malignant cases, 5 flagged: too few to judge
        _log_case(log, "drspot-classifier/1", "mel" if i < 5 else "nv", "mel", flagged=i < 5)
    r = quality.assess(cfg, log, lambda v: None, tmp_path / "q")["rule"]
    assert not r["fired"] and r["status"] == "not enough confirmed cases"
    assert "9 confirmed malignant case(s)" in r["reason"] and "judges from 10" in r["reason"]
    for _ in range(3):  # 12 malignant, 8 flagged (0.667): below 0.7 but not confidently
        _log_case(log, "drspot-classifier/1", "mel", "mel", flagged=True)
    r = quality.assess(cfg, log, lambda v: None, tmp_path / "q")["rule"]
    assert not r["fired"] and r["status"] == "ok" and "not confidently below" in r["reason"]


def _calibrated(rng, n: int, concentration: float) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are calibrated by construction (the label drawn from them)."""
    p = rng.dirichlet(np.full(len(CLASSES), concentration), size=n)
    y = np.array([rng.choice(len(CLASSES), p=row) for row in p])
    return p, y


def test_cbpe_tracks_accuracy_and_sensitivity_under_a_covariate_shift_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    p_ref, y_ref = _calibrated(rng, 4000, 0.3)
    quality.write_reference(tmp_path, p_ref, y_ref, CLASSES, MALIGNANT, 0.4)
    model = quality.fit(quality.load_reference(tmp_path))
    mal = [CLASSES.index(m) for m in MALIGNANT]
    estimated = {}
    for concentration in (0.3, 1.0):  # the same source, then less confident inputs (measured accuracy drops)
        p, y = _calibrated(rng, 3000, concentration)
        est = estimated[concentration] = quality.estimate(model, p)
        measured = float((p.argmax(1) == y).mean())
        assert abs(est["accuracy"] - measured) < 0.03, (concentration, est, measured)
        flagged, pos = p[:, mal].sum(1) >= 0.4, np.isin(y, mal)
        assert abs(est["malignant_sensitivity"] - flagged[pos].mean()) < 0.04
    # and the estimate moves with the shift (it is not a constant)
    assert estimated[0.3]["accuracy"] - estimated[1.0]["accuracy"] > 0.15, estimated


def test_cbpe_recalibrates_an_overconfident_model(tmp_path):
    """Reported probabilities that overstate confidence: the raw mean confidence is wrong, CBPE is not."""
    rng = np.random.default_rng(1)

    def overconfident(n):
        p, y = _calibrated(rng, n, 0.5)
        sharp = p**3 / (p**3).sum(1, keepdims=True)  # what the model reports: sharper than the truth
        return sharp, y

    p_ref, y_ref = overconfident(4000)
    quality.write_reference(tmp_path, p_ref, y_ref, CLASSES, MALIGNANT, 0.5)
    model = quality.fit(quality.load_reference(tmp_path))
    p, y = overconfident(3000)
    measured = float((p.argmax(1) == y).mean())
    assert p.max(1).mean() - measured > 0.08  # naive confidence overstates accuracy
    assert abs(quality.estimate(model, p)["accuracy"] - measured) < 0.03


def test_the_estimate_reads_the_logged_lesions_and_the_served_flags(log, tmp_path):
    cfg = load_config("test")
    rng = np.random.default_rng(2)
    p_ref, y_ref = _calibrated(rng, 2000, 0.5)
    quality.write_reference(tmp_path, p_ref, y_ref, CLASSES, MALIGNANT, 0.5)
    for _ in range(5):
        _log_case(log, "drspot-classifier/3", "nv", "nv", flagged=False)
    result = quality.assess(cfg, log, lambda v: quality.load_reference(tmp_path), tmp_path / "q")
    est = result["estimate"]
    assert est["version"] == "drspot-classifier/3" and est["rows"] == 5
    assert 0 < est["accuracy"] < 1
    none = quality.assess(cfg, log, lambda v: None, tmp_path / "q2")
    assert "estimate" not in none and "has no performance reference" in none["estimate_note"]
    assert "No label-free estimate" in (tmp_path / "q2" / "quality.html").read_text()
