"""Turn a data source into the canonical dataset: images + ``manifest.parquet``.

One adapter per kind of source (``synthetic``, ``ham10000``, ``bcn20000``, ``isic``, ``medmnist``, ``yolo``,
``feedback``, ``imagefolder``; in :mod:`components.data.sources`). Each adapter only *reads* its source and yields
:class:`Candidate` rows (or :class:`Problem` s for rows it cannot make sense of); one shared core copies each image
into the dataset, hashes it, reads its size, maps its label, checks its boxes and writes the manifest in
row groups. Nothing is lost without a trace: every problem is listed row by row in
``ingest_report.json``. Rows with an unknown label or an image that does not decode are *kept*
(the data gate quarantines them with a reason); rows whose image is missing or whose path escapes
the source folder cannot be copied and are reported.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.data.manifest import (
    EXTRA_COLUMNS,
    MANIFEST,
    SPLITS,
    ManifestWriter,
    Row,
    iter_rows,
    probe_image,
    read_manifest,
    sha256_file,
    summary,
)
from components.data.sources import (  # noqa: F401  (IngestError: this API's error)
    ADAPTERS,
    Candidate,
    IngestError,
    Problem,
    class_map,
)
from infra.config import Config

REPORT = "ingest_report.json"


@dataclass
class IngestResult:
    kind: str
    source: str  # relative to the dataset folder, so the report (and the DVC version) does not
    #              depend on where the project is checked out
    out: str
    rows: int
    problems: list[Problem]
    missing_images: list[str]
    summary: dict[str, Any]
    class_map: dict[str, str] = field(default_factory=dict)  # the source's class names -> classes.names in force

    def problem_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.check] = out.get(p.check, 0) + 1
        return dict(sorted(out.items()))

    def to_json(self) -> str:
        d = asdict(self)
        del d["out"]
        d["problem_counts"] = self.problem_counts()
        return json.dumps(d, indent=2, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# Reading helpers shared by adapters


# ---------------------------------------------------------------------------------------------
# Adapters: each yields Candidates (and Problems for rows it cannot turn into one)


# ---------------------------------------------------------------------------------------------
# The shared core


def _check_boxes(boxes: list) -> tuple[list[list[float]], str | None]:
    good, bad = [], []
    for b in boxes or []:
        ok = isinstance(b, list | tuple) and len(b) == 4 and all(isinstance(v, int | float) for v in b)
        if ok and 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1:
            good.append([float(v) for v in b])
        else:
            bad.append(b)
    return good, (f"dropped boxes outside [0,1] or with min >= max: {bad}" if bad else None)


def _within(path: Path, roots: list[Path]) -> bool:
    real = path.resolve()
    return any(real.is_relative_to(r.resolve()) for r in roots)


def _refused(c: Candidate, writer: ManifestWriter, roots: list[Path]) -> Problem | None:
    """Why a candidate cannot be copied into the dataset (its id is taken, its file lies outside the source folders
    or is missing), or None."""
    if c.image_id in writer:
        return Problem(c.image_id, "duplicate_image_id", "an image with this id is already in the dataset", False)
    if c.file is not None:
        if not _within(c.file, roots):
            return Problem(c.image_id, "path_escapes_source", f"{c.file} is outside {roots[0]}", False)
        if not c.file.is_file():
            return Problem(c.image_id, "image_missing", f"file not found: {c.file}", False)
    return None


def _copied(c: Candidate, images_dir: Path) -> str:
    """Copy (or write) a candidate's image into the dataset, atomically; returns its file name."""
    name = f"{c.image_id}{c.ext}"
    tmp = images_dir / f".{name}.partial"
    if c.file is not None:
        shutil.copyfile(c.file, tmp)
    else:
        tmp.write_bytes(c.data or b"")
    tmp.replace(images_dir / name)
    return name


