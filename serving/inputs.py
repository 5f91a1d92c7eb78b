"""What the service accepts as an image, and the clear 4xx it gives for anything else.

Checks in the order that keeps a hostile upload cheap: body size (before parsing), format and
pixel count from the header (before decoding: decompression bombs), then a full decode through
:func:`components.data.images.decode` (EXIF orientation applied; CMYK, palette, 16-bit, alpha and
grayscale converted to 8-bit RGB), then minimum size and the quality policy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass, field

from PIL import Image

from components.data.images import Decoded, ImageError, decode, jpeg_scale, quality
from infra.config import Serving


class InputError(Exception):
    """A request the service refuses: HTTP ``status``, a short ``error`` and a ``detail`` saying what was wrong."""

    def __init__(self, status: int, error: str, detail: str, reason: str, headers: dict | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.reason = status, error, detail, reason
        self.headers = headers

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


@dataclass
class Upload:
    """An accepted image: the decoded RGB picture, its hash, format and quality assessment."""

    data: bytes
    sha256: str
    format: str
    decoded: Decoded
    quality: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    @property
    def rgb(self) -> Image.Image:
        """The working picture: the photo reduced to ``serving.work_side`` (boxes are normalised: both share them)."""
        return self.decoded.rgb

    @property
    def size(self) -> tuple[int, int]:
        """The photo's own width x height (what answers report, and what their boxes refer to)."""
        return self.decoded.size

    def release(self) -> None:
        """Drop the decoded pixels once analysed (a sequence's frames are held at once only as bytes)."""
        self.decoded.rgb = None  # type: ignore[assignment]


def body_limit(s: Serving) -> int:
    return int(s.max_body_mb * 1024 * 1024)


def check_length(content_length: str | None, s: Serving) -> None:
    """Refuse a body that announces itself as too large, before reading it."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError as e:
        raise InputError(400, "bad request", f"Content-Length {content_length!r} is not a number", "bad_header") from e
    if n > body_limit(s):
        raise InputError(
            413,
            "request body too large",
            f"the body is {n / 1048576:.1f} MB; the limit is {s.max_body_mb:g} MB",
            "body_too_large",
        )


def from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(422, "invalid image field", f"'image' is not valid base64 ({e})", "bad_base64") from e


def assess(q: dict[str, float], width: int, height: int, s: Serving) -> list[str]:
    """Quality warnings (blur, exposure); resolution is checked separately as a hard limit."""
    warnings = []
    if q["blur"] < s.blur_min:
        warnings.append(f"blurred: sharpness {q['blur']:.1f} is below {s.blur_min:g}; retake the photo in focus")
    if q["brightness"] < s.brightness_min:
        warnings.append(f"under-exposed: brightness {q['brightness']:.2f} is below {s.brightness_min:g}")
    if q["brightness"] > s.brightness_max:
        warnings.append(f"over-exposed: brightness {q['brightness']:.2f} is above {s.brightness_max:g}")
    if min(width, height) < s.low_resolution_side:
        warnings.append(f"low resolution: {width}x{height}; the classifier sees more detail in larger photos")
    return warnings


def decoded_pixels(fmt: str, w: int, h: int, s: Serving) -> int:
    """Pixels a photo of this format and header size decodes to: a JPEG at its DCT scale (``serving.work_side``), any
    other format whole."""
    k = jpeg_scale(max(w, h), s.work_side) if fmt == "JPEG" else 1
    return -(-w // k) * -(-h // k)


def check_decode(fmt: str, w: int, h: int, s: Serving) -> None:
    """Refuse, from the header, a photo whose decode would take more than ``serving.max_decode_pixels``."""
    n = decoded_pixels(fmt, w, h, s)
    if n > s.max_decode_pixels:
        raise InputError(
            422,
            "image has too many pixels",
            f"a {w}x{h} {fmt} decodes to {n:,} pixels; the limit is {s.max_decode_pixels:,} "
            "(serving.max_decode_pixels; JPEG decodes reduced, other formats whole): send a JPEG or a smaller image",
            "too_many_pixels",
        )


def read_image(data: bytes, s: Serving) -> Upload:
    """Validate and decode an uploaded image.

    Raises:
        InputError: 400 empty, 413 too large, 415 not an accepted image format (or animated),
            422 undecodable / truncated / too small / over the pixel limit / refused by the quality policy.
    """
    if not data:
        raise InputError(400, "empty image", "the uploaded file has no bytes", "empty")
    if len(data) > body_limit(s):
        raise InputError(
            413,
            "image too large",
            f"the file is {len(data) / 1048576:.1f} MB; the limit is {s.max_body_mb:g} MB",
            "body_too_large",
        )
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            fmt, (w, h), frames = probe.format or "unknown", probe.size, getattr(probe, "n_frames", 1)
            if fmt == "MPO":  # a phone's JPEG with a gain or depth map after it (MPF): its primary image is the photo
                fmt, frames = "JPEG", 1
    except Image.DecompressionBombError as e:
        raise InputError(422, "image has too many pixels", str(e), "too_many_pixels") from e
    except Exception as e:
        raise InputError(
            415,
            "not an image",
            f"the file is not a recognisable image; send one of: {', '.join(s.formats)}",
            "not_an_image",
        ) from e
    if fmt not in s.formats:
        raise InputError(
            415, "unsupported image format", f"{fmt} is not accepted; send one of: {', '.join(s.formats)}", "format"
        )
    if frames > 1:
        raise InputError(415, "animated image", f"{fmt} with {frames} frames; send a single still photo", "animated")
    if w * h > s.max_pixels:
        raise InputError(
            422,
            "image has too many pixels",
            f"the header says {w}x{h} = {w * h:,} pixels; the limit is {s.max_pixels:,} (checked before decoding)",
            "too_many_pixels",
        )
    check_decode(fmt, w, h, s)
    try:
        decoded = decode(data, max_pixels=s.max_pixels, max_side=s.work_side)
    except ImageError as e:
        what = {"truncated": "image is truncated or corrupt", "too_many_pixels": "image has too many pixels"}
        raise InputError(422, what.get(e.check, "image cannot be decoded"), e.reason, e.check) from e
    w, h = decoded.size
    if min(w, h) < s.min_side:
        raise InputError(422, "image too small", f"{w}x{h}: both sides must be at least {s.min_side} px", "too_small")
    q = quality(decoded.rgb)
    warnings = assess(q, w, h, s)
    if warnings and s.quality_policy == "reject":
        raise InputError(422, "image quality too poor", "; ".join(warnings), "quality")
    return Upload(data, hashlib.sha256(data).hexdigest(), fmt, decoded, q, warnings)
