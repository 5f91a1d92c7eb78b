"""The retraining flywheel on the `test` profile, for real: prediction log + feedback -> ingest ->
data gate against everything already there -> new DVC version (pushed) -> train flow -> gate."""

from __future__ import annotations

import csv
import hashlib
import io
import uuid

import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data.versioning import data_version, dvc
from components.model import registry
from flows.retrain import retrain_flow
from flows.train import train_flow
from tests.test_prepare_flow import _artifact

pytestmark = pytest.mark.slow


def _serve(log, data: bytes, label: str = "nv", store: bool = True) -> str:
    """Log a prediction the way the service does (image stored only with consent); returns its id."""
    sha = hashlib.sha256(data).hexdigest()
    im = Image.open(io.BytesIO(data))
    rid = uuid.uuid4().hex
    log.record(
        {
            "request_id": rid,
            "image_sha256": sha,
            "width": im.width,
            "height": im.height,
            "format": im.format,
            "quality": {},
            "embedding": [],
            "lesions": [],
            "label": label,
            "confidence": 0.5,
            "fallback": True,
            "fallback_reason": "test",
            "image_path": log.store_image(sha, data, im.format) if store else None,
        }
    )
    return rid


def _reencode(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def test_confirmed_feedback_becomes_a_new_data_version_and_a_gated_model(dvc_project, cfg, tmp_path, monkeypatch):
    from components.data.synthetic import Spec, generate
    from serving.store import PredictionLog

    root = dvc_project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("DRSPOT_DATABASE_URL", f"sqlite:///{root / 'predictions.db'}")
    first = train_flow(profile="test", root=str(root))
    assert first["results"][0]["version"] == "1"
    assert [r["promote"] for r in first["results"]] == [True, True]  # both v1 serve: the retrain starts from them
    v1 = registry.client().get_model_version(registry.CLASSIFIER, "1")
    assert (v1.tags["init"], v1.tags["epochs"]) == ("scratch", "1") and "init.parent_version" not in v1.tags
    split_file = root / "prepared" / "data" / "split" / "split.parquet"
    before = pq.read_table(split_file, columns=["image_id", "split", "path", "label"]).to_pylist()
    test_rows = [r for r in before if r["split"] == "test"]
    test_ids = sorted(r["image_id"] for r in test_rows)
    version_before = data_version(root / "data.dvc")

    log = PredictionLog(f"sqlite:///{root / 'predictions.db'}", root / ".drspot" / "images")
    # new lesions, as another clinic's camera would send them
    new_src = tmp_path / "clinic"
    faults = dict.fromkeys(("exact_duplicates", "near_duplicates", "corrupt", "unknown_labels", "tiny"), 0)
    one_each = {"n_lesions": 7, "images_per_lesion": (1, 1), "min_lesions_per_class": 1}
    generate(new_src, Spec.from_config(cfg, shifted=True, seed=1234, **one_each, **faults))
    with open(new_src / "labels.csv") as f:
        fresh = [(new_src / r["file"], r["label"]) for r in csv.DictReader(f)]
    confirmed_new = []
    for path, label in fresh:
        rid = _serve(log, path.read_bytes())
        log.add_feedback(rid, label, "dr.test")
        confirmed_new.append(rid)
    # a test image sent again, byte for byte, and another one re-encoded: neither may reach training
    exact, near = test_rows[0], test_rows[1]
    rid_exact = _serve(log, (root / "data" / exact["path"]).read_bytes())
    log.add_feedback(rid_exact, exact["label"], "dr.test")
    near_bytes = _reencode((root / "data" / near["path"]).read_bytes())
    rid_near = _serve(log, near_bytes)
    log.add_feedback(rid_near, near["label"], "dr.test")
    # confirmed, but the image was not stored (no consent): listed, not used
    rid_unstored = _serve(log, fresh[0][0].read_bytes() + b"", store=False)
    log.add_feedback(rid_unstored, "nv", "dr.test")
    # served but never confirmed: not feedback at all
    _serve(log, _reencode(fresh[1][0].read_bytes()))

    s = retrain_flow(profile="test", root=str(root), deploy=False)

    assert s["status"] == "retrained"
    assert s["new_cases"] == len(fresh) + 2  # the unconfirmed one is not a case; the unstored one is skipped
    assert s["skipped_cases"] == [
        {"request_id": rid_unstored, "reason": "image not stored (serving.store_images was off when it was served)"}
    ]
    # a new data version, pushed to the project's remote
    assert s["data_version_before"] == version_before and s["data_version"] not in (None, version_before)
    assert data_version(root / "data.dvc") == s["data_version"]
    assert "in sync" in dvc("status", "--cloud", "data.dvc", cwd=root)  # pushed to the default remote
    manifest = pq.read_table(root / "data" / "manifest.parquet", columns=["image_id", "source"]).to_pylist()
    assert sum(r["source"] == "feedback" for r in manifest) == len(fresh) + 2
    # the frozen test split is unchanged, and the two copies of test images never entered training
    after = pq.read_table(split_file, columns=["image_id", "split"]).to_pylist()
    assert sorted(r["image_id"] for r in after if r["split"] == "test") == test_ids
    fate = s["fate"]
    exact_id = "fb_" + hashlib.sha256((root / "data" / exact["path"]).read_bytes()).hexdigest()[:20]
    near_id = "fb_" + hashlib.sha256(near_bytes).hexdigest()[:20]
    assert fate[exact_id]["where"] == "dropped"
    assert fate[exact_id]["why"] == f"exact_duplicate: same bytes as {exact['image_id']} (kept)"
    assert fate[near_id]["where"] == "held out" and "frozen test group" in fate[near_id]["why"]
    trained_on = {r["image_id"] for r in after if r["split"] in ("train", "val")}
    assert exact_id not in trained_on and near_id not in trained_on
    assert sum(f["where"] in ("train", "val") for f in fate.values()) == len(fresh)
    # the train flow ran on the new version and the gate decided, with its reason
    clf = s["gate"][0]
    assert clf["registered"] and clf["version"] == "2" and clf["reason"]
    mv = registry.client().get_model_version(registry.CLASSIFIER, "2")
    assert mv.tags["data_version"] == s["data_version"]
    # retrain.init: champion (the default): both challengers fine-tuned the serving v1 for retrain.finetune's epochs
    assert s["start"] == dict.fromkeys(("classifier", "detector"), "fine-tunes champion v1 for 1 epoch(s)")
    for name in (registry.CLASSIFIER, registry.DETECTOR):
        tags = registry.client().get_model_version(name, "2").tags
        assert (tags["init"], tags["init.parent_version"], tags["epochs"]) == ("champion", "1", "1"), name
    assert mv.tags["gate.decision"] == ("promoted" if clf["promote"] else "rejected")
    page = _artifact("retrain-summary")
    assert "# Retrain (by hand): retrained" in page and "| held out | 1 |" in page

    # nothing new since: the threshold is not reached and nothing is trained
    again = retrain_flow(profile="test", root=str(root), deploy=False, min_new=1)
    assert again["status"] == "skipped"
    assert again["reason"] == "0 new confirmed case(s) with a stored image; at least 1 needed"
    assert len(registry.client().search_model_versions(f"name='{registry.CLASSIFIER}'")) == 2
