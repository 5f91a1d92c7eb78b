"""A trained classifier as the rest of DrSpot uses it: build a network (timm or ultralytics' YOLO-cls), load one from
a model folder, decode lesion crops into arrays, and predict logits and probabilities. Training lives in
:mod:`components.model.train_classifier`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "model.pt"
MODEL_CONFIG = "model_config.json"


# test-time augmentation (``classifier.tta``): the views of a square crop whose logits are averaged; a lesion seen from
# above has no "up", so the flips and quarter turns of the dihedral group are all photos of the same lesion. The sets
# are nested (the first 1, 2, 4 or 8 of :func:`view`), so one pass per view serves every set (:func:`view_logits`);
# ``classifier.tta_choices`` picks the set on validation after training (components/model/answer.py). Measured on
# HAM10000 (docs/benchmarks.md): more views lifted test balanced accuracy, not melanoma recall; profiles keep the flip.
TTA_VIEWS = {"none": 1, "flip": 2, "flips": 4, "dihedral": 8}


def tta_views(tta: bool | str) -> int:
    """How many views ``tta`` averages: a name of :data:`TTA_VIEWS`, or a bool of older models (true: the flip)."""
    if isinstance(tta, bool):
        return 2 if tta else 1
    if tta not in TTA_VIEWS:
        raise ValueError(f"unknown test-time augmentation {tta!r}; known: {', '.join(TTA_VIEWS)}")
    return TTA_VIEWS[tta]


def view(x, k: int):
    """The ``k``-th view (0-7) of a batch of square NCHW crops: bit 0 flips left-right, bit 1 upside down, bit 2
    transposes (with the flips, the quarter turns); 0 is the crop itself."""
    if k & 4:
        x = x.transpose(2, 3)
    if k & 2:
        x = x.flip(2)
    if k & 1:
        x = x.flip(3)
    return x


def over_views(first, fn, x, tta: bool | str):
    """The mean of ``first`` (``fn`` of the crops ``x`` as they are) and ``fn`` of each other view of ``tta``, in one
    traceable expression: the served ``embed`` (components/monitoring/reference.py, also the ONNX graph)."""
    n = tta_views(tta)
    total = first
    for k in range(1, n):
        total = total + fn(view(x, k))
    return total / n if n > 1 else total


class TrainingError(ValueError):
    """Training cannot start: the message says which setting or which data is wrong."""


@dataclass
class Arrays:
    x: np.ndarray  # (N, S, S, 3) uint8
    y: np.ndarray  # (N,) int64
    image_ids: list[str]


def check_backbone(name: str) -> None:
    """Refuse, before training, a backbone neither timm nor ultralytics (``yolov8n-cls``, components/model/yolo_cls.py)
    can build, naming similar timm names."""
    import timm

    from components.model import yolo_cls

    if yolo_cls.is_yolo(name):
        why = yolo_cls.check(name)
        if why:
            raise TrainingError(f"unknown YOLO classification backbone {name!r}: {why}")
        return
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise TrainingError(
            f"unknown timm backbone {name!r}" + (f"; similar names: {', '.join(close)}" if close else "")
        )


def load_arrays(rows: list[dict[str, Any]], dataset_dir: Path, classes: list[str], size: int, margin: float) -> Arrays:
    """Decode every row's crops (one per box, the whole image when none) into memory."""
    from components.data.images import decode
    from components.data.preprocess import to_uint8

    xs, ys, ids = [], [], []
    for r in rows:
        if r["label"] not in classes:
            continue
        rgb = decode(dataset_dir / r["path"]).rgb
        for box in r["boxes"] or [None]:
            xs.append(to_uint8(rgb, box, margin, size))
            ys.append(classes.index(r["label"]))
            ids.append(r["image_id"])
    x = np.stack(xs) if xs else np.zeros((0, size, size, 3), np.uint8)
    return Arrays(x, np.asarray(ys, np.int64), ids)


def build_model(backbone: str, num_classes: int):
    """A timm ``backbone`` (or an ultralytics YOLO classification network, ``yolov8n-cls``) with a ``num_classes``
    head, randomly initialised (weights: :mod:`components.model.weights`)."""
    import timm

    from components.model import yolo_cls

    if yolo_cls.is_yolo(backbone):
        return yolo_cls.YoloClassifier(backbone, num_classes)

    return timm.create_model(backbone, pretrained=False, num_classes=num_classes)


def load_model(model_dir: str | Path):
    """Rebuild a trained classifier (eval mode) and its config from a model folder."""
    import torch

    model_dir = Path(model_dir)
    mc = json.loads((model_dir / MODEL_CONFIG).read_text())
    model = build_model(mc["backbone"], len(mc["classes"]))
    model.load_state_dict(torch.load(model_dir / MODEL, map_location="cpu", weights_only=True))
    model = model.to(memory_format=torch.channels_last)
    model.eval()
    return model, mc


def predict(
    model, x_uint8: np.ndarray, mean, std, batch: int = 256, tta: bool | str = False
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and softmax probabilities for uint8 crops (N, S, S, 3); with ``tta``, the logits averaged over its
    views (:func:`view_logits`)."""
    import torch

    logits = torch.from_numpy(view_logits(model, x_uint8, mean, std, tta_views(tta), batch).mean(0))
    return logits.numpy(), torch.softmax(logits, 1).numpy()


def view_logits(model, x_uint8: np.ndarray, mean, std, views: int, batch: int = 256) -> np.ndarray:
    """The logits of each of the first ``views`` views (:func:`view`) of uint8 crops, shape (views, N, classes): the
    mean of the first :func:`tta_views` of them is :func:`predict`'s logits for that setting (the sets are nested,
    so one pass per view serves every set)."""
    import torch

    from components.data.preprocess import normalise

    outs = []
    with torch.no_grad():
        for i in range(0, len(x_uint8), batch):
            xb = torch.from_numpy(normalise(x_uint8[i : i + batch], mean, std))
            outs.append(
                torch.stack([model(view(xb, k).contiguous(memory_format=torch.channels_last)) for k in range(views)])
            )
    return torch.cat(outs, 1).numpy() if outs else np.zeros((views, 0, 1), np.float32)
