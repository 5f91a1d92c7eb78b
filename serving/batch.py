"""``drspot predict``: score a folder or a list of photos offline with the registry's champions.

The service's own steps, in process: each file goes through :func:`serving.inputs.read_image` (the same format,
size, pixel-count and quality checks and warnings), :meth:`serving.pipeline.Pipeline.analyse_many` (detector ->
lesion crops -> classifier, the whole photo when no lesion is found, in batches) and the service's abstention and
guidance. One output row per lesion (a photo without a located lesion has one whole-photo row, marked
``fallback``); a file that cannot be scored has one row whose ``error`` says why, and every other row is kept.

Resumable: each batch is written to ``<out>.parts/`` as it finishes (atomically), with the run's models and
options in ``run.json``; a run that was interrupted continues from the last finished batch when started again
with the same output, and refuses (naming the difference) if the champions or the options changed since. The
finished file is CSV (UTF-8 with a byte-order mark, so Excel shows Korean and Vietnamese text) or Parquet, by
the output's suffix. Nothing here writes to the prediction log: offline scoring is not traffic to monitor.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from infra.config import Config, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
PATH_COLUMNS = ("path", "image", "file", "filename")
PARTS_SUFFIX = ".parts"
RUN_FILE = "run.json"


class BatchError(ValueError):
    """The batch cannot start: its source, its output or the models (what and where)."""


class BatchOptionError(BatchError, UsageError):
    """An option of the batch that cannot be used (the output's format, the language, the batch size)."""


@dataclass(frozen=True)
class Item:
    key: str  # the photo as the source names it (a path relative to the folder, or the CSV's cell)
    path: Path | None  # None: the source row names no file


def list_source(source: str | Path) -> list[Item]:
    """The photos a source names: a folder (its image files, recursively, sorted), a CSV with a ``path`` column
    (relative paths are relative to the CSV's folder) or one image file.

    Raises:
        BatchError: the source does not exist, a folder holds no image, a CSV has no path column or no rows.
    """
    source = Path(source)
    if not source.exists():
        raise BatchError(f"{source} does not exist")
    if source.is_dir():
        items = [
            Item(p.relative_to(source).as_posix(), p)
            for p in sorted(source.rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not items:
            raise BatchError(f"{source} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
        return items
    if source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8-sig") as f:  # a BOM (Excel's CSV) is not part of a name
            reader = csv.DictReader(f)
            column = next((c for c in reader.fieldnames or [] if c.strip().lower() in PATH_COLUMNS), None)
            if column is None:
                raise BatchError(
                    f"{source}: no column naming the photos ({' / '.join(PATH_COLUMNS)}); "
                    f"its columns are {', '.join(reader.fieldnames or []) or 'none'}"
                )
            items, seen = [], set()
            for n, row in enumerate(reader, start=2):
                cell = (row.get(column) or "").strip()
                if not cell:
                    items.append(Item(f"(row {n}: empty {column})", None))
                    continue
                if cell in seen:  # one photo listed twice is scored once
                    continue
                seen.add(cell)
                p = Path(cell)
                items.append(Item(cell, p if p.is_absolute() else source.parent / p))
        if not items:
            raise BatchError(f"{source}: no rows")
        return items
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [Item(source.name, source)]
    raise BatchError(f"{source}: give a folder of photos, a CSV with a path column, or one image file")


def champions(cfg: Config) -> tuple[dict[str, Path | None], dict[str, str]]:
    """The champions' folders (downloaded once into the state home's model cache) and their registry versions.

    Raises:
        BatchError: the registry has no champion classifier (a missing detector means whole-photo scoring).
    """
    from components.model import registry

    folders: dict[str, Path | None] = {}
    versions: dict[str, str] = {}
    cache = cfg.runtime.model_cache
    for kind in ("classifier", "detector"):
        name = registry.model_name(kind)
        version = registry.champion(name)
        if version is None:
            if kind == "classifier":
                raise BatchError(
                    f"the registry ({registry.tracking_uri()}) has no champion {name}: train one first (drspot train)"
                )
            folders[kind], versions[kind] = None, "none"
            continue
        folder = cache / f"{name}-{version}"
        if not folder.is_dir():  # downloaded beside it, then moved in whole: never a half-written folder
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                os.replace(registry.download(name, version, dst=tmp), folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        from serving.onnx_export import FILES

        if cfg.serving.runtime == "onnx" and not (folder / FILES[kind]).is_file():
            from serving.deploy import DeployError, export_onnx

            try:
                export_onnx(kind, folder, cfg)  # checked against PyTorch, as at deploy
            except DeployError as e:
                raise BatchError(str(e)) from e
        folders[kind], versions[kind] = folder, f"{name}/{version}"
    return folders, versions


def table_columns(classes: list[str]) -> list[str]:
    return [
        "source",
        "error",
        "image_sha256",
        "width",
        "height",
        "format",
        "quality_ok",
        "quality_warnings",
        "lesion",
        "box_x_min",
        "box_y_min",
        "box_x_max",
        "box_y_max",
        "detector_confidence",
        "label",
        "confidence",
        *[f"p_{c}" for c in classes],
        "malignant_probability",
        "risk",
        "ood_score",
        "abstain",
        "abstain_reason",
        "fallback",
        "fallback_reason",
        "guidance",
        "classifier_version",
        "detector_version",
    ]


def lesion_rows(image: dict[str, Any], result: dict[str, Any], pipeline, language: str) -> list[dict[str, Any]]:
    """One table row per lesion of an analysed photo: ``image``'s columns (source, size, quality, models ...) and
    the lesion's box, class, probabilities, risk, abstention and guidance. The service's batch CSV uses it too."""
    from serving.pipeline import guidance

    out = []
    for n, lesion in enumerate(result["lesions"]):
        held = pipeline.abstention(result["lesions"], lesion)
        box = lesion["box"] or [None] * 4
        g = guidance(lesion["label"], lesion["risk"], language, result["fallback"])
        out.append(
            {
                **image,
                "lesion": n,
                **dict(zip(("box_x_min", "box_y_min", "box_x_max", "box_y_max"), box, strict=True)),
                "detector_confidence": lesion["detector_confidence"],
                "label": lesion["label"],
                "confidence": lesion["probabilities"][lesion["label"]],
                **{f"p_{c}": v for c, v in lesion["probabilities"].items()},
                "malignant_probability": lesion["malignant_probability"],
                "risk": lesion["risk"],
                "ood_score": lesion["ood_score"],
                "abstain": held["abstain"],
                "abstain_reason": held["abstain_reason"],
                "guidance": g["text"],
            }
        )
    return out


class Scorer:
    """The service's steps over batches of files (see the module's docstring)."""

    def __init__(
        self, cfg: Config, folders: dict[str, Path | None], versions: dict[str, str], language: str, preprocess: str
    ) -> None:
        from serving.pipeline import Pipeline

        self.pipeline = Pipeline(folders["classifier"], folders["detector"], cfg, versions)
        self.versions, self.language, self.preprocess = versions, language, preprocess
        self.columns = table_columns(list(self.pipeline.classes))

    def _error(self, item: Item, why: str) -> dict[str, Any]:
        return {**dict.fromkeys(self.columns), "source": item.key, "error": why, **self._models()}

    def _models(self) -> dict[str, str]:
        return {"classifier_version": self.versions["classifier"], "detector_version": self.versions["detector"]}

    def score(self, items: list[Item]) -> list[dict[str, Any]]:
        """One row per lesion of each photo (or one error row), in the items' order."""
        from serving.inputs import InputError, read_image
        from serving.pipeline import correct

        rows: dict[int, list[dict[str, Any]]] = {}
        ok: list[tuple[int, Any]] = []
        for k, item in enumerate(items):
            if item.path is None:
                rows[k] = [self._error(item, "no file named in this row")]
                continue
            try:
                data = item.path.read_bytes()
            except FileNotFoundError:
                rows[k] = [self._error(item, f"missing file: {item.path} does not exist")]
                continue
            except OSError as e:
                rows[k] = [self._error(item, f"unreadable file: {item.path}: {e.strerror or e}")]
                continue
            try:
                ok.append((k, read_image(data, self.pipeline.serving)))
            except InputError as e:
                rows[k] = [self._error(item, f"{e.error}: {e.detail}")]
        if ok:
            results = self.pipeline.analyse_many([correct(up.rgb, self.preprocess) for _, up in ok])
            for (k, up), result in zip(ok, results, strict=True):
                w, h = up.size
                image = {
                    "source": items[k].key,
                    "error": None,
                    "image_sha256": up.sha256,
                    "width": w,
                    "height": h,
                    "format": up.format,
                    "quality_ok": not up.warnings,
                    "quality_warnings": "; ".join(up.warnings) or None,
                    "fallback": result["fallback"],
                    "fallback_reason": result["fallback_reason"],
                    **self._models(),
                }
                out = lesion_rows(image, result, self.pipeline, self.language)
                rows[k] = out
        return [r for k in range(len(items)) for r in rows[k]]


def _schema(columns: list[str]) -> pa.Schema:
    types = {
        "width": pa.int64(),
        "height": pa.int64(),
        "lesion": pa.int64(),
        "quality_ok": pa.bool_(),
        "fallback": pa.bool_(),
    }
    floats = {"box_x_min", "box_y_min", "box_x_max", "box_y_max", "detector_confidence", "confidence"}
    floats |= {"malignant_probability", "ood_score"} | {c for c in columns if c.startswith("p_")}
    return pa.schema([(c, types.get(c, pa.float64() if c in floats else pa.string())) for c in columns])


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    """CSV that Excel opens with the right characters: UTF-8 with a byte-order mark, CRLF rows."""

    from serving.patient_report import csv_bytes

    _write_atomic(path, lambda tmp: tmp.write_bytes(csv_bytes(rows, columns)))


def _checked_options(out: Path, batch: int, language: str | None, preprocess: str, cfg: Config) -> str:
    """Refuse a bad output, preprocess or batch before anything is read; returns the guidance's language."""
    from serving.pipeline import PREPROCESS, KnowledgeError, resolve_language

    if out.suffix.lower() not in (".csv", ".parquet"):
        raise BatchOptionError(f"--out {out}: the output must end in .csv or .parquet")
    if preprocess not in PREPROCESS:
        raise BatchOptionError(f"preprocess={preprocess!r}; use one of {', '.join(PREPROCESS)}")
    if batch < 1:
        raise BatchOptionError(f"batch={batch}: at least 1")
    try:
        return resolve_language(language, cfg.serving.language)
    except KnowledgeError as e:
        raise BatchOptionError(str(e)) from e


def _open_parts(parts: Path, run: dict[str, Any], restart: bool) -> None:
    """The folder of an unfinished run's batches: resumed when it was the same run, refused when it was another."""
    if parts.is_dir() and restart:
        shutil.rmtree(parts)
    if parts.is_dir():
        before = json.loads((parts / RUN_FILE).read_text()) if (parts / RUN_FILE).is_file() else {}
        changed = [k for k in run if before.get(k) != run[k]]
        if changed:
            raise BatchError(
                f"{parts} holds an unfinished run with other {', '.join(changed)} "
                f"({', '.join(f'{k}: {before.get(k)} -> {run[k]}' for k in changed)}); "
                "pass --restart to score everything again with the current ones, or another --out"
            )
    parts.mkdir(parents=True, exist_ok=True)
    _write_atomic(parts / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(run, indent=2)))


def predict(
    source: str | Path,
    out: str | Path,
    cfg: Config,
    batch: int = 16,
    language: str | None = None,
    preprocess: str = "none",
    restart: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score ``source`` into ``out`` (``.csv`` or ``.parquet``), resuming an interrupted run; returns a summary.

    Raises:
        BatchError: a bad source or output, no champion, or an unfinished run with other models or options.
    """
    out = Path(out)
    lang = _checked_options(out, batch, language, preprocess, cfg)
    say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
    items = list_source(source)
    folders, versions = champions(cfg)
    parts = out.with_name(out.name + PARTS_SUFFIX)
    run = {
        "source": str(Path(source).resolve()),
        "models": versions,
        "preprocess": preprocess,
        "language": lang,
        "photos": len(items),
    }
    _open_parts(parts, run, restart)

    scorer = Scorer(cfg, folders, versions, lang, preprocess)
    schema = _schema(scorer.columns)
    done: set[str] = set()
    for part in sorted(parts.glob("part-*.parquet")):
        done.update(pq.read_table(part, columns=["source"]).column("source").to_pylist())
    todo = [it for it in items if it.key not in done]
    resumed = len(items) - len(todo)
    if resumed:
        say(f"predict: resuming {parts}: {resumed} of {len(items)} photos already scored")
    start, scored = time.monotonic(), 0
    next_part = len(list(parts.glob("part-*.parquet")))
    for i in range(0, len(todo), batch):
        chunk = todo[i : i + batch]
        rows = scorer.score(chunk)
        table = pa.Table.from_pylist(rows, schema=schema)
        _write_atomic(parts / f"part-{next_part:06d}.parquet", lambda tmp, t=table: pq.write_table(t, tmp))
        next_part += 1
        scored += len(chunk)
        rate = scored / max(time.monotonic() - start, 1e-9)
        left = (len(todo) - scored) / rate if rate else 0
        say(
            f"predict: {resumed + scored}/{len(items)} photos ({(resumed + scored) / len(items):.0%}), "
            f"{rate:.1f} photos/s, ~{left:.0f} s left"
        )

    table = pa.concat_tables([pq.read_table(p, schema=schema) for p in sorted(parts.glob("part-*.parquet"))])
    order = {it.key: n for n, it in enumerate(items)}
    rows = sorted(table.to_pylist(), key=lambda r: (order.get(r["source"], len(order)), r["lesion"] or 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        write_csv(rows, scorer.columns, out)
    else:
        _write_atomic(out, lambda tmp: pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp))
    shutil.rmtree(parts)
    errors = [r for r in rows if r["error"]]
    scored_rows = [r for r in rows if not r["error"]]
    return {
        "out": str(out),
        "photos": len(items),
        "rows": len(rows),
        "lesions": len(scored_rows),
        "errors": len(errors),
        "fallback_photos": len({r["source"] for r in scored_rows if r["fallback"]}),
        "by_risk": {k: sum(r["risk"] == k for r in scored_rows) for k in ("high", "medium", "low")},
        "resumed": resumed,
        "seconds": round(time.monotonic() - start, 1),
        "models": versions,
    }
