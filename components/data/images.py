"""Decoding any image to RGB, its quality features, and its perceptual hash.

One place for how pixels are read, shared by validation, de-duplication, training and serving so
that they cannot drift apart: EXIF orientation applied, every mode converted (CMYK, palette,
16-bit, alpha, grayscale), animated images reduced to their first frame, truncated files refused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# A truncated JPEG must fail, not decode to a grey tail.
Image.LOAD_TRUNCATED_IMAGES = False

PHASH_BITS = 64


class ImageError(ValueError):
    """An image cannot be used; ``check`` names the check that refused it."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason


@dataclass
class Decoded:
    rgb: Image.Image
    original_mode: str
    notes: list[str]
    size: tuple[int, int]  # the photo's own width x height (EXIF orientation applied), before any reduction


def jpeg_scale(side: int, target: int) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) a decode may use when ``side`` must stay at least ``target``: the largest
    that keeps it so (1 when ``target`` is 0: decode whole)."""
    if not target:
        return 1
    return max((k for k in (1, 2, 4, 8) if side // k >= target), default=1)


def decode(source: str | Path | bytes, max_pixels: int | None = None, min_side: int = 0, max_side: int = 0) -> Decoded:
    """Fully decode an image into 8-bit RGB.

    Args:
        source: a path or the file's bytes.
        max_pixels: refuse images with more pixels than this, *before* decoding them
            (decompression bombs); None for no limit.
        min_side: for work that needs no more pixels: decode at the smallest of 1/2, 1/4, 1/8 of the size whose
            shorter side is still at least this (a JPEG is scaled in its DCT while decoding, several times faster
            than decoding it whole; other formats are reduced after); 0 for the full size.
        max_side: reduce the picture so its longer side is at most this (a JPEG is decoded at the DCT scale that
            keeps it at least this, then resized): the working size of the service, whose memory and CPU per photo
            then depend on it, not on the upload; 0 to keep the size. ``Decoded.size`` keeps the photo's own size.

    Raises:
        ImageError: with ``check`` one of ``unreadable``, ``too_many_pixels``, ``truncated``.
    """
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", str(e)) from e
    except Exception as e:  # UnidentifiedImageError, OSError
        raise ImageError("unreadable", "not a recognisable image file") from e
    with im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageError("too_many_pixels", f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
        notes = []
        if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":  # MPO: a JPEG photo with its gain/depth maps
            notes.append(f"animated ({im.n_frames} frames): first frame used")
        try:
            im.seek(0)
            shrink = jpeg_scale(max(w, h), max_side) if max_side else jpeg_scale(min(w, h), min_side)
            if shrink > 1:
                im.draft(None, (w // shrink, h // shrink))  # JPEG only; a no-op for others
            im.load()
            scaled = im.size != (w, h)
        except Image.DecompressionBombError as e:
            raise ImageError("too_many_pixels", str(e)) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError("truncated", f"the file does not fully decode ({e})") from e
        mode, before = im.mode, im.size
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block leaves the pixels usable
            notes.append("EXIF orientation unreadable: ignored")
        size = (h, w) if im.size != before and im.size == before[::-1] else (w, h)
        rgb = to_rgb(im, notes)
    if shrink > 1 and not scaled:  # not a JPEG, or one its DCT did not scale
        rgb = rgb.reduce(shrink)
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.BILINEAR, reducing_gap=None)
    return Decoded(rgb=rgb, original_mode=mode, notes=notes, size=size)


def to_rgb(im: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on black, 16-bit rescaled."""
    notes = notes if notes is not None else []
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        notes.append(f"{im.mode} rescaled to 8 bits")
        return Image.fromarray(((arr - lo) * scale).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min() < 255:
            notes.append(f"transparency composited on black ({(alpha < 255).mean():.0%} of pixels)")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if im.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    return im.convert("RGB")


QUALITY_FEATURES = ("brightness", "contrast", "saturation", "blur", "blockiness", "mean_r", "mean_g", "mean_b")


def quality(rgb: Image.Image, max_side: int = 512) -> dict[str, float]:
    """Per-image features recorded for monitoring: brightness, contrast, saturation, blur, JPEG
    blockiness, colour (:data:`QUALITY_FEATURES`).

    Computed on a copy whose long side is at most ``max_side``, so the blur score (variance of
    the Laplacian) is comparable between sources of different resolution. Blockiness is measured
    at the original resolution (a resize would smear the codec's 8-pixel grid): :func:`blockiness`.
    """
    small = rgb.copy()
    small.thumbnail((max_side, max_side), Image.BILINEAR)
    a = np.asarray(small, dtype=np.float32) / 255.0
    gray = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    # channel-wise max/min of three planes: the same values as a.max(-1)/a.min(-1), 10x faster (numpy reduces a
    # last axis of length 3 slowly: 7 ms each on a 512x384 photo, most of the gate's per-image time)
    r, g_, b = a[..., 0], a[..., 1], a[..., 2]
    mx, mn = np.maximum(np.maximum(r, g_), b), np.minimum(np.minimum(r, g_), b)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
    g = gray * 255.0
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return {
        "brightness": float(gray.mean()),
        "contrast": float(gray.std()),
        "saturation": float(sat.mean()),
        "blur": float(lap.var()) if lap.size else 0.0,
        "blockiness": blockiness(rgb, max_side),
        "mean_r": float(a[..., 0].mean()),
        "mean_g": float(a[..., 1].mean()),
        "mean_b": float(a[..., 2].mean()),
    }


def blockiness(rgb: Image.Image, max_side: int = 512) -> float:
    """JPEG blocking: mean absolute grey-level step across the 8-pixel block boundaries divided by
    the mean step inside blocks (about 1 for an image never JPEG-compressed; it grows as the quality
    setting falls). Measured on a centred window of at most ``max_side`` pixels a side, cut at a
    multiple of 8 from the origin so that the window keeps the codec's grid."""
    w, h = rgb.size
    x0, y0 = max(0, (w - max_side) // 2) // 8 * 8, max(0, (h - max_side) // 2) // 8 * 8
    win = rgb.crop((x0, y0, min(w, x0 + max_side), min(h, y0 + max_side)))
    g = np.asarray(win.convert("L"), dtype=np.float32)
    dx, dy = np.abs(np.diff(g, axis=1)), np.abs(np.diff(g, axis=0))
    bx, by = (np.arange(dx.shape[1]) + 1) % 8 == 0, (np.arange(dy.shape[0]) + 1) % 8 == 0
    on = np.concatenate([dx[:, bx].ravel(), dy[by, :].ravel()])
    off = np.concatenate([dx[:, ~bx].ravel(), dy[~by, :].ravel()])
    if not on.size or not off.size:
        return 1.0  # smaller than one block: no grid to measure
    return float(on.mean() / max(float(off.mean()), 1e-3))


_DCT_CACHE: dict[int, np.ndarray] = {}


def _dct_matrix(n: int) -> np.ndarray:
    if n not in _DCT_CACHE:
        k = np.arange(n)[:, None]
        m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
        m[0] /= np.sqrt(2)
        _DCT_CACHE[n] = m
    return _DCT_CACHE[n]


def centre_crop(img: Image.Image, fraction: float) -> Image.Image:
    """The image less ``fraction`` of its width/height on each side (unchanged if that leaves nothing)."""
    if not fraction:
        return img
    w, h = img.size
    dx, dy = int(round(w * fraction)), int(round(h * fraction))
    return img.crop((dx, dy, w - dx, h - dy)) if w - 2 * dx > 1 and h - 2 * dy > 1 else img


CROP_HASHES = (0.03, 0.06)  # centre crops hashed besides the whole image (see components.data.dedup)


def phash(rgb: Image.Image, crop: float = 0.0) -> int:
    """64-bit perceptual hash: 8x8 lowest frequencies of the 32x32 grayscale DCT, above the median.

    ``crop`` hashes the centre crop that leaves out that fraction on each side; a copy of an image
    cropped by about that much hashes close to it, where its whole-image hash may not.
    """
    gray = centre_crop(rgb.convert("L"), crop)
    a = np.asarray(gray.resize((32, 32), Image.LANCZOS), dtype=np.float64)
    d = _dct_matrix(32)
    low = (d @ a @ d.T)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def thumbnails(
    rgb: Image.Image,
    crops: tuple[float, ...] = (0.0, 0.015, 0.03, 0.045, 0.06),
    size: int = 24,
    centre: float = 0.0,
    colour: bool = False,
) -> np.ndarray:
    """Zero-mean, unit-norm thumbnails of centre crops, for crop-aware comparison.

    Two images are near-duplicates when some crop of one correlates with some crop of the other
    almost perfectly (see :func:`components.data.dedup.verify`). ``centre``: each crop is further cut to its middle
    (this share removed on each side), where the lesion is; ``colour``: RGB channels (each zero-mean) instead of grey.
    """
    img = rgb if colour else rgb.convert("L")
    out = []
    for f in crops:
        t = centre_crop(centre_crop(img, f), centre).resize((size, size), Image.LANCZOS)
        a = np.asarray(t, dtype=np.float64)
        if colour:
            a = a - a.mean(axis=(0, 1))
        a = a.ravel() - a.mean()
        out.append(a / (np.linalg.norm(a) + 1e-9))
    return np.stack(out)