def _row(c: Candidate, dest: Path, kind: str, cfg: Config, unmapped: str, problems: list[Problem]) -> Row:
    """The manifest row of a copied image; an image that does not decode, a label outside the classes and an invalid
    box are kept and reported (the data gate quarantines them with the reason)."""
    try:
        width, height = probe_image(dest)
    except ValueError as e:
        width = height = None
        problems.append(Problem(c.image_id, "image_undecodable", str(e), True))
    classes = set(cfg.classes.names)
    label = cfg.classes.normalise(c.label)
    if label is not None and label not in classes:
        problems.append(
            Problem(c.image_id, "label_unknown", f"{c.label!r} is not one of {sorted(classes)}{unmapped}", True)
        )
    boxes, box_problem = _check_boxes(c.boxes)
    if box_problem:
        problems.append(Problem(c.image_id, "box_invalid", box_problem, True))
    return Row(
        image_id=c.image_id,
        path=f"images/{dest.name}",
        sha256=sha256_file(dest),
        width=width,
        height=height,
        label=label,
        lesion_id=c.lesion_id or c.image_id,
        boxes=boxes,
        source=kind,
        split=c.split if c.split in SPLITS else None,
        **{k: c.extra.get(k) for k in EXTRA_COLUMNS},
    )


def ingest(
    kind: str,
    source: str | Path,
    out: str | Path,
    cfg: Config,
    *,
    append: bool = False,
    progress: Callable[[int], None] | None = None,
    **opts: Any,
) -> IngestResult:
    """Ingest ``source`` (of ``kind``) into the dataset folder ``out``.

    Args:
        kind: one of :data:`ADAPTERS`.
        source: the source file or folder.
        out: the dataset folder; its ``manifest.parquet`` is replaced (or extended with ``append``).
        cfg: the resolved configuration (classes, row group size).
        append: keep the rows already in ``out`` and add the new ones (an image_id already
            present is reported, not overwritten).
        opts: adapter options (see each ``adapt_*``).

    Returns:
        An :class:`IngestResult`, also written to ``out/ingest_report.json``.

    Raises:
        IngestError: the source as a whole cannot be read; ``out`` is left as it was.
    """
    if kind not in ADAPTERS:
        raise IngestError(f"unknown source kind {kind!r}; choose one of: {', '.join(ADAPTERS)}")
    source, out = Path(source), Path(out)
    if not source.exists() and not (kind == "synthetic" and opts.get("generate")):
        raise IngestError(f"source not found: {source}")
    roots = [source if source.is_dir() else source.parent] + [Path(p) for p in opts.get("images") or []]
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    problems: list[Problem] = []
    missing: list[str] = []
    written: set[str] = set()
    mapping = class_map(kind, cfg, opts.get("class_map"))
    unmapped = f" and the class map ({kind}) does not map it" if mapping else ""

    with ManifestWriter(out, cfg.ingest.row_group_size) as writer:
        if append and (out / MANIFEST).is_file():
            for old in iter_rows(out):
                writer.write(Row(**old))
                written.add(Path(old["path"]).name)
        for item in ADAPTERS[kind](source, cfg, **opts):
            problem = item if isinstance(item, Problem) else _refused(item, writer, roots)
            if problem is not None:
                problems.append(problem)
                if problem.check == "image_missing":
                    missing.append(problem.row)
                continue
            name = _copied(item, images_dir)
            written.add(name)
            writer.write(_row(item, images_dir / name, kind, cfg, unmapped, problems))
            if progress:
                progress(writer.count)
        rows = writer.count
    # images of an earlier ingest that this one did not write are stale
    for p in images_dir.iterdir():
        if p.name not in written:
            p.unlink()

    result = IngestResult(
        kind=kind,
        source=os.path.relpath(source, out),
        out=str(out),
        rows=rows,
        problems=problems,
        missing_images=missing,
        summary=summary(read_manifest(out)),
        class_map=mapping,
    )
    (out / REPORT).write_text(result.to_json())
    return result
