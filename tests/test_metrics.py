"""The clinical figures of the evaluation: pAUC above 80% sensitivity, PPV/NPV on the set and at a stated
prevalence, checked against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from components.model.metrics import (
    core_metrics,
    decide,
    fit_logit_adjustment,
    partial_auc_above_tpr,
    predictive_values,
)


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


def test_logit_adjustment_takes_back_a_models_lean_towards_the_common_class():
    """A Bayes-optimal model of a training set that is 80% one class answers that class too often; the offsets
    -tau * log(prior) with tau chosen on validation restore balanced accuracy, and leave balanced data alone."""
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    prior = np.array([0.8, 0.15, 0.05])
    means = np.array([[0.0, 0.0], [1.2, 0.0], [0.0, 1.2]])

    def draw(n_per_class):
        y = np.repeat(np.arange(3), n_per_class)
        x = means[y] + rng.normal(size=(len(y), 2))
        log_lik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(2)
        return log_lik + np.log(prior), y  # the logits of a model fitted on the 80/15/5 training set

    val_logits, val_y = draw(400)
    fit = fit_logit_adjustment(val_logits, val_y, (prior * 10_000).astype(int), [0, 0.25, 0.5, 0.75, 1.0])
    assert fit["tau"] >= 0.75, fit
    test_logits, test_y = draw(400)
    plain = balanced_accuracy_score(test_y, decide(test_logits))
    adjusted = balanced_accuracy_score(test_y, decide(test_logits, fit["offsets"]))
    assert adjusted - plain > 0.1, (plain, adjusted)
    assert fit["val_balanced_accuracy"]["0"] < fit["val_balanced_accuracy"][f"{fit['tau']:g}"]
    # balanced training data: every offset is the same, the answers are the plain argmax
    even = fit_logit_adjustment(val_logits, val_y, [100, 100, 100], [0, 0.5, 1.0])
    assert even["tau"] == 0.0 and (decide(test_logits, even["offsets"]) == decide(test_logits)).all()


def test_logit_adjustment_weighs_each_validation_source_alike():
    """A new clinic's few validation photos against the old clinic's many: pooled, the old clinic (which suits the
    plain argmax) chooses tau 0; by the mean over sources, the tau that serves both is chosen, and each source's
    figures are kept."""
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(1)
    means = np.array([[0.0, 0.0], [1.5, 0.0]])
    log_prior = np.log(np.array([0.9, 0.1]))

    def draw(n_per_class, lean):
        y = np.repeat(np.arange(2), n_per_class)
        x = means[y] + rng.normal(size=(len(y), 2))
        log_lik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(2)
        return log_lik + lean * log_prior, y

    old_l, old_y = draw([900, 100], 0.0)  # the old clinic: a model whose plain argmax is already balanced there
    new_l, new_y = draw([60, 60], 1.0)  # the new clinic: the same model leans to class 0 on its photos
    logits, y = np.concatenate([old_l, new_l]), np.concatenate([old_y, new_y])
    sources = ["ham10000"] * len(old_y) + ["feedback"] * len(new_y)
    counts = [900, 100]
    pooled = fit_logit_adjustment(logits, y, counts, [0, 0.5, 1.0])
    fair = fit_logit_adjustment(logits, y, counts, [0, 0.5, 1.0], sources)
    assert pooled["tau"] == 0.0 and "criterion" not in pooled, pooled
    assert fair["tau"] > 0 and fair["criterion"] == "mean over sources (feedback, ham10000)", fair
    by = fair["val_balanced_accuracy_by_source"]
    assert fair["val_balanced_accuracy"]["0"] == pytest.approx(
        (by["0"]["feedback"] + by["0"]["ham10000"]) / 2, abs=1e-3
    )
    new_plain = balanced_accuracy_score(new_y, decide(new_l))
    assert balanced_accuracy_score(new_y, decide(new_l, fair["offsets"])) > new_plain + 0.05
    # one source: the pooled criterion, as before
    assert fit_logit_adjustment(logits, y, counts, [0, 0.5, 1.0], ["ham10000"] * len(y)) == pooled
    # a source with fewer validation rows than the floor is judged with the largest one: pooled, and said
    floored = fit_logit_adjustment(logits, y, counts, [0, 0.5, 1.0], sources, min_rows=121)
    assert floored["tau"] == pooled["tau"] and "criterion" not in floored, floored
    assert floored["pooled_sources"] == {"feedback": "120 validation rows (< 121): judged with ham10000"}
    assert fit_logit_adjustment(logits, y, counts, [0, 0.5, 1.0], sources, min_rows=120)["tau"] == fair["tau"]


def test_core_metrics_score_the_answered_classes_not_the_argmax():
    classes, malignant = ["mel", "nv"], ["mel"]
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.4, 0.6], [0.3, 0.7], [0.1, 0.9], [0.2, 0.8]])  # argmax says nv four times
    assert core_metrics(y, p, classes, malignant, 0.5)["balanced_accuracy"] == 0.5
    answered = decide(np.log(p), [1.0, 0.0])  # mel's logit raised: the first two become mel
    assert answered.tolist() == [0, 0, 1, 1]
    m = core_metrics(y, p, classes, malignant, 0.5, pred=answered)
    assert m["balanced_accuracy"] == 1.0 and m["malignant_auc"] == 1.0  # the AUC reads the probabilities alone
