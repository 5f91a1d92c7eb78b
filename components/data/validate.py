"""``drspot validate``: the data gate's first step.

Two layers, because Great Expectations validates tables only:

* a GX 1.x suite (ephemeral context: nothing written to disk) over the manifest, one row per
  image: columns, unique and safe ids, sha256 format, label in the configured classes, lesion_id
  present, boxes inside [0, 1] with min < max, width/height bounds, split values;
* the project's own image checks, in parallel processes or on a Dask cluster (``infra/compute.py``):
  the file is there and unchanged (sha256), fully decodes (a truncated JPEG is caught), converts to RGB, is not
  blank. Quality features (brightness, contrast, saturation, blur, JPEG blockiness, mean colour) and the 64-bit
  pHash are recorded as manifest columns for de-duplication and drift monitoring.

Each check has a severity from ``params.yaml`` (``validate.severity``): *error* stops the gate
with a message naming the check and up to N offending rows; *warn* quarantines the rows (kept,
listed, excluded); *info* is reported only. Outputs in the prepared folder:
``validated.parquet``, ``quarantine.parquet`` (image_id, check, reason, severity),
``validate_summary.json`` and ``validate_report.html``. When the gate stops, the summary says why
and no ``validated.parquet`` is left behind to look complete.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.data.images import QUALITY_FEATURES
from components.data.manifest import MANIFEST, SCHEMA, SPLITS, DataError, read_manifest
from components.step_report import kv, table, write_html, write_json
from infra.compute import ComputeError, map_chunks
from infra.config import Config

VALIDATED = "validated.parquet"
QUARANTINE = "quarantine.parquet"
SUMMARY = "validate_summary.json"
FEATURES = list(QUALITY_FEATURES)
QUARANTINE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("check", pa.string()), ("reason", pa.string()), ("severity", pa.string())]
)


@dataclass
class ValidationResult:
    rows_in: int
    rows_valid: int
    quarantine: list[dict[str, str]]
    expectations: list[dict[str, Any]]
    out_dir: Path

    def quarantined_by_check(self) -> dict[str, int]:
        rows = {(q["image_id"], q["check"]) for q in self.quarantine if q["severity"] == "warn"}
        return dict(sorted(Counter(check for _, check in rows).items()))


# --- the GX suite ---------------------------------------------------------------------------------


def _expectations(cfg: Config):
    import great_expectations.expectations as gxe

    v = cfg.validate_
    yield "image_id_unique", gxe.ExpectColumnValuesToBeUnique(column="image_id")
    yield "image_id_safe", gxe.ExpectColumnValuesToMatchRegex(column="image_id", regex=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    yield "sha256_format", gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$")
    yield "path_present", gxe.ExpectColumnValuesToNotBeNull(column="path")
    yield "split_values", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS))
    yield "label_in_classes", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(cfg.classes.names))
    yield "lesion_id_present", gxe.ExpectColumnValuesToNotBeNull(column="lesion_id")
    yield "boxes_valid", gxe.ExpectColumnValuesToBeInSet(column="boxes_valid", value_set=[True])
    yield "size_bounds", gxe.ExpectColumnValuesToBeBetween(column="width", min_value=v.min_side, max_value=v.max_side)
    yield "size_bounds", gxe.ExpectColumnValuesToBeBetween(column="height", min_value=v.min_side, max_value=v.max_side)
    yield "sha256_unique", gxe.ExpectColumnValuesToBeUnique(column="sha256")


def _boxes_valid(boxes: list | None) -> bool:
    return all(len(b) == 4 and 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1 for b in boxes or [])


def run_suite(table_: pa.Table, cfg: Config) -> list[dict[str, Any]]:
    """Run the GX suite; one result per expectation with the offending row positions."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    df = table_.select(["image_id", "path", "sha256", "width", "height", "label", "lesion_id", "split"]).to_pandas()
    df["sha256"] = df["sha256"].fillna("")
    df["lesion_id"] = df["lesion_id"].replace("", None)
    df["boxes_valid"] = [_boxes_valid(b) for b in table_.column("boxes").to_pylist()]
    df["_row"] = range(len(df))
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        ctx.data_sources.add_pandas("drspot")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    suite = gx.ExpectationSuite(name="drspot-manifest")
    for check, exp in _expectations(cfg):
        exp.meta = {"check": check, "severity": cfg.validate_.severity[check]}
        suite.add_expectation(exp)
    suite = ctx.suites.add(suite)
    res = batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"]})
    out = []
    for r in res.results:
        conf = r.expectation_config
        rows = sorted({int(u["_row"]) for u in r.result.get("unexpected_index_list") or []})
        out.append(
            {
                "check": conf.meta["check"],
                "severity": conf.meta["severity"],
                "expectation": conf.type,
                "column": conf.kwargs.get("column"),
                "success": bool(r.success),
                "unexpected_count": len(rows),
                "rows": rows,
            }
        )
    return out


