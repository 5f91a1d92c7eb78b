"""Logs of earlier DrSpot versions brought into the prediction log in force: ``drspot import-logs`` and every
``drspot deploy`` (logs a Bento folder held before the state home existed), of every earlier schema, with their
confirmations, consented patient fields and stored photos."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from sqlalchemy import Table, create_engine, insert, select

from infra.config import Config
from serving.store import PredictionLog, feedback, patients, predictions, redact

IMPORTED = ".imported"  # suffix of the marker written beside a stranded log once it was imported


def stranded(bentoml_home: str | Path) -> list[Path]:
    """Prediction logs that DrSpot versions before the state home left inside Bento folders
    (``<BENTOML_HOME>/bentos/<name>/<version>/src/.drspot/predictions.db``) and that were not imported yet."""
    found = Path(bentoml_home).glob("bentos/*/*/src/.drspot/predictions.db")
    return sorted(p for p in found if not p.with_name(p.name + IMPORTED).is_file())


def import_log(source: str | Path, into: PredictionLog) -> dict[str, int]:
    """Copy the predictions, confirmations and stored images of the SQLite log ``source`` into ``into``.

    Idempotent: a prediction whose ``request_id`` is already there, or a confirmation already there (same request,
    label, reviewer and time), is not copied again. Stored images are copied into ``into``'s image store (content
    addressed) and the rows point at the copies; an image missing at the source keeps its old path, so the flywheel
    reports it as missing rather than losing the row. The source is read only, never changed or deleted.

    Returns:
        counts: predictions / feedback imported and already present, images copied and missing.
    """
    src = create_engine(f"sqlite:///{Path(source).resolve()}")
    counts = dict.fromkeys(
        ("predictions", "predictions_present", "feedback", "feedback_present", "images", "images_missing"), 0
    )
    counts |= {"patients": 0, "patients_present": 0}
    try:
        with src.connect() as conn:  # a log of any earlier schema: the columns it has (later ones stay null)
            rows = [dict(r) for r in conn.execute(_select_present(src, predictions)).mappings()]
            confirmations = [
                dict(r) for r in conn.execute(_select_present(src, feedback).order_by(feedback.c.id)).mappings()
            ]
            kept = (
                [dict(r) for r in conn.execute(_select_present(src, patients)).mappings()]
                if _has(src, "patients")
                else []
            )
    finally:
        src.dispose()
    with into.engine.connect() as conn:
        have = set(conn.execute(select(predictions.c.request_id)).scalars())
        have_patients = set(conn.execute(select(patients.c.request_id)).scalars())
        seen = {
            (r.request_id, r.confirmed_label, r.reviewer, _naive(r.created_at))
            for r in conn.execute(
                select(feedback.c.request_id, feedback.c.confirmed_label, feedback.c.reviewer, feedback.c.created_at)
            )
        }
    new_rows = []
    for r in rows:
        if r["request_id"] in have:
            counts["predictions_present"] += 1
            continue
        old = r["image_path"]
        if old and into.images_dir is not None:
            if Path(old).is_file():
                r["image_path"] = into.store_image(r["image_sha256"], Path(old).read_bytes(), r["format"] or "")
                counts["images"] += 1
            else:
                counts["images_missing"] += 1
        new_rows.append(r)
    new_feedback = []
    for f in confirmations:
        key = (f["request_id"], f["confirmed_label"], f["reviewer"], _naive(f["created_at"]))
        if key in seen:
            counts["feedback_present"] += 1
            continue
        seen.add(key)
        new_feedback.append({k: v for k, v in f.items() if k != "id"})
    new_patients = [p for p in kept if p["request_id"] not in have_patients]  # a patient kept there stays as it is
    counts["patients_present"] = len(kept) - len(new_patients)
    with into.engine.begin() as conn:  # one transaction: an interrupted import leaves nothing half-copied
        if new_rows:
            conn.execute(insert(predictions), new_rows)
        if new_feedback:
            conn.execute(insert(feedback), new_feedback)
        if new_patients:
            conn.execute(insert(patients), new_patients)
    counts["predictions"], counts["feedback"], counts["patients"] = len(new_rows), len(new_feedback), len(new_patients)
    return counts


def _has(engine, table: str) -> bool:
    from sqlalchemy import inspect

    return inspect(engine).has_table(table)


def _select_present(engine, table: Table):
    """``SELECT`` of ``table``'s columns that the database at ``engine`` has (an older log lacks later ones)."""
    from sqlalchemy import inspect

    present = {c["name"] for c in inspect(engine).get_columns(table.name)}
    return select(*[c for c in table.columns if c.name in present])


def _naive(t: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive times, PostgreSQL aware ones (UTC): compare them alike."""
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t is not None and t.tzinfo else t


def import_stranded(cfg: Config, sources: list[Path] | None = None) -> list[tuple[Path, dict[str, int]]]:
    """Import every log left inside a Bento folder (or the ``sources`` given) into the configured log."""
    sources = stranded(os.environ["BENTOML_HOME"]) if sources is None else sources
    if not sources:
        return []
    log = PredictionLog.from_config(cfg)
    done = []
    for src in sources:
        counts = import_log(src, log)
        # the marker keeps `drspot deploy` from importing it again into a log that was since moved aside (the demo's
        # fresh start); `drspot import-logs PATH` still can, and finds everything already there
        src.with_name(src.name + IMPORTED).write_text(f"imported into {redact(log.url)} at {dt.datetime.now(dt.UTC)}\n")
        done.append((src, counts))
    return done
