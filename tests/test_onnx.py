"""ONNX: `drspot deploy` exports both champions, checked against PyTorch; the service can run on ONNX Runtime."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from infra.config import load_config

pytestmark = pytest.mark.slow


def _bento_model(deployed, kind: str) -> Path:
    """The folder of the deployed Bento model of ``kind`` (in the test project's BentoML store)."""
    state = json.loads((deployed["root"] / ".drspot" / "deployed.json").read_text())
    name, version = state["models"][kind].split(":")
    (folder,) = [p for p in deployed["root"].rglob(f"models/{name}/{version}") if p.is_dir()]
    return folder


def _cfg(runtime: str, limit: float = 1e-3):
    cfg = load_config("test")
    return cfg.model_copy(
        update={"serving": cfg.serving.model_copy(update={"runtime": runtime, "onnx_max_abs_diff": limit})}
    )


def _photos(deployed, n: int) -> list[Image.Image]:
    out = []
    for p in sorted((deployed["root"] / "ds" / "images").glob("*.jpg")):
        try:
            out.append(Image.open(p).convert("RGB"))
        except Exception:  # the planted corrupt files
            continue
        if len(out) == n:
            break
    return out


def test_deploy_exports_both_champions_checked_against_pytorch(deployed):
    text = deployed["deploy_stdout"]
    assert "  ONNX export classifier.onnx: max abs difference from PyTorch" in text
    assert "  ONNX export detector.onnx: max abs difference from PyTorch" in text
    state = json.loads((deployed["root"] / ".drspot" / "deployed.json").read_text())
    for kind, file in (("classifier", "classifier.onnx"), ("detector", "detector.onnx")):
        check = state["onnx"][kind]
        assert check["file"] == file and check["limit"] == 1e-3 and check["inputs"] == 8
        assert 0 <= max(check["max_abs_diff"].values()) <= 1e-3, check
        assert (_bento_model(deployed, kind) / file).stat().st_size > 100_000


def test_the_pipeline_on_onnx_runtime_answers_as_on_pytorch(deployed):
    from serving import onnx_export
    from serving.pipeline import Pipeline

    clf, det = _bento_model(deployed, "classifier"), _bento_model(deployed, "detector")
    eager, onnx = Pipeline(clf, det, _cfg("torch")), Pipeline(clf, det, _cfg("onnx"))
    assert onnx.model is None and onnx.ort is not None and str(onnx.detector.ckpt_path).endswith("detector.onnx")
    # both sessions are ours, their threads sleeping between calls (ONNX Runtime's spinning default starved the
    # request handling of the cores it shares with the model)
    assert onnx.detector_session.startswith("DrSpot's"), onnx.detector_session
    for session in (onnx.ort, onnx.detector.predictor.model.backend.session):
        assert session.get_session_options().get_session_config_entry(onnx_export.SPINNING) == "0"
    photos = _photos(deployed, 6)
    for a, b in zip(eager.analyse_many(photos), onnx.analyse_many(photos), strict=True):
        assert a["fallback"] == b["fallback"] and len(a["lesions"]) == len(b["lesions"])
        for x, y in zip(a["lesions"], b["lesions"], strict=True):
            assert x["label"] == y["label"]
            assert max(abs(x["probabilities"][c] - y["probabilities"][c]) for c in x["probabilities"]) < 1e-3
            if x["box"] is not None:
                assert max(abs(u - v) for u, v in zip(x["box"], y["box"], strict=True)) < 1e-3


def _cpu_ticks_by_thread() -> dict[str, int]:
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended
            continue
        out[task.name] = int(fields[11]) + int(fields[12])  # utime + stime
    return out


def test_the_onnx_pipeline_in_process_leaves_no_thread_spinning_beside_its_caller(deployed):
    # in process (drspot predict on a folder, the canary, the raw benchmark) the caller's PyTorch work around the
    # detector's session once ran on an OpenMP team of one thread per core, which spun after every call: 6 of every 19
    # CPU ms a photo
    import threading

    import torch

    from serving.pipeline import Pipeline

    clf, det = _bento_model(deployed, "classifier"), _bento_model(deployed, "detector")
    cfg = _cfg("onnx")
    onnx = Pipeline(clf, det, cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"threads": 1})}))
    photos = _photos(deployed, 4)
    torch.set_num_threads(max(2, torch.get_num_threads()))  # a process without OMP_NUM_THREADS: one per core
    onnx.analyse_many(photos)
    before, caller = _cpu_ticks_by_thread(), str(threading.get_native_id())
    for _ in range(40):
        onnx.analyse_many(photos)
    after = _cpu_ticks_by_thread()
    used = {t: after[t] - before.get(t, 0) for t in after}
    others = sum(v for t, v in used.items() if t != caller)
    assert used[caller] >= 20, used  # 160 photos: at least 0.2 s of the caller's CPU
    # measured on the test profile's models: 0 ticks now, 15 beside the caller's 48 before
    assert others <= 0.1 * used[caller], f"other threads used {others} ticks beside the caller's {used[caller]}"
    assert torch.get_num_threads() == 1


