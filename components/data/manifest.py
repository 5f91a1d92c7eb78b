"""The dataset contract: a folder of images plus ``manifest.parquet``, one row per image.

The manifest is written with pyarrow alone
(no pandas metadata) in row groups as rows arrive, so memory does not grow with the dataset, and
the bytes are a function of the rows only: re-ingesting a source gives a byte-identical file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.parquet"

# Optional metadata columns; always present (null where a source lacks them) so every manifest
# has one schema and datasets from different sources concatenate.
EXTRA_COLUMNS: dict[str, pa.DataType] = {
    "age": pa.float64(),
    "sex": pa.string(),
    "localization": pa.string(),
    "dx_type": pa.string(),
    "patient_id": pa.string(),  # where a source has one: the split keeps a patient's images together
}

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("label", pa.string()),
        ("lesion_id", pa.string()),
        ("boxes", pa.list_(pa.list_(pa.float64(), 4))),
        ("source", pa.string()),
        ("split", pa.string()),
        *EXTRA_COLUMNS.items(),
    ]
)
REQUIRED = [f.name for f in SCHEMA if f.name not in EXTRA_COLUMNS]
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A dataset cannot pass a step of the data gate; the message says what and where."""


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(text: str) -> str:
    """A stable identifier that is safe as a file name (no separators, no leading dot)."""
    out = _SAFE.sub("_", text).strip("._")
    if not out:
        raise ValueError(f"cannot make an image id from {text!r}")
    return out


@dataclass
class Row:
    """One manifest row. ``boxes`` are normalised ``[x_min, y_min, x_max, y_max]``."""

    image_id: str
    path: str
    sha256: str
    width: int | None
    height: int | None
    label: str | None
    lesion_id: str
    source: str
    boxes: list[list[float]] = field(default_factory=list)
    split: str | None = None
    age: float | None = None
    sex: str | None = None
    localization: str | None = None
    dx_type: str | None = None
    patient_id: str | None = None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# EXIF orientations 5-8 rotate by 90 degrees, so the displayed width and height swap.
_EXIF_ORIENTATION = 0x0112


def probe_image(path: Path) -> tuple[int, int]:
    """Width and height of an image as displayed (after EXIF orientation), from its header.

    Raises:
        ValueError: the file is not an image PIL can identify.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # a broken EXIF block does not make the pixels unreadable
                orientation = 1
    except UnidentifiedImageError as e:
        raise ValueError("not a recognisable image file") from e
    except OSError as e:
        raise ValueError(f"cannot read image header: {e}") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class ManifestWriter:
    """Writes manifest rows in row groups as they arrive; the file appears only when complete.

    Rows must carry unique image_ids; a repeat raises ``ValueError`` naming it.
    """

    def __init__(self, dataset_dir: Path, row_group_size: int = 512) -> None:
        self.path = Path(dataset_dir) / MANIFEST
        self._tmp = self.path.with_name(f".{MANIFEST}.partial")
        self._rows: list[dict[str, Any]] = []
        self._size = row_group_size
        self._writer: pq.ParquetWriter | None = None
        self._ids: set[str] = set()
        self.count = 0

    def __enter__(self) -> ManifestWriter:
        return self

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._ids

    def write(self, row: Row) -> None:
        if row.image_id in self._ids:
            raise ValueError(f"image_id {row.image_id!r} appears twice")
        self._ids.add(row.image_id)
        self._rows.append(asdict(row))
        self.count += 1
        if len(self._rows) >= self._size:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        if self._writer is None:
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, SCHEMA, compression="zstd")
        self._writer.write_table(table)
        self._rows = []

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._writer is not None:
                self._writer.close()
            self._tmp.unlink(missing_ok=True)
            return
        self._flush()
        if self._writer is None:  # no rows: still a valid, empty manifest
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(SCHEMA.empty_table(), self._tmp, compression="zstd")
        else:
            self._writer.close()
        self._tmp.replace(self.path)


def write_manifest(dataset_dir: Path, rows: Iterable[Row], row_group_size: int = 512) -> Path:
    with ManifestWriter(dataset_dir, row_group_size) as w:
        for row in rows:
            w.write(row)
    return w.path


def read_manifest(dataset_dir: Path) -> pa.Table:
    """Read a dataset's manifest, checking the contract's required columns.

    Raises:
        FileNotFoundError: no manifest in ``dataset_dir``.
        ValueError: required columns are missing (named in the message).
    """
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {dataset_dir} (run `drspot ingest ... --out {dataset_dir}` first)")
    table = pq.read_table(path)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} is missing required columns: {', '.join(missing)}")
    return table


def read_step_input(path: Path, column: str, producer: str, purpose: str) -> pa.Table:
    """Read a gate step's input, produced by ``drspot {producer}``, with a clear error if unusable.

    Raises:
        DataError: the file is missing, lacks ``column`` (so it is not ``producer``'s output), or
            has no rows to ``purpose``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no {path.name} at {path}; run `drspot {producer}` first")
    table = pq.read_table(path)
    if column not in table.column_names:
        raise DataError(f"{path} has no {column} column; it must come from `drspot {producer}`")
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows to {purpose}")
    return table


def iter_rows(dataset_dir: Path) -> Iterator[dict[str, Any]]:
    """Stream a manifest's rows as dicts, one row group at a time."""
    pf = pq.ParquetFile(Path(dataset_dir) / MANIFEST)
    for i in range(pf.num_row_groups):
        yield from pf.read_row_group(i).to_pylist()


def summary(table: pa.Table) -> dict[str, Any]:
    """Counts a person wants first: rows, lesions, labels, splits, boxes, sources."""

    def counts(col: str) -> dict[str, int]:
        vc = table.column(col).value_counts().to_pylist() if table.num_rows else []
        # null (no label / no split yet) is counted under "(none)"
        named = {("(none)" if d["values"] is None else str(d["values"])): int(d["counts"]) for d in vc}
        return dict(sorted(named.items()))

    boxes = table.column("boxes").to_pylist()
    return {
        "rows": table.num_rows,
        "lesions": len(set(table.column("lesion_id").to_pylist())),
        "labels": counts("label"),
        "splits": counts("split"),
        "sources": counts("source"),
        "images_with_boxes": sum(1 for b in boxes if b),
        "boxes": sum(len(b or []) for b in boxes),
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
