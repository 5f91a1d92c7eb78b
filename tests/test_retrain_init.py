"""Where a retrain's challenger starts (retrain.init): the checks that keep a fine-tune honest."""

from __future__ import annotations

import json

import pytest

from components.model.classifier import MODEL, MODEL_CONFIG, TrainingError
from components.model.train_classifier import check_init
from flows.retrain import challenger_config


def _folder(tmp_path, **config):
    folder = tmp_path / "champion"
    folder.mkdir()
    (folder / MODEL).write_bytes(b"weights")
    (folder / MODEL_CONFIG).write_text(json.dumps(config))
    return folder


def test_a_champion_of_another_backbone_or_size_cannot_start_the_challenger(cfg, tmp_path):
    c = cfg.classifier
    same = {"backbone": c.backbone, "classes": list(cfg.classes.names), "input_size": c.input_size}
    ok = _folder(tmp_path, **same)
    assert check_init(cfg.updated({"classifier": {"init": {"path": str(ok), "version": "3"}}})) is None
    other = cfg.updated({"classifier": {"init": {"path": str(ok)}, "input_size": c.input_size * 2}})
    assert check_init(other) == f"the model in {ok} has input_size {c.input_size} (configured: {c.input_size * 2})"
    assert "holds no model.pt" in check_init(cfg.updated({"classifier": {"init": {"path": str(tmp_path / "nowhere")}}}))
    assert check_init(cfg) is None  # no start named: nothing to check


def test_training_refuses_a_start_it_cannot_use_before_loading_anything(cfg, tmp_path):
    from components.model.train_classifier import train_classifier

    folder = _folder(tmp_path, backbone="resnet50", classes=["a", "b"], input_size=7)
    bad = cfg.updated({"classifier": {"init": {"path": str(folder)}}})
    with pytest.raises(TrainingError, match="cannot start from classifier.init: .* has backbone resnet50"):
        train_classifier(tmp_path / "no-split.parquet", tmp_path, tmp_path / "out", bad)


def test_retrain_init_pretrained_trains_as_train_does(cfg):
    chosen, starts = challenger_config(cfg.updated({"retrain": {"init": "pretrained"}}))
    assert chosen.classifier.init.path is None and chosen.detector.init.path is None
    assert starts == dict.fromkeys(("classifier", "detector"), "as `train` starts (retrain.init: pretrained)")


def test_a_derived_setting_is_checked_like_any_other(cfg):
    from infra.config import ConfigError

    with pytest.raises(ConfigError, match="retrain.init"):
        cfg.updated({"retrain": {"init": "yesterday"}})
    with pytest.raises(ConfigError, match="unknown key 'retrain.inti'"):
        cfg.updated({"retrain": {"inti": "champion"}})
    assert cfg.updated({}).digest() == cfg.digest() and cfg.updated({}).home == cfg.home


def test_a_detector_of_another_architecture_cannot_start_the_challenger(cfg, tmp_path):
    from components.model.train_detector import DETECTOR_CONFIG, WEIGHTS, check_init

    folder = tmp_path / "detector"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes(b"weights")
    (folder / DETECTOR_CONFIG).write_text(json.dumps({"arch": "yolov8s"}))
    start = {"detector": {"init": {"path": str(folder), "version": "2"}}}
    assert check_init(cfg.updated(start)) == f"the model in {folder} is a yolov8s, the configuration trains yolov8n"
    assert check_init(cfg.updated({"detector": {"arch": "yolov8s", **start["detector"]}})) is None
    assert "holds no detector.pt" in check_init(cfg.updated({"detector": {"init": {"path": str(tmp_path)}}}))


def test_a_new_clinics_few_cases_get_their_share_of_every_epoch(cfg):
    import numpy as np

    from components.model.batches import draw_weights

    y = np.array([0] * 90 + [1] * 10 + [0, 1, 1, 1])
    sources = ["ham10000"] * 100 + ["feedback"] * 4
    w = draw_weights(y, sources, by_class=False, shares={"feedback": 0.3}).numpy()
    assert w[100:].sum() == pytest.approx(0.3) and w[:100].sum() == pytest.approx(0.7)
    assert np.allclose(w[100:], 0.075)  # evenly within the source
    even = draw_weights(y, sources, by_class=True, shares={"feedback": 0.3}).numpy()
    assert even[:90].sum() == pytest.approx(0.35) and even[90:100].sum() == pytest.approx(0.35)  # classes evened
    assert even[100] == pytest.approx(0.15) and even[101:].sum() == pytest.approx(0.15)
    assert draw_weights(y, sources, by_class=False, shares={}) is None  # a plain shuffle
    # a share for a source without rows leaves the others the whole draw
    assert draw_weights(y, ["ham10000"] * 104, False, {"feedback": 0.3}).numpy().sum() == pytest.approx(1.0)
    with pytest.raises(Exception, match="source_share: the shares sum to 1.2"):
        cfg.updated({"classifier": {"source_share": {"a": 0.6, "b": 0.6}}})


def test_a_champion_trained_on_the_data_in_force_is_not_fine_tuned_on_it_again(tmp_path, monkeypatch):
    """A nightly run with no new data starts where the champion started (so DVC's cache answers and nothing new is
    registered); on new data it fine-tunes the champion."""
    from components.model import registry
    from flows.retrain import _start_of_champion

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    c, name = registry.client(), registry.CLASSIFIER  # the store of $MLFLOW_TRACKING_URI
    c.create_registered_model(name)
    tagged = [{"data_version": "aaaa1111.dir", "init": "pretrained"}]
    tagged.append({"data_version": "bbbb2222.dir", "init": "champion", "init.parent_version": "1"})
    for tags in tagged:
        c.create_model_version(name, source=str(tmp_path), tags=tags)
    v1, v2 = (c.get_model_version(name, v).tags for v in ("1", "2"))  # as the retrain reads them
    assert _start_of_champion(v2, "2", "cccc3333.dir") == ("2", "")  # new data: the champion
    assert _start_of_champion(v2, "2", "bbbb2222.dir") == (
        "1",
        "champion v2 was trained on this data (bbbb2222): ",
    )
    assert _start_of_champion(v1, "1", "aaaa1111.dir") == (
        None,
        "champion v1 was trained on this data (aaaa1111): ",
    )
    assert _start_of_champion(v2, "2", None) == ("2", "")  # no data version: nothing to compare