# --- image checks ---------------------------------------------------------------------------------


def check_image(args: tuple[int, str, str, int, float]) -> tuple[int, dict[str, Any] | None, list[tuple[str, str]]]:
    """Check one image file; returns (row, features or None, [(check, reason), ...])."""
    from components.data.images import CROP_HASHES, ImageError, decode, phash, quality

    row, path, sha256, max_pixels, blank_std = args
    p = Path(path)
    if not p.is_file():
        return row, None, [("file_present", f"file not found: {path}")]
    data = p.read_bytes()
    failures = []
    if hashlib.sha256(data).hexdigest() != sha256:
        failures.append(("file_unchanged", "the file's sha256 differs from the manifest (changed since ingest)"))
    try:
        dec = decode(data, max_pixels=max_pixels)
    except ImageError as e:
        return row, None, [*failures, ("decodes", f"{e.check}: {e.reason}")]
    feats = quality(dec.rgb)
    if feats["contrast"] * 255 < blank_std:
        failures.append(("not_blank", f"uniform image (grey-level std {feats['contrast'] * 255:.2f} < {blank_std})"))
    feats["phash"] = f"{phash(dec.rgb):016x}"
    feats["phash_crops"] = ",".join(f"{phash(dec.rgb, c):016x}" for c in CROP_HASHES)
    feats["original_mode"] = dec.original_mode
    feats["decode_notes"] = "; ".join(dec.notes) or None
    return row, feats, failures


# --- the step -------------------------------------------------------------------------------------


def _clear(out_dir: Path) -> None:
    for name in (VALIDATED, QUARANTINE, SUMMARY, "validate_report.html"):
        (out_dir / name).unlink(missing_ok=True)


def _fail(out_dir: Path, summary: dict[str, Any], message: str) -> DataError:
    summary.update(status="failed", error=message)
    write_json(out_dir / SUMMARY, summary)
    return DataError(message)


