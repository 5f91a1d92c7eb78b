"""Drift monitoring for real: the served model's log, its training reference, Evidently, the flow."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def _send(server, images: list[bytes]) -> None:
    for data in images:
        r = httpx.post(f"{server.url}/predict", files={"image": ("x.jpg", data, "image/jpeg")}, timeout=60)
        assert r.status_code == 200, r.text


def _shift(data: bytes) -> bytes:
    """Another camera: darker, blue cast, softer."""
    a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    a = np.clip(a * np.array([0.55, 0.65, 1.0]) + np.array([0, 0, 30]), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=60)
    return buf.getvalue()


@pytest.fixture
def monitor_env(deployed, monkeypatch):
    """This process in the service's state home: the log, params and reports are found from it alone."""
    root = deployed["root"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", deployed["env"]["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("DRSPOT_HOME", str(root))
    monkeypatch.delenv("DRSPOT_DATABASE_URL", raising=False)
    return root


def test_not_enough_data_is_not_a_false_alarm(tmp_path):
    from components.monitoring.monitor import monitor
    from infra.config import load_config
    from serving.store import PredictionLog

    log = PredictionLog(f"sqlite:///{tmp_path / 'empty.db'}")
    s = monitor(load_config("test"), log, lambda v: pytest.fail("no reference needed"), tmp_path / "out")
    assert s["status"] == "not enough data" and s["drift"] is False and s["needed"] == 30
    assert "0 predictions in the window; at least 30 are needed" in s["reasons"][0]


def _log_like_the_service(log, pipeline, ds, rows, shift: bool) -> None:
    """What the service logs for these photos, with a perfect detector (the manifest's first box)."""
    import hashlib
    import uuid

    from components.data.images import decode, quality
    from components.data.preprocess import to_uint8

    for r in rows:
        data = (ds / r["path"]).read_bytes()
        data = _shift(data) if shift else data
        rgb = decode(data).rgb
        crop = to_uint8(rgb, (r["boxes"] or [None])[0], pipeline.mc["crop_margin"], pipeline.mc["input_size"])
        p, emb, answered = pipeline.classify(crop[None])
        log.record(
            {
                "request_id": uuid.uuid4().hex,
                "image_sha256": hashlib.sha256(data).hexdigest(),
                "width": rgb.size[0],
                "height": rgb.size[1],
                "quality": quality(rgb),
                "embedding": emb[0].tolist(),
                "lesions": [],
                "label": pipeline.classes[int(answered[0])],
                "confidence": float(p[0][answered[0]]),
                "fallback": False,
                "classifier_version": "v",
            }
        )


def test_held_out_photos_pass_and_another_camera_is_drift(deployed, tmp_path):
    """Held-out (val + test) photos look like the training reference; the same photos from
    "another camera" (darker, blue cast, JPEG 60) do not."""
    import pyarrow.parquet as pq

    from components.monitoring import reference
    from components.monitoring.monitor import monitor
    from infra.config import load_config
    from serving.pipeline import Pipeline
    from serving.store import PredictionLog

    root, cfg = deployed["root"], load_config("test")
    rows = [r for r in pq.read_table(root / "prep" / "split" / "split.parquet").to_pylist() if r["split"] != "train"]
    assert len(rows) >= cfg.monitor.min_rows
    pipeline = Pipeline(root / "clf", None, cfg)
    ref = reference.load(root / "clf")
    for shift, expected in ((False, "no drift"), (True, "drift")):
        log = PredictionLog(f"sqlite:///{tmp_path / f'log-{shift}.db'}")
        _log_like_the_service(log, pipeline, root / "ds", rows, shift)
        s = monitor(cfg, log, lambda v: ref, tmp_path / f"out-{shift}", last=len(rows))
        assert s["status"] == expected, (shift, s["reasons"], s["drifted"])
        if shift:
            assert {"brightness", "mean_r"} <= set(s["drifted"])  # darker, with the red channel cut most
            assert (tmp_path / "out-True" / "drift_report.html").stat().st_size > 100_000


def test_the_monitor_flow_reads_the_service_log_and_emits_drift(server, deployed, monitor_env):
    """Over HTTP: shifted traffic -> the flow's verdict, report files, MLflow run, event."""
    from components.model import registry
    from flows.monitor import monitor_flow

    images = []
    for p in sorted((deployed["root"] / "ds" / "images").glob("*.jpg")):
        try:
            Image.open(p).load()
        except OSError:
            continue
        images.append(_shift(p.read_bytes()))
    _send(server, images[:40])
    s = monitor_flow(last=40, profile="test")
    assert s["status"] == "drift" and s["rows"]["current"] == 40 and s["classifier_version"].startswith("drspot-")
    assert "brightness" in s["drifted"]
    report = monitor_env / "reports" / "monitoring"
    assert list(report.glob("*/drift_report.html")) and list(report.glob("*/summary.json"))
    runs = registry.client().search_runs(
        [registry.client().get_experiment_by_name("monitoring").experiment_id], max_results=1
    )
    assert runs and runs[0].data.metrics["drift"] == 1.0 and runs[0].data.tags["status"] == "drift"
    # the served model's quality: no confirmations yet (the rule waits), estimated from its probabilities (CBPE)
    q = s["quality"]
    assert q["rule"]["status"] == "not enough confirmed cases" and not q["rule"]["fired"]
    assert q["estimate"]["version"] == s["classifier_version"] and q["estimate"]["rows"] == 40
    assert 0 < q["estimate"]["accuracy"] < 1
    assert runs[0].data.metrics["estimated.accuracy"] == q["estimate"]["accuracy"]
    assert list(report.glob("*/quality.html"))
