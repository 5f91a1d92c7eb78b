"""The configuration is resolved once per run and DVC sees exactly it: on the real `dvc repro`, a changed profile
or override re-runs the stages it affects and only those, an unchanged one is a no-op, and going back to an
earlier configuration is restored from DVC's run cache instead of retrained."""

from __future__ import annotations

import copy

import pytest
import yaml

from components.model.registry import file_hash
from flows.prepare import dvc_stage, stage_config
from infra.config import load_config

pytestmark = pytest.mark.slow

STAGES = ("validate", "dedup", "split", "train_classifier", "train_detector", "evaluate")


def _repro(cfg) -> dict[str, str]:
    """What a run does for the project dataset: write its resolved configuration, then each stage."""
    stage_config(cfg)
    return {s: dvc_stage(s, cfg) for s in STAGES}


def test_dvc_runs_exactly_the_stages_a_configuration_change_affects(dvc_project, monkeypatch):
    root = dvc_project
    params = root / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["wider"] = copy.deepcopy(raw["test"])  # a second profile that differs from `test` in the classifier only
    raw["wider"]["classifier"]["input_size"] = 40
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    test = load_config("test", params).at(root)
    weights = root / "models" / "classifier" / "model.pt"

    assert _repro(test) == dict.fromkeys(STAGES, "ran")
    first = file_hash(weights)
    assert _repro(test) == dict.fromkeys(STAGES, "cached")  # unchanged: a no-op

    wider = load_config("wider", params).at(root)
    assert wider.classifier.input_size == 40 and wider.detector == test.detector
    changed = _repro(wider)
    assert changed == {**dict.fromkeys(STAGES, "cached"), "train_classifier": "ran", "evaluate": "ran"}
    assert _repro(wider) == dict.fromkeys(STAGES, "cached")

    # an override (DRSPOT_SET) is a configuration change like any other: only the detector and evaluation
    monkeypatch.setenv("DRSPOT_SET", "detector.mosaic=0.5")
    overridden = load_config("wider", params).at(root)
    monkeypatch.delenv("DRSPOT_SET")
    changed = _repro(overridden)
    assert changed == {**dict.fromkeys(STAGES, "cached"), "train_detector": "ran", "evaluate": "ran"}

    # back to the first configuration: DVC's run cache restores its outputs, nothing is retrained
    back = _repro(test)
    assert back == {
        **dict.fromkeys(STAGES, "cached"),
        "train_classifier": "restored",
        "train_detector": "restored",
        "evaluate": "restored",
    }
    assert file_hash(weights) == first
    assert (root / ".drspot" / "run" / "config.yaml").read_text() == test.to_yaml()
    assert (root / "reports" / "evaluation" / "config.yaml").read_text() == test.to_yaml()  # beside its outputs
