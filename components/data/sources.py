"""The sources DrSpot reads, one adapter per kind (``synthetic``, ``ham10000``, ``bcn20000``, ``isic``, ``medmnist``,
``yolo``, ``imagefolder``, ``feedback``): each only *reads* its source and yields :class:`Candidate` rows, or
:class:`Problem` s for rows it cannot make sense of. :func:`components.data.ingest.ingest` does the rest (copy, hash,
label, boxes, manifest) the same way for all of them."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.data.manifest import SPLITS, safe_id
from infra.config import Config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


ISIC_ID = re.compile(r"ISIC_\d{7}")


class IngestError(ValueError):
    """The source as a whole cannot be read (missing file, missing columns, unreadable CSV)."""


@dataclass
class Candidate:
    """A row as an adapter sees it, before the image is copied and checked."""

    image_id: str
    label: str | None
    lesion_id: str | None = None
    file: Path | None = None  # a file inside the source folder, or
    data: bytes | None = None  # the image's bytes (sources that hold arrays, e.g. MedMNIST)
    ext: str = ".png"
    boxes: list[list[float]] = field(default_factory=list)
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problem:
    """One thing wrong with one row: which row, what check, and what exactly."""

    row: str
    check: str
    detail: str
    kept: bool


def _read_csv(path: Path, required: list[str]) -> Iterator[dict[str, str]]:
    """Stream a CSV's rows as dicts, after checking it has the ``required`` columns."""
    if not path.is_file():
        raise IngestError(f"CSV not found: {path}")
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
        reader = csv.DictReader(fh)
        header = reader.fieldnames
    except (UnicodeDecodeError, csv.Error) as e:
        raise IngestError(f"cannot read {path} as a CSV: {e}") from e
    if not header:
        fh.close()
        raise IngestError(f"{path} is empty (no header row)")
    missing = [c for c in required if c not in header]
    if missing:
        fh.close()
        raise IngestError(f"{path} is missing column(s) {', '.join(missing)}; it has: {', '.join(header)}")
    try:
        with fh:
            for i, row in enumerate(reader, start=2):
                if None in row:  # more fields than the header names
                    row.pop(None)
                row["__line__"] = str(i)
                yield row
    except (UnicodeDecodeError, csv.Error) as e:
        raise IngestError(f"cannot read {path} as a CSV (near line {reader.line_num}): {e}") from e


def _index_images(folders: list[Path]) -> dict[str, Path]:
    """File stem -> path for every image file directly in ``folders`` (first folder wins)."""
    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            raise IngestError(f"image folder not found: {folder}")
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                index.setdefault(p.stem, p)
    return index


def _float_or_none(value: str | None) -> float | None:
    try:
        f = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return None if f is None or f != f else f


def _str_or_none(value: str | None) -> str | None:
    return value.strip() if value and value.strip() else None


def _ham_extra(row: dict[str, str]) -> dict[str, Any]:
    return {
        "age": _float_or_none(row.get("age")),
        "sex": _str_or_none(row.get("sex")),
        "localization": _str_or_none(row.get("localization")),
        "dx_type": _str_or_none(row.get("dx_type")),
        "patient_id": _str_or_none(row.get("patient_id")),  # HAM10000 has none; ISIC's later metadata has
    }


def adapt_synthetic(source: Path, cfg: Config, **opts: Any) -> Iterator[Candidate | Problem]:
    """A generated synthetic set (``labels.csv`` + ``images/``); generated first if ``generate``."""
    if opts.get("generate"):
        from components.data.synthetic import Spec, generate

        spec = Spec.from_config(cfg, shifted=bool(opts.get("shifted")), **(opts.get("overrides") or {}))
        generate(source, spec, progress=opts.get("gen_progress"))
    for row in _read_csv(source / "labels.csv", ["image_id", "file", "label", "lesion_id", "boxes"]):
        try:
            boxes = json.loads(row["boxes"] or "[]")
        except json.JSONDecodeError:
            yield Problem(row["image_id"], "boxes_unreadable", f"line {row['__line__']}: {row['boxes']!r}", False)
            continue
        yield Candidate(
            image_id=row["image_id"],
            label=row["label"],
            lesion_id=row["lesion_id"],
            file=source / row["file"],
            ext=Path(row["file"]).suffix.lower(),
            boxes=boxes,
        )


