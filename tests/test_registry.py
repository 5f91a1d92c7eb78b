"""The MLflow registry and the champion/challenger gate, on a real (throwaway) SQLite store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from components.model import registry
from components.model.classifier import MODEL, build_model
from components.model.evaluate import evaluate
from components.model.train_classifier import train_classifier
from infra.config import load_config
from tests.conftest import gated_dataset

# the tests that train or serve are marked slow one by one; the others run in `make test-fast`


@pytest.fixture(scope="module")
def store(tmp_path_factory, synthetic_source):
    """A trained + evaluated classifier, a deliberately bad one, and an empty tracking store."""
    import torch

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("registry")
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    cfg = load_config("test")
    ds, split = gated_dataset(root, synthetic_source, cfg)
    train_classifier(split, ds, root / "good", cfg, progress=lambda m: None)
    good = evaluate(root / "good", split, ds, root / "eval_good", cfg, data_version="v-test")
    # a worse challenger: the same architecture and config, weights never trained
    shutil.copytree(root / "good", root / "bad")
    torch.manual_seed(123)
    torch.save(build_model("resnet18", len(cfg.classes.names)).state_dict(), root / "bad" / MODEL)
    bad = evaluate(root / "bad", split, ds, root / "eval_bad", cfg, data_version="v-test")
    yield {"cfg": cfg, "root": root, "split": split, "ds": ds, "good": good, "bad": bad}
    mp.undo()


@pytest.mark.slow
def test_register_gate_promote_reject_and_rollback(store):
    cfg, root, split = store["cfg"], store["root"], store["split"]
    tags = registry.lineage(cfg, split, "v-test")
    name = registry.CLASSIFIER

    v1 = registry.register("classifier", root / "good", store["good"]["metrics"], tags, root / "eval_good")
    mv = registry.client().get_model_version(name, v1)
    for key in ("data_version", "manifest_hash", "git_commit", "prefect_flow_run_id", "params_hash", "model_hash"):
        assert mv.tags[key], key
    assert mv.tags["data_version"] == "v-test" and mv.tags["manifest_hash"] == registry.file_hash(split)
    # the evaluation's per-slice metrics travel as tags, for the gate's slice rules
    slices = registry.tagged_slices(mv.tags)
    assert [s["column"] for s in slices.values()] == ["source"] and list(slices.values())[0]["n"] > 5
    assert {"malignant_sensitivity", "malignant_sensitivity_ci95", "n_malignant"} <= set(list(slices.values())[0])
    assert str(registry.client().get_model_version_by_alias(name, "challenger").version) == v1
    assert registry.find_version(name, mv.tags["model_hash"]) == v1
    first = registry.gate_and_promote("classifier", v1, cfg)
    assert first.promote and "first model" in first.reason and registry.champion(name) == v1

    # a worse challenger is rejected and the champion stays
    assert store["bad"]["metrics"]["macro_auc"] < store["good"]["metrics"]["macro_auc"] - cfg.gate.tolerance
    v2 = registry.register("classifier", root / "bad", store["bad"]["metrics"], tags)
    worse = registry.gate_and_promote("classifier", v2, cfg)
    assert not worse.promote and registry.champion(name) == v1
    mv2 = registry.client().get_model_version(name, v2)
    assert mv2.tags["gate.decision"] == "rejected" and mv2.tags["gate.champion_version"] == v1
    assert json.loads(mv2.tags["gate.champion_metrics"])["macro_auc"] == pytest.approx(
        store["good"]["metrics"]["macro_auc"]
    )

    # an equal challenger passes; rollback moves the champion back; a second rollback has nowhere to go
    v3 = registry.register("classifier", root / "good", store["good"]["metrics"], tags)
    assert registry.gate_and_promote("classifier", v3, cfg).promote and registry.champion(name) == v3
    assert registry.rollback("classifier") == (v3, v1) and registry.champion(name) == v1
    with pytest.raises(registry.RegistryError, match="nothing to roll back to"):
        registry.rollback("classifier")
    assert registry.champion(name) == v1  # the failure left the champion in place


@pytest.mark.slow
def test_a_registration_whose_answer_was_lost_leaves_one_version(store, monkeypatch):
    """MLflow's client sends a POST again when its answer did not arrive; a server that had created the version
    then creates a twin. `register` keeps the first and deletes the twin, so the weights are registered once."""
    import mlflow

    real = mlflow.register_model

    def retried(uri, name, **kw):  # the first answer lost, the request sent again: two versions of one run
        real(uri, name, **kw)
        return real(uri, name, **kw)

    monkeypatch.setattr(mlflow, "register_model", retried)
    name, c = registry.CLASSIFIER, registry.client()
    before = {str(v.version) for v in c.search_model_versions(f"name='{name}'")}
    tags = registry.lineage(store["cfg"], store["split"], "v-test")
    version = registry.register("classifier", store["root"] / "good", store["good"]["metrics"], tags)
    new = {str(v.version) for v in c.search_model_versions(f"name='{name}'")} - before
    assert new == {version}, new
    assert str(c.get_model_version_by_alias(name, "challenger").version) == version


@pytest.mark.slow
def test_champion_loads_as_pyfunc_without_project_pickles(store):
    import mlflow

    version = registry.register(
        "classifier",
        store["root"] / "good",
        store["good"]["metrics"],
        registry.lineage(store["cfg"], store["split"], "v-test"),
    )
    registry.set_champion(registry.CLASSIFIER, version)
    model = mlflow.pyfunc.load_model(f"models:/{registry.CLASSIFIER}@champion")
    images = sorted((store["ds"] / "images").glob("*.jpg"))[:3]
    assert len(images) == 3
    out = model.predict(
        pd.DataFrame({"image": [p.read_bytes() for p in images], "box": [None, None, [0.2, 0.2, 0.8, 0.8]]})
    )
    classes = store["cfg"].classes.names
    assert list(out.columns[: len(classes)]) == classes
    assert np.allclose(out[classes].sum(1), 1, atol=1e-5)
    assert (
        set(out["label"]) <= set(classes)
        and ((out["malignant_probability"] >= 0) & (out["malignant_probability"] <= 1)).all()
    )


def test_the_gate_rules():
    cfg = load_config("full")  # the default floors (the demo profile lowers its first-model floor)
    good = {"macro_auc": 0.9, "malignant_sensitivity": 0.92}
    assert registry.decide("classifier", good, None, cfg).promote
    low = registry.decide("classifier", {"macro_auc": 0.65, "malignant_sensitivity": 0.9}, None, cfg)
    assert not low.promote and "first model below the absolute floors: macro_auc 0.6500 < 0.7" in low.reason
    insensitive = registry.decide("classifier", {"macro_auc": 0.95, "malignant_sensitivity": 0.6}, good, cfg)
    assert not insensitive.promote and "below the floor 0.8" in insensitive.reason
    within = registry.decide("classifier", {"macro_auc": 0.897, "malignant_sensitivity": 0.9}, good, cfg)
    assert within.promote  # 0.003 worse, inside the 0.005 tolerance
    assert not registry.decide("classifier", {"macro_auc": 0.89, "malignant_sensitivity": 0.9}, good, cfg).promote
    assert not registry.decide("detector", {"map50": 0.5}, {"map50": 0.6}, cfg).promote


@pytest.mark.slow
def test_gate_rejudges_a_champion_from_older_data_on_the_new_split(store):
    """After the data changes the champion is scored again on the challenger's frozen test split."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from components.model.evaluate import score

    cfg, root, name = store["cfg"], store["root"], registry.CLASSIFIER
    v_old = registry.register(
        "classifier", root / "good", store["good"]["metrics"], registry.lineage(cfg, store["split"], "v-test")
    )
    registry.set_champion(name, v_old)
    # new data: a split manifest whose test set lost a few rows (another hash)
    table = pq.read_table(store["split"])
    test_ids = [r["image_id"] for r in table.to_pylist() if r["split"] == "test"][:3]
    new_split = root / "split_v2.parquet"
    pq.write_table(table.filter(pc.invert(pc.is_in(table["image_id"], value_set=pa.array(test_ids)))), new_split)
    assert registry.file_hash(new_split) != registry.file_hash(store["split"])
    bad = score(root / "bad", new_split, store["ds"], cfg).metrics
    v_new = registry.register("classifier", root / "bad", bad, registry.lineage(cfg, new_split, "v-test-2"))

    # without the new split at hand the gate refuses to compare numbers from two test sets
    refused = registry.gate_and_promote("classifier", v_new, cfg)
    assert not refused.promote and "judged on another split manifest" in refused.reason
    assert registry.champion(name) == v_old

    judged = registry.gate_and_promote("classifier", v_new, cfg, new_split, store["ds"])
    expected = score(root / "good", new_split, store["ds"], cfg).metrics
    assert not judged.promote and judged.reason.startswith(f"champion v{v_old} re-judged")
    assert judged.champion["macro_auc"] == pytest.approx(expected["macro_auc"])
    tags = registry.client().get_model_version(name, v_old).tags
    assert json.loads(tags[f"rejudged.{registry.file_hash(new_split)[:16]}"])["macro_auc"] == pytest.approx(
        expected["macro_auc"]
    )
    assert registry.champion(name) == v_old
