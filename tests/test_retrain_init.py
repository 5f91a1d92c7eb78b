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