BOX_COLUMNS = ["image_id", "x_min", "y_min", "x_max", "y_max"]


def read_boxes(path: Path) -> tuple[dict[str, list[list[float]]], list[Problem]]:
    """A lesion-box file (``image_id,x_min,y_min,x_max,y_max``, normalised to [0, 1]; several rows for an image
    with several lesions): image id -> boxes, and every row that could not be used, with why.

    A bad row drops that box only: the image is still ingested (``kept``), without it.

    Raises:
        IngestError: the file is missing, unreadable or lacks a column (naming those it has).
    """
    boxes: dict[str, list[list[float]]] = {}
    problems: list[Problem] = []
    seen: set[tuple] = set()
    for row in _read_csv(path, BOX_COLUMNS):
        where = f"{path.name} line {row['__line__']}"
        iid = (row["image_id"] or "").strip()
        values = [_float_or_none(row[c]) for c in BOX_COLUMNS[1:]]
        if not iid or None in values:
            shown = {c: row[c] for c in BOX_COLUMNS}
            problems.append(Problem(iid or where, "box_unreadable", f"{where}: {shown}", True))
            continue
        x0, y0, x1, y1 = values
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            problems.append(
                Problem(iid, "box_outside_image", f"{where}: {values} is not inside [0,1] with min < max", True)
            )
            continue
        if (iid, *values) in seen:
            problems.append(Problem(iid, "box_duplicate", f"{where}: the same box is listed again", True))
            continue
        seen.add((iid, *values))
        boxes.setdefault(iid, []).append([float(v) for v in values])
    return boxes, problems


def adapt_ham10000(source: Path, cfg: Config, **opts: Any) -> Iterator[Candidate | Problem]:
    """``HAM10000_metadata.csv`` + one or more image folders (default: ``images/`` beside the CSV).

    ``boxes``: a lesion-box file (:func:`read_boxes`) whose boxes go into the manifest; its rows that cannot be
    used, and its image ids that the metadata does not list, are reported row by row.
    """
    folders = [Path(p) for p in (opts.get("images") or [])] or [source.parent / "images"]
    index = _index_images(folders)
    boxes: dict[str, list[list[float]]] = {}
    if opts.get("boxes"):
        boxes, problems = read_boxes(Path(opts["boxes"]))
        yield from problems
    listed: set[str] = set()
    for row in _read_csv(source, ["lesion_id", "image_id", "dx"]):
        image_id = row["image_id"].strip()
        listed.add(image_id)
        path = index.get(image_id)
        if path is None:
            yield Problem(
                image_id, "image_missing", f"no image file named {image_id}.* in {', '.join(map(str, folders))}", False
            )
            continue
        yield Candidate(
            image_id=image_id,
            label=row["dx"],
            lesion_id=_str_or_none(row["lesion_id"]),
            file=path,
            ext=path.suffix.lower(),
            boxes=boxes.get(image_id, []),
            extra=_ham_extra(row),
        )
    for image_id in sorted(set(boxes) - listed):
        yield Problem(
            image_id,
            "box_unknown_image",
            f"{Path(opts['boxes']).name} has a box for an image the metadata does not list",
            False,
        )


def adapt_isic(source: Path, cfg: Config, **opts: Any) -> Iterator[Candidate | Problem]:
    """An ISIC challenge ground-truth CSV: an ``image`` column plus one-hot class columns.

    Options: ``images`` (folders, default ``images/`` beside the CSV), ``lesion_csv`` (a CSV with
    ``image`` and ``lesion_id`` columns, as ISIC 2018 ships).
    """
    folders = [Path(p) for p in (opts.get("images") or [])] or [source.parent / "images"]
    index = _index_images(folders)
    lesions: dict[str, str] = {}
    if opts.get("lesion_csv"):
        for row in _read_csv(Path(opts["lesion_csv"]), ["image", "lesion_id"]):
            lesions[row["image"].strip()] = row["lesion_id"].strip()
    rows = _read_csv(source, ["image"])
    for row in rows:
        image_id = row["image"].strip()
        class_cols = [c for c in row if c not in ("image", "__line__", "score_weight", "validation_weight")]
        marked = [c for c in class_cols if _float_or_none(row[c]) == 1.0]
        if len(marked) != 1:
            what = "no class column is 1" if not marked else f"several class columns are 1: {', '.join(marked)}"
            yield Problem(image_id, "label_unreadable", f"line {row['__line__']}: {what}", False)
            continue
        path = index.get(image_id)
        if path is None:
            yield Problem(
                image_id, "image_missing", f"no image file named {image_id}.* in {', '.join(map(str, folders))}", False
            )
            continue
        yield Candidate(
            image_id=image_id, label=marked[0], lesion_id=lesions.get(image_id), file=path, ext=path.suffix.lower()
        )


