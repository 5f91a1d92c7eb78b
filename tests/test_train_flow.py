"""The `train` flow end to end on the test profile: DVC stages, registry, gate, and a cached re-run."""

from __future__ import annotations

import pytest

from components.model import registry
from flows.train import promote_flow, train_flow
from tests.test_prepare_flow import _artifact

pytestmark = pytest.mark.slow


def test_train_flow_registers_gates_and_a_rerun_trains_nothing(dvc_project, monkeypatch):
    root = dvc_project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    first = train_flow(profile="test", root=str(root))
    assert first["steps"] == {"train_classifier": "ran", "train_detector": "ran", "evaluate": "ran"}
    clf, det = first["results"]
    assert clf["registered"] and clf["version"] == "1" and det["registered"]
    assert clf["promote"] == (
        clf["challenger"]["macro_auc"] >= 0.55 and clf["challenger"]["malignant_sensitivity"] >= 0.5
    )
    mv = registry.client().get_model_version(registry.CLASSIFIER, "1")
    run = registry.client().get_run(mv.run_id)
    assert run.data.tags["prefect_flow_run_id"] not in ("", "none")  # tagged with the flow run
    assert run.data.tags.get("mlflow.parentRunId")  # nested under the flow's parent run
    assert mv.tags["gate.decision"] in ("promoted", "rejected")
    assert "# Train: gate decisions" in _artifact("train-gate")

    second = train_flow(profile="test", root=str(root))
    assert second["steps"] == {"train_classifier": "cached", "train_detector": "cached", "evaluate": "cached"}
    assert [r["registered"] for r in second["results"]] == [False, False]
    assert "nothing trained: these weights are already drspot-classifier v1" in second["results"][0]["reason"]
    assert len(registry.client().search_model_versions(f"name='{registry.CLASSIFIER}'")) == 1

    # the gate run by hand publishes its decision too
    by_hand = promote_flow("detector", "1", "test")
    assert by_hand["version"] == "1" and by_hand["reason"]
    page = _artifact("promote-gate")
    assert "# Promote: gate decision" in page and "| detector | v1 |" in page
