"""Clinician-confirmed cases from the prediction log, on their way into the dataset (the flywheel).

:func:`pending` picks the confirmed cases that can be used and are not in the dataset yet: only
confirmations (the ``feedback`` table), only predictions whose image was stored (the
``serving.store_images`` consent setting), one row per image (``image_id`` = ``fb_`` + the first 20
hex digits of the image's sha256, so a case is ingested once however often it is confirmed). Each
case left out is listed with its reason. :func:`export` writes them as an ordinary source folder
(``feedback.csv`` + ``images/``) that ``ingest`` reads with its ``feedback`` adapter, so they pass
through the same validation and de-duplication as any data. :func:`fate` reads the data gate's
outputs back and says where each case ended up: train, val, held out (it duplicates a frozen test
image), dropped by de-duplication, or quarantined.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from components.data.manifest import MANIFEST

PREFIX = "fb_"
CSV = "feedback.csv"
FIELDS = [
    "image_id",
    "label",
    "file",
    "request_id",
    "reviewer",
    "confirmed_at",
    "predicted_label",
    "image_sha256",
    "box",  # the reviewer's lesion box, "x_min y_min x_max y_max" normalised; empty = label only
]


def image_id(sha256: str) -> str:
    return f"{PREFIX}{sha256[:20]}"


@dataclass
class Case:
    image_id: str
    label: str
    file: str
    request_id: str
    reviewer: str
    confirmed_at: str
    predicted_label: str | None
    image_sha256: str
    box: list[float] | None = None


def in_dataset(data_dir: str | Path) -> set[str]:
    """The image ids already in the dataset's manifest (empty when there is none)."""
    path = Path(data_dir) / MANIFEST
    return set(pq.read_table(path, columns=["image_id"]).column(0).to_pylist()) if path.is_file() else set()


def pending(log: Any, data_dir: str | Path) -> tuple[list[Case], list[dict[str, str]]]:
    """Confirmed cases not yet in ``data_dir``, and the confirmed cases that cannot be used (with why).

    ``log`` is a :class:`serving.store.PredictionLog`.
    """
    have = in_dataset(data_dir)
    by_image: dict[str, list[dict]] = defaultdict(list)
    skipped: list[dict[str, str]] = []
    for r in log.confirmed():
        if not r["image_path"]:
            skipped.append(
                {
                    "request_id": r["request_id"],
                    "reason": "image not stored (serving.store_images was off when it was served)",
                }
            )
        elif not Path(r["image_path"]).is_file():
            skipped.append({"request_id": r["request_id"], "reason": f"stored image missing: {r['image_path']}"})
        else:
            by_image[image_id(r["image_sha256"])].append(r)
    cases = []
    for iid, rs in by_image.items():
        if iid in have:
            continue
        labels = sorted({r["confirmed_label"] for r in rs})
        if len(labels) > 1:
            for r in rs:
                skipped.append(
                    {
                        "request_id": r["request_id"],
                        "reason": f"the same image was confirmed with different labels ({', '.join(labels)})",
                    }
                )
            continue
        r = rs[-1]
        cases.append(
            Case(
                image_id=iid,
                label=r["confirmed_label"],
                file=r["image_path"],
                request_id=r["request_id"],
                reviewer=r["reviewer"],
                confirmed_at=r["created_at"].isoformat() if r["created_at"] else "",
                predicted_label=r.get("label"),
                image_sha256=r["image_sha256"],
                box=r.get("box"),
            )
        )
    return cases, skipped


def export(cases: list[Case], out_dir: str | Path) -> Path:
    """Write ``cases`` as a source folder: ``feedback.csv`` plus the images under ``images/``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / CSV, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for c in cases:
            dest = out / "images" / f"{c.image_id}{Path(c.file).suffix}"
            shutil.copyfile(c.file, dest)
            box = " ".join(f"{v:g}" for v in c.box) if c.box else ""
            w.writerow({**asdict(c), "file": f"images/{dest.name}", "box": box})
    return out


def fate(prepared: str | Path, ids: list[str]) -> dict[str, dict[str, str]]:
    """Where each of ``ids`` ended up after the data gate in ``prepared``: {id: {"where", "why"}}."""
    prepared = Path(prepared)
    want = set(ids)
    out: dict[str, dict[str, str]] = {}

    def rows(path: Path, cols: list[str]) -> list[dict]:
        if not path.is_file():
            return []
        return [r for r in pq.read_table(path, columns=cols).to_pylist() if r["image_id"] in want]

    for r in rows(prepared / "validate" / "quarantine.parquet", ["image_id", "check", "reason", "severity"]):
        if r["severity"] == "warn":
            out[r["image_id"]] = {"where": "quarantined", "why": f"{r['check']}: {r['reason']}"}
    for r in rows(prepared / "dedup" / "dedup_dropped.parquet", ["image_id", "reason", "detail"]):
        out.setdefault(r["image_id"], {"where": "dropped", "why": f"{r['reason']}: {r['detail']}"})
    report = prepared / "split" / "split_report.json"
    if report.is_file():
        for h in json.loads(report.read_text()).get("held_out_rows", []):
            if h["image_id"] in want:
                out.setdefault(h["image_id"], {"where": "held out", "why": f"{h['reason']} ({h['detail']})"})
    for r in rows(prepared / "split" / "split.parquet", ["image_id", "split"]):
        out.setdefault(r["image_id"], {"where": r["split"], "why": ""})
    for i in ids:
        out.setdefault(i, {"where": "not in the gate's output", "why": "not found in any report"})
    return out
