"""The one preprocessing path shared by training, evaluation and serving.

An image becomes classifier input by: decode to RGB (:mod:`components.data.images`), crop the lesion's
box plus a margin (or keep the whole image when there is no box: the serving fallback), resize to
a square of ``input_size``, scale to [0, 1] and normalise with the statistics measured on the
training crops and saved with the model. Keeping this in one function is what stops training and
serving from drifting apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def lesion_crop(rgb: Image.Image, box: Sequence[float] | None, margin: float) -> Image.Image:
    """The box (normalised x_min, y_min, x_max, y_max) grown by ``margin`` x its size on each side,
    clipped to the image; the whole image when ``box`` is None."""
    if box is None:
        return rgb
    w, h = rgb.size
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    left, top = max(0.0, x0 - margin * bw) * w, max(0.0, y0 - margin * bh) * h
    right, bottom = min(1.0, x1 + margin * bw) * w, min(1.0, y1 + margin * bh) * h
    if right - left < 2 or bottom - top < 2:
        return rgb
    return rgb.crop((round(left), round(top), round(right), round(bottom)))


def to_uint8(rgb: Image.Image, box: Sequence[float] | None, margin: float, input_size: int) -> np.ndarray:
    """Crop and resize: an (input_size, input_size, 3) uint8 array."""
    crop = lesion_crop(rgb, box, margin).resize((input_size, input_size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.uint8)


def normalise(batch_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalised."""
    x = batch_uint8.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
