"""The clinical figures of the evaluation: pAUC above 80% sensitivity, PPV/NPV on the set and at a stated
prevalence, checked against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from components.model.metrics import core_metrics, partial_auc_above_tpr, predictive_values


def test_partial_auc_above_80_percent_sensitivity():
    y = np.array([0] * 500 + [1] * 500)
    perfect = np.r_[np.zeros(500), np.ones(500)]
    assert partial_auc_above_tpr(y, perfect) == pytest.approx(0.2)  # the whole band above TPR 0.8
    noise = np.random.default_rng(0).random(1000)
    assert partial_auc_above_tpr(y, noise) == pytest.approx(0.02, abs=0.01)  # the diagonal: (0.2 x 0.2) / 2
    assert np.isnan(partial_auc_above_tpr(np.zeros(4, int), np.ones(4)))


def test_predictive_values_follow_bayes():
    ppv, npv = predictive_values(0.9, 0.8, 0.05)
    assert ppv == pytest.approx(0.045 / (0.045 + 0.19)) and npv == pytest.approx(0.76 / (0.76 + 0.005))


def test_core_metrics_count_the_malignant_view():
    classes, malignant = ["mel", "nv"], ["mel"]
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])  # 3 melanomas, 5 nevi
    p_mel = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.1, 0.1, 0.1])
    p = np.c_[p_mel, 1 - p_mel]
    m = core_metrics(y, p, classes, malignant, threshold=0.5, prevalence=0.1)
    assert m["malignant_sensitivity"] == pytest.approx(2 / 3) and m["malignant_specificity"] == pytest.approx(4 / 5)
    assert m["malignant_ppv"] == pytest.approx(2 / 3) and m["malignant_npv"] == pytest.approx(4 / 5)
    ppv, npv = predictive_values(2 / 3, 4 / 5, 0.1)
    assert m["malignant_ppv_at_prevalence"] == pytest.approx(ppv) and m["malignant_npv_at_prevalence"] == pytest.approx(
        npv
    )