def adapt_medmnist(source: Path, cfg: Config, **opts: Any) -> Iterator[Candidate | Problem]:
    """A MedMNIST ``.npz`` (``{train,val,test}_images`` / ``_labels``): PNGs, official split kept.

    Class index i is ``classes.names[i]`` (DermaMNIST's order is the HAM10000 default). MedMNIST
    carries no lesion ids, so each image is its own lesion (the official split is known to leak).
    """
    import numpy as np
    from PIL import Image

    if not source.is_file():
        raise IngestError(f"npz not found: {source}")
    try:
        npz = np.load(source, allow_pickle=False)
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError
        raise IngestError(f"cannot read {source} as a .npz: {e}") from e
    prefix = safe_id(opts.get("id_prefix") or source.stem.split("_")[0])
    names = cfg.classes.names
    with npz:
        splits = [s for s in SPLITS if f"{s}_images" in npz.files]
        if not splits:
            raise IngestError(f"{source} has none of the keys train_images/val_images/test_images (has {npz.files})")
        for split in splits:
            if f"{split}_labels" not in npz.files:
                raise IngestError(f"{source} has {split}_images but no {split}_labels")
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].reshape(-1)
            if len(images) != len(labels):
                raise IngestError(f"{source}: {len(images)} {split}_images but {len(labels)} {split}_labels")
            for i, (arr, lab) in enumerate(zip(images, labels, strict=True)):
                image_id = f"{prefix}_{split}_{i:05d}"
                k = int(lab)
                label = names[k] if 0 <= k < len(names) else f"class_{k}"
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "PNG")
                yield Candidate(image_id=image_id, label=label, lesion_id=image_id, data=buf.getvalue(), split=split)


def _yolo_boxes(text: str, names: list[str]) -> tuple[list[list[float]], list[str], list[str]]:
    """Parse a YOLO label file (detection ``c cx cy w h`` or segmentation ``c x1 y1 ...``)."""
    boxes, classes, errors = [], [], []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, vals = int(parts[0]), [float(v) for v in parts[1:]]
        except ValueError:
            errors.append(f"line {n}: not numbers: {line[:60]!r}")
            continue
        if len(vals) == 4:
            cx, cy, w, h = vals
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif len(vals) >= 6 and len(vals) % 2 == 0:
            xs, ys = vals[0::2], vals[1::2]
            box = [min(xs), min(ys), max(xs), max(ys)]
        else:
            errors.append(f"line {n}: {len(vals)} coordinates is neither a box (4) nor a polygon (even, >= 6)")
            continue
        if not 0 <= cls < len(names):
            errors.append(f"line {n}: class id {cls} not in data.yaml names (0..{len(names) - 1})")
            continue
        boxes.append([round(min(1.0, max(0.0, v)), 6) for v in box])
        classes.append(names[cls])
    return boxes, classes, errors


