"""An ultralytics YOLO classification network as DrSpot's classifier (``classifier.backbone: yolov8n-cls``).

The network is ultralytics' own ``ClassificationModel`` built from its packaged yaml (``yolov8n-cls.yaml``: the
YOLOv8 backbone at scale ``n`` and its ``Classify`` head), from scratch, with nothing downloaded. It is wrapped in
the small part of timm's interface the rest of DrSpot uses (``forward_features``, ``forward_head(pre_logits=)``,
``get_classifier``), so it goes through the same training loop, calibration, evaluation, registration, ONNX export
and serving as a timm backbone; its forward always returns logits (ultralytics' head returns probabilities outside
training, which DrSpot's calibration would then soften twice).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_yolo(backbone: str) -> bool:
    """An ultralytics classification model's name: ``yolov8n-cls``, ``yolo11s-cls`` ... (``<name>.yaml``)."""
    return backbone.startswith("yolo") and backbone.endswith("-cls")


def _network(backbone: str, num_classes: int) -> Any:
    import logging

    from infra.env import ultralytics

    ultralytics()  # offline settings before ultralytics builds anything
    from ultralytics.nn.tasks import ClassificationModel
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # its "Overriding model.yaml nc=1000 with nc=7" and layer summary
    try:
        return ClassificationModel(f"{backbone}.yaml", ch=3, nc=num_classes, verbose=False)
    finally:
        LOGGER.setLevel(level)


def check(backbone: str) -> str | None:
    """Why ``backbone`` cannot be built (ultralytics has no such yaml), or None."""
    try:
        _network(backbone, 2)
    except (FileNotFoundError, KeyError, ValueError) as e:
        return f"ultralytics has no classification model {backbone}.yaml ({type(e).__name__}: {e})"
    return None


class YoloClassifier(nn.Module):
    """ultralytics' YOLO classification network behind timm's interface (see the module's docstring)."""

    default_cfg = {"classifier": "net.model.{last}.linear"}

    def __init__(self, backbone: str, num_classes: int) -> None:
        super().__init__()
        self.net = _network(backbone, num_classes)
        head = self.net.model[-1]
        if type(head).__name__ != "Classify":
            raise ValueError(f"{backbone}.yaml does not end in a Classify head (got {type(head).__name__})")
        self.num_features = head.linear.in_features
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net.model[:-1]:  # classification yamls are a plain chain (every layer's "from" is -1)
            x = layer(x)
        return self.net.model[-1].conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        head = self.net.model[-1]
        x = head.drop(head.pool(x).flatten(1))
        return x if pre_logits else head.linear(x)

    def get_classifier(self) -> nn.Module:
        return self.net.model[-1].linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