def test_a_disagreeing_export_is_refused_and_never_served(deployed, tmp_path):
    from serving.deploy import DeployError, export_onnx
    from serving.onnx_export import OnnxMismatch, export_classifier
    from serving.pipeline import Pipeline

    folder = tmp_path / "clf"
    shutil.copytree(_bento_model(deployed, "classifier"), folder)
    (folder / "classifier.onnx").unlink()
    with pytest.raises(OnnxMismatch) as e:
        export_classifier(folder, 1e-12)
    assert "the classifier's ONNX export disagrees with PyTorch: max abs difference of the" in str(e.value)
    assert "> serving.onnx_max_abs_diff 1e-12 on 8 fixed inputs; the export was discarded and is not served" in str(
        e.value
    )
    assert not (folder / "classifier.onnx").exists()
    # deploying with the torch runtime records the refusal; with the onnx runtime it stops the deploy
    assert "disagrees with PyTorch" in export_onnx("classifier", folder, _cfg("torch", 1e-12))["error"]
    with pytest.raises(DeployError, match=r"\(serving.runtime is onnx: nothing deployed\)"):
        export_onnx("classifier", folder, _cfg("onnx", 1e-12))
    with pytest.raises(RuntimeError, match="serving.runtime is onnx, but .* has no classifier.onnx"):
        Pipeline(folder, None, _cfg("onnx"))


def test_the_service_serves_on_onnx_runtime(deployed, server):
    from tests.serving_fixtures import Server

    env = {**deployed["env"], "DRSPOT_SET": "serving.runtime=onnx"}
    onnx = Server(env, deployed["root"] / "serve-onnx.log")
    try:
        ready = httpx.get(f"{onnx.url}/readyz", timeout=10).json()
        assert ready["runtime"] == "onnx", ready
        for photo in _photos(deployed, 3):
            buf = io.BytesIO()
            photo.save(buf, format="JPEG", quality=95)
            files = {"image": ("x.jpg", buf.getvalue(), "image/jpeg")}
            a = httpx.post(f"{server.url}/predict", files=files, timeout=60).json()
            b = httpx.post(f"{onnx.url}/predict", files=files, timeout=60).json()
            assert [x["label"] for x in a["lesions"]] == [y["label"] for y in b["lesions"]]
            assert abs(a["lesions"][0]["malignant_probability"] - b["lesions"][0]["malignant_probability"]) < 1e-3
    finally:
        onnx.stop()


def test_the_eight_view_test_time_augmentation_exports_within_the_limit(deployed, tmp_path):
    """classifier.tta: dihedral puts the eight flips and quarter turns of each crop inside the ONNX graph; the
    export agrees with PyTorch's eight-view logits, and ONNX Runtime answers the averaged logits, not one view's."""
    import numpy as np

    from serving.onnx_export import export_classifier, session

    folder = tmp_path / "clf"
    shutil.copytree(_bento_model(deployed, "classifier"), folder)
    (folder / "classifier.onnx").unlink()
    mc = json.loads((folder / "model_config.json").read_text())
    flip = session(_bento_model(deployed, "classifier") / "classifier.onnx")
    (folder / "model_config.json").write_text(json.dumps({**mc, "tta": "dihedral"}))
    check = export_classifier(folder, 1e-3)
    assert 0 <= max(check["max_abs_diff"].values()) <= 1e-3, check
    x = np.random.default_rng(1).normal(size=(2, 3, mc["input_size"], mc["input_size"])).astype(np.float32)
    eight = session(folder / "classifier.onnx").run(None, {"input": x})
    two = flip.run(None, {"input": x})
    np.testing.assert_allclose(eight[0], two[0], atol=1e-4)  # the embedding: the crop as it is
    assert np.abs(eight[1] - two[1]).max() > 1e-3  # the logits: eight views averaged, not two