def adapt_yolo(source: Path, cfg: Config, **opts: Any) -> Iterator[Candidate | Problem]:
    """A YOLO detection or segmentation dataset: ``data.yaml``, ``images/``, ``labels/``.

    Polygons become their axis-aligned box. Options: ``class_map`` (``{"AKIEC": "akiec", ...}``);
    ``ham_metadata`` (a HAM10000 metadata CSV joined by the ISIC id in the file name, bringing
    lesion_id and metadata); ``label_source`` (``yolo`` or ``metadata``: which label wins when
    they disagree; default ``metadata`` when joined, as the shared set has label noise).
    """
    import yaml

    data_yaml = source / "data.yaml" if source.is_dir() else source
    if not data_yaml.is_file():
        raise IngestError(f"no data.yaml at {data_yaml}")
    try:
        meta = yaml.safe_load(data_yaml.read_text())
    except yaml.YAMLError as e:
        raise IngestError(f"{data_yaml} is not valid YAML: {e}") from e
    if not isinstance(meta, dict) or "names" not in meta:
        raise IngestError(f"{data_yaml} has no 'names'")
    names = meta["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    mapping = class_map("yolo", cfg, opts.get("class_map"))
    names = [mapping.get(str(n).lower(), n) for n in names]
    root = (data_yaml.parent / meta.get("path", ".")).resolve()

    ham: dict[str, dict[str, str]] = {}
    if opts.get("ham_metadata"):
        for row in _read_csv(Path(opts["ham_metadata"]), ["lesion_id", "image_id", "dx"]):
            ham[row["image_id"].strip()] = row
    label_source = opts.get("label_source") or ("metadata" if ham else "yolo")
    if label_source not in ("yolo", "metadata"):
        raise IngestError(f"label_source must be 'yolo' or 'metadata', not {label_source!r}")

    seen: set[str] = set()
    for key, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if key not in meta:
            continue
        img_dir = (root / meta[key]).resolve()
        if not img_dir.is_dir():
            raise IngestError(f"{data_yaml}: {key} folder not found: {img_dir}")
        parts = list(img_dir.parts)
        idx = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
        lbl_dir = Path(*parts[:idx], "labels", *parts[idx + 1 :]) if idx is not None else img_dir
        for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            m = ISIC_ID.search(img.name)
            image_id = m.group(0) if m and m.group(0) not in seen else safe_id(img.stem)
            seen.add(image_id)
            lbl_file = lbl_dir / f"{img.stem}.txt"
            boxes, classes, errors = _yolo_boxes(lbl_file.read_text() if lbl_file.is_file() else "", names)
            for err in errors:
                yield Problem(image_id, "yolo_label_line", f"{lbl_file.name} {err}", True)
            if len(set(classes)) > 1:
                yield Problem(image_id, "mixed_classes", f"objects of classes {sorted(set(classes))}; first kept", True)
            label = classes[0] if classes else None
            lesion_id, extra = None, {}
            h = ham.get(m.group(0)) if m else None
            if h is not None:
                lesion_id, extra = _str_or_none(h["lesion_id"]), _ham_extra(h)
                dx = cfg.classes.normalise(h["dx"])
                if label is not None and cfg.classes.normalise(label) != dx:
                    chosen = dx if label_source == "metadata" else label
                    yield Problem(
                        image_id, "label_disagreement", f"yolo says {label}, metadata says {dx}; kept {chosen}", True
                    )
                if label_source == "metadata":
                    label = dx
            elif ham:
                yield Problem(image_id, "metadata_missing", "no row in the HAM10000 metadata for this image", True)
            yield Candidate(
                image_id=image_id,
                label=label,
                lesion_id=lesion_id,
                file=img,
                ext=img.suffix.lower(),
                boxes=boxes,
                split=split,
                extra=extra,
            )


def adapt_imagefolder(source: Path, cfg: Config, **opts: Any) -> Iterator[Candidate | Problem]:
    """One sub-folder per class (``SOURCE/<class>/<image>``); the folder name is the label."""
    if not source.is_dir():
        raise IngestError(f"folder not found: {source}")
    classes = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise IngestError(f"{source} has no class sub-folders")
    for cdir in classes:
        for p in sorted(cdir.iterdir()):
            if p.name.startswith("."):
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                yield Problem(f"{cdir.name}/{p.name}", "not_an_image_file", f"extension {p.suffix!r} skipped", False)
                continue
            image_id = safe_id(f"{cdir.name}_{p.stem}")
            yield Candidate(image_id=image_id, label=cdir.name, file=p, ext=p.suffix.lower())


def adapt_feedback(source: Path, cfg: Config, **opts: Any) -> Iterator[Candidate | Problem]:
    """Clinician-confirmed cases exported from the prediction log (``feedback.csv`` + ``images/``,
    written by :func:`components.monitoring.feedback.export`). A case whose reviewer drew or confirmed the lesion's
    box (the review page) carries it (column ``box``: ``x_min y_min x_max y_max``, normalised) and trains
    the detector too; one without a box names the lesion without outlining it, so it trains the classifier
    (on the whole image) and is left out of the detector's export."""
    for row in _read_csv(source / "feedback.csv", ["image_id", "label", "file"]):
        boxes: list[list[float]] = []
        text = (row.get("box") or "").strip()
        if text:
            try:
                boxes = [[float(v) for v in text.split()]]
            except ValueError:  # the label is still good: the row is kept, without the box
                yield Problem(row["image_id"], "box_unreadable", f"feedback.csv: box {text!r} is not 4 numbers", True)
        yield Candidate(
            image_id=row["image_id"],
            label=row["label"],
            file=source / row["file"],
            ext=Path(row["file"]).suffix.lower(),
            boxes=boxes,
        )


def class_map(kind: str, cfg: Config, given: dict[str, str] | None = None) -> dict[str, str]:
    """The class map in force for a source ``kind``: ``given`` (``--class-map``) or ``ingest.class_map.<kind>``;
    keys lower-cased (source labels are matched case-insensitively)."""
    chosen = given if given else cfg.ingest.class_map.get(kind, {})
    return {str(k).strip().lower(): str(v).strip() for k, v in chosen.items()}


def adapt_bcn20000(source: Path, cfg: Config, **opts: Any) -> Iterator[Candidate | Problem]:
    """BCN20000 as ISIC 2019 publishes it: a folder with ``metadata.csv`` (``image_id, lesion_id, dx_isic2019,
    age_approx, sex, anatom_site``) and ``images/``.

    The label is ``dx_isic2019`` (eight classes) mapped by the class map (``class_map`` option, else
    ``ingest.class_map.bcn20000``: ``ak, scc -> akiec``); a class the map leaves out keeps its own name, so the data
    gate quarantines it naming the class. Options: ``lesions`` (only these lesion ids), ``split`` (mark every row
    with this split: a new clinic's test split, see :mod:`components.data.split`).
    """
    folder = source if source.is_dir() else source.parent
    missing = [n for n in ("metadata.csv", "images") if not (folder / n).exists()]
    if missing:
        raise IngestError(
            f"{folder} is not a BCN20000 folder: it lacks {' and '.join(missing)} (expected metadata.csv and images/)"
        )
    index = _index_images([folder / "images"])
    mapping = class_map("bcn20000", cfg, opts.get("class_map"))
    only = set(opts["lesions"]) if opts.get("lesions") is not None else None
    for row in _read_csv(folder / "metadata.csv", ["image_id", "lesion_id", "dx_isic2019"]):
        image_id, lesion_id = row["image_id"].strip(), _str_or_none(row["lesion_id"])
        if only is not None and lesion_id not in only:
            continue
        path = index.get(image_id)
        if path is None:
            yield Problem(
                image_id, "image_missing", f"line {row['__line__']}: no image file {image_id}.* in images/", False
            )
            continue
        raw = (row["dx_isic2019"] or "").strip()
        yield Candidate(
            image_id=image_id,
            label=mapping.get(raw.lower(), raw) or None,
            lesion_id=lesion_id,
            file=path,
            ext=path.suffix.lower(),
            split=opts.get("split"),
            extra={
                "age": _float_or_none(row.get("age_approx")),
                "sex": _str_or_none(row.get("sex")),
                "localization": _str_or_none(row.get("anatom_site")),
                "dx_type": None,
                "patient_id": None,
            },
        )


ADAPTERS: dict[str, Callable[..., Iterator[Candidate | Problem]]] = {
    "synthetic": adapt_synthetic,
    "ham10000": adapt_ham10000,
    "bcn20000": adapt_bcn20000,
    "isic": adapt_isic,
    "medmnist": adapt_medmnist,
    "yolo": adapt_yolo,
    "imagefolder": adapt_imagefolder,
    "feedback": adapt_feedback,
}
