"""Both champions as ONNX, checked against PyTorch before anything serves them.

* The classifier: :func:`torch.onnx.export` of the module the service calls (penultimate embedding and logits, the
  flip test-time augmentation included when the model was trained with it), batch dimension dynamic.
* The detector: ultralytics' own exporter (``format="onnx"``, offline: no simplifier download), at the image size
  it was trained at, batch dimension dynamic (a static batch of 1 made the service run a batch photo by photo).

Each export is run with ONNX Runtime on a fixed input set beside the PyTorch model; the largest absolute
difference of every output is recorded and compared with ``serving.onnx_max_abs_diff``. An export over the limit
raises :class:`OnnxMismatch` with the difference, and is deleted: nothing is served from a bad export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CLASSIFIER_ONNX = "classifier.onnx"
DETECTOR_ONNX = "detector.onnx"
FILES = {"classifier": CLASSIFIER_ONNX, "detector": DETECTOR_ONNX}  # each kind's export, in its model folder
CHECK_FILE = "onnx_check.json"
CHECK_INPUTS = 8  # fixed inputs each export is compared on


class OnnxMismatch(RuntimeError):
    """An ONNX export whose outputs differ from the PyTorch model's by more than the limit."""


def _inputs(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` fixed uint8 photos-like inputs (smooth colour fields with a dark blob), NHWC."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = np.empty((n, size, size, 3), np.uint8)
    for k in range(n):
        base = rng.uniform(120, 230, 3) + 30 * np.stack([xx, yy, xx * yy], -1)
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < r**2
        img = base - blob[..., None] * rng.uniform(60, 110, 3) + rng.normal(0, 6, (size, size, 3))
        out[k] = np.clip(img, 0, 255).astype(np.uint8)
    return out


SPINNING = "session.intra_op.allow_spinning"


def session(path: str | Path, threads: int = 0):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (0: ONNX Runtime's default, one per core) that
    sleep between calls. ONNX Runtime's default keeps them spinning, waiting for the next call: in the service they
    burned the cores that the requests' decoding, logging and HTTP needed (bench/serving.py, demo models, concurrency
    8: 73 -> 121 photos/s, 25 -> 11 CPU ms per request)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry(SPINNING, "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def own_detector_session(yolo, path: str | Path, imgsz: int, threads: int) -> str:
    """Run an ultralytics YOLO loaded from ``path`` (its ONNX export) on a :func:`session` of ours: ultralytics builds
    its own with ONNX Runtime's defaults (spinning threads, one per core) and takes no options. Its predictor is set up
    with one call on a blank picture, then its session replaced. Returns which session the detector runs on."""
    yolo.predict(np.zeros((imgsz, imgsz, 3), np.uint8), imgsz=imgsz, device="cpu", verbose=False)
    backend = getattr(getattr(getattr(yolo, "predictor", None), "model", None), "backend", None)
    if backend is None or not hasattr(backend, "session"):  # another ultralytics: keep its own, and say so
        return "ultralytics' own (ONNX Runtime defaults: spinning threads)"
    backend.session = session(path, threads)
    return f"DrSpot's ({threads or 'default'} threads, not spinning)"


def export_classifier(model_dir: str | Path, limit: float) -> dict[str, Any]:
    """Write ``classifier.onnx`` into ``model_dir`` and check it; returns the check (differences, limit, inputs).

    Raises:
        OnnxMismatch: an output differs by more than ``limit`` (the file is removed).
    """
    import torch

    from components.data.preprocess import normalise
    from components.model.classifier import load_model
    from components.monitoring.reference import embed

    model_dir = Path(model_dir)
    model, mc = load_model(model_dir)
    tta = mc.get("tta", False)

    class Served(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return embed(self.model, x, tta)

    x = torch.from_numpy(normalise(_inputs(CHECK_INPUTS, mc["input_size"]), mc["mean"], mc["std"]))
    out = model_dir / CLASSIFIER_ONNX
    with torch.no_grad():
        torch.onnx.export(
            Served().eval(),
            (x,),
            str(out),
            input_names=["input"],
            output_names=["embedding", "logits"],
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
        emb, logits = embed(model, x.contiguous(memory_format=torch.channels_last), tta)
    got_emb, got_logits = session(out).run(None, {"input": x.numpy()})
    t = float(mc.get("temperature", 1.0))
    diffs = {
        "embedding": float(np.abs(got_emb - emb.numpy()).max()),
        "logits": float(np.abs(got_logits - logits.numpy()).max()),
        "probabilities": float(np.abs(_softmax(got_logits / t) - _softmax(logits.numpy() / t)).max()),
    }
    return _judge("classifier", out, diffs, limit, {"inputs": CHECK_INPUTS, "input_size": mc["input_size"]})


def export_detector(model_dir: str | Path, limit: float) -> dict[str, Any]:
    """Write ``detector.onnx`` into ``model_dir`` with ultralytics' exporter and check its raw output.

    Raises:
        OnnxMismatch: the output differs by more than ``limit`` (the file is removed).
    """
    import torch

    from infra.env import ultralytics

    model_dir = Path(model_dir)
    dc = json.loads((model_dir / "detector_config.json").read_text())
    imgsz = int(dc.get("imgsz", 128))
    import logging

    yolo = ultralytics().YOLO(str(model_dir / "detector.pt"))
    log = logging.getLogger("ultralytics")
    level = log.level
    log.setLevel(logging.WARNING)  # the exporter's banner and "Visualize: https://netron.app" lines: not deploy's
    try:
        written = yolo.export(format="onnx", imgsz=imgsz, dynamic=True, simplify=False, device="cpu", verbose=False)
    finally:
        log.setLevel(level)
    written = Path(written)
    out = model_dir / DETECTOR_ONNX
    if written.resolve() != out.resolve():
        written.replace(out)
    x = torch.from_numpy(_inputs(CHECK_INPUTS, imgsz, seed=1)).permute(0, 3, 1, 2).float() / 255
    net = ultralytics().YOLO(str(model_dir / "detector.pt")).model.eval()
    sess = session(out)
    name = sess.get_inputs()[0].name
    with torch.no_grad():  # all 8 at once: the export's batch dimension is dynamic (the service batches requests)
        want = net(x)
        want = (want[0] if isinstance(want, list | tuple) else want).numpy()
    got = sess.run(None, {name: x.numpy()})[0]
    worst = float(np.abs(got - want).max())
    return _judge("detector", out, {"raw_output": worst}, limit, {"inputs": CHECK_INPUTS, "imgsz": imgsz})


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _judge(kind: str, out: Path, diffs: dict[str, float], limit: float, extra: dict[str, Any]) -> dict[str, Any]:
    check = {"file": out.name, "max_abs_diff": diffs, "limit": limit, **extra}
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > limit:
        out.unlink(missing_ok=True)
        raise OnnxMismatch(
            f"the {kind}'s ONNX export disagrees with PyTorch: max abs difference of the {worst} "
            f"{diffs[worst]:.3g} > serving.onnx_max_abs_diff {limit:g} on {extra['inputs']} fixed inputs; "
            "the export was discarded and is not served"
        )
    return check