def validate(dataset_dir: str | Path, out_dir: str | Path, cfg: Config, workers: int | None = None) -> ValidationResult:
    """Validate a dataset; write the validated manifest, quarantine table and reports to ``out_dir``.

    Raises:
        DataError: an *error*-severity check failed, the manifest lacks columns, the dataset is
            empty, or every row was quarantined. The message names the check and offending rows.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    summary: dict[str, Any] = {"dataset": str(dataset_dir), "status": "running"}
    path = dataset_dir / MANIFEST
    try:
        manifest = read_manifest(dataset_dir)
    except FileNotFoundError as e:
        raise _fail(out_dir, summary, str(e)) from None
    except ValueError as e:  # required columns missing
        raise _fail(out_dir, summary, f"columns: {e}") from None
    wrong = [
        f"{f.name} is {manifest.schema.field(f.name).type}, expected {f.type}"
        for f in SCHEMA
        if f.name in manifest.column_names and not manifest.schema.field(f.name).type.equals(f.type)
    ]
    if wrong:
        raise _fail(out_dir, summary, f"columns: wrong types in {path}: {'; '.join(wrong)}")
    n = manifest.num_rows
    summary["rows_in"] = n
    if n == 0:
        raise _fail(out_dir, summary, f"the dataset {dataset_dir} is empty: its manifest has no rows")

    ids = manifest.column("image_id").to_pylist()
    sev = cfg.validate_.severity
    limit = cfg.validate_.max_listed_rows
    expectations = run_suite(manifest, cfg)
    errors = []
    reasons: dict[int, list[tuple[str, str, str]]] = defaultdict(list)
    for e in expectations:
        if e["success"]:
            continue
        named = ", ".join(str(ids[r]) for r in e["rows"][:limit]) + (" ..." if len(e["rows"]) > limit else "")
        if e["severity"] == "error":
            errors.append(f"{e['check']} ({e['expectation']} on {e['column']}): {e['unexpected_count']} rows: {named}")
        # the failing column's values (derived columns such as boxes_valid are not in the manifest)
        values = manifest.column(e["column"]).to_pylist() if e["column"] in manifest.column_names else None
        for r in e["rows"]:
            shown = values[r] if values is not None else None
            reasons[r].append((e["check"], f"{e['expectation']} failed for {e['column']}={shown!r}", e["severity"]))
    if errors:
        raise _fail(
            out_dir, {**summary, "expectations": _public(expectations)}, "validation stopped: " + " | ".join(errors)
        )

    root = dataset_dir.resolve()
    jobs = []
    for r, (rel, sha) in enumerate(
        zip(manifest.column("path").to_pylist(), manifest.column("sha256").to_pylist(), strict=True)
    ):
        full = (root / rel).resolve()
        if not full.is_relative_to(root):
            reasons[r].append(("file_present", f"path {rel!r} escapes the dataset folder", sev["file_present"]))
            continue
        jobs.append((r, str(full), sha, cfg.validate_.max_pixels, cfg.validate_.blank_std))
    features: dict[int, dict[str, Any]] = {}
    try:
        checked = map_chunks(check_image, jobs, cfg, workers)
    except ComputeError as e:  # the cluster, not the data: say so in the summary, write no manifest, retryable
        _fail(out_dir, summary, str(e))
        raise
    for r, feats, failures in checked:
        if feats is not None:
            features[r] = feats
        for check, reason in failures:
            reasons[r].append((check, reason, sev[check]))

    quarantine, keep = [], []
    for r in range(n):
        listed = reasons.get(r, [])
        quarantine += [{"image_id": ids[r], "check": c, "reason": why, "severity": s} for c, why, s in listed]
        if r in features and not any(s in ("warn", "error") for _, _, s in listed):
            keep.append(r)
    result = ValidationResult(n, len(keep), quarantine, expectations, out_dir)
    summary.update(
        rows_valid=len(keep),
        rows_quarantined=n - len(keep),
        quarantined_by_check=result.quarantined_by_check(),
        info=dict(Counter(q["check"] for q in quarantine if q["severity"] == "info")),
        expectations=_public(expectations),
    )
    pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), out_dir / QUARANTINE)
    if not keep:
        _report(out_dir, summary, quarantine)
        raise _fail(out_dir, summary, f"every one of the {n} rows failed validation; see {out_dir / QUARANTINE}")

    validated = manifest.take(keep)
    for col in [*FEATURES, "phash", "phash_crops", "original_mode", "decode_notes"]:
        values = [features[r][col] for r in keep]
        validated = validated.append_column(col, pa.array(values, pa.float64() if col in FEATURES else pa.string()))
    pq.write_table(validated, out_dir / VALIDATED, compression="zstd")
    summary["status"] = "passed"
    write_json(out_dir / SUMMARY, summary)
    _report(out_dir, summary, quarantine)
    return result


def _public(expectations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "rows"} for e in expectations]


def _report(out_dir: Path, summary: dict[str, Any], quarantine: list[dict[str, str]]) -> None:
    exps = [{**e, "result": "passed" if e["success"] else "FAILED"} for e in summary.get("expectations", [])]
    write_html(
        out_dir / "validate_report.html",
        "DrSpot validation report",
        [
            ("Summary", kv({k: v for k, v in summary.items() if k != "expectations"})),
            (
                "Expectations (Great Expectations suite over the manifest)",
                table(exps, ["check", "severity", "expectation", "column", "result", "unexpected_count"]),
            ),
            (
                "Quarantined and reported rows",
                table(quarantine, ["image_id", "check", "severity", "reason"], limit=1000),
            ),
        ],
    )
