"""The data gate as one call per step, with the folder layout shared by the CLI, DVC and Prefect.

``PREPARED/validate``, ``PREPARED/dedup`` and ``PREPARED/split`` hold each step's outputs (one DVC
stage output each); ``PREPARED`` defaults to ``paths.prepared/<dataset folder name>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infra.config import Config


def prepared_dir(dataset: str | Path, cfg: Config, prepared: str | Path | None = None) -> Path:
    return Path(prepared) if prepared else cfg.resolve(cfg.paths.prepared) / Path(dataset).resolve().name


def step_dirs(prepared: Path) -> dict[str, Path]:
    return {s: prepared / s for s in ("validate", "dedup", "split")}


def run_validate(dataset: str | Path, prepared: Path, cfg: Config):
    from components.data.validate import validate

    return validate(dataset, step_dirs(prepared)["validate"], cfg)


def run_dedup(dataset: str | Path, prepared: Path, cfg: Config):
    from components.data.dedup import dedup
    from components.data.validate import VALIDATED

    d = step_dirs(prepared)
    return dedup(d["validate"] / VALIDATED, dataset, d["dedup"], cfg)


def run_split(dataset: str | Path, prepared: Path, cfg: Config):
    from components.data.dedup import DEDUPLICATED, PAIRS
    from components.data.split import split

    d = step_dirs(prepared)
    return split(d["dedup"] / DEDUPLICATED, d["split"], cfg, d["dedup"] / PAIRS)


def summary(prepared: Path) -> dict[str, Any]:
    """The gate's figures, read back from the three reports."""
    from components.data.dedup import REPORT as DEDUP
    from components.data.split import REPORT as SPLIT
    from components.data.validate import SUMMARY as VALIDATE

    d = step_dirs(prepared)

    def load(p: Path) -> dict:
        return json.loads(p.read_text()) if p.is_file() else {}

    v, dd, s = load(d["validate"] / VALIDATE), load(d["dedup"] / DEDUP), load(d["split"] / SPLIT)
    return {
        "rows_in": v.get("rows_in"),
        "rows_valid": v.get("rows_valid"),
        "quarantined_by_check": v.get("quarantined_by_check", {}),
        "exact_pairs": dd.get("exact_pairs"),
        "near_pairs": dd.get("near_pairs"),
        "duplicate_groups": dd.get("groups_with_several_images"),
        "dropped_by_reason": dd.get("dropped_by_reason", {}),
        "label_conflicts": len(dd.get("label_conflicts", [])),
        "rows_per_split": s.get("rows_per_split", {}),
        "class_counts": s.get("class_counts", {}),
        "held_out": s.get("held_out"),
        "frozen_test": s.get("frozen_test"),
        "leakage": s.get("leakage", {}),
        "source_split_leakage": s.get("source_split_leakage"),
        "warning": s.get("warning"),
    }


def markdown(prepared: Path, dataset: str | Path) -> str:
    s = summary(prepared)
    lines = [
        f"# Data gate: `{dataset}`",
        "",
        "| step | figure |",
        "|---|---|",
        f"| rows in | {s['rows_in']} |",
        f"| passed validation | {s['rows_valid']} |",
    ]
    lines += [f"| quarantined: {k} | {v} |" for k, v in s["quarantined_by_check"].items()]
    lines += [
        f"| exact duplicate pairs | {s['exact_pairs']} |",
        f"| near-duplicate pairs | {s['near_pairs']} |",
        f"| groups with several images | {s['duplicate_groups']} |",
    ]
    lines += [f"| dropped: {k} | {v} |" for k, v in s["dropped_by_reason"].items()]
    lines += [f"| rows in {k} | {v} |" for k, v in s["rows_per_split"].items()]
    lines += [f"| held out (frozen test) | {s['held_out']} |"]
    lines += [f"| leakage: {k} | {v} |" for k, v in s["leakage"].items()]
    if s["source_split_leakage"]:
        lines += [f"| source split leakage: {k} | {v} |" for k, v in s["source_split_leakage"].items()]
    classes = sorted({c for counts in s["class_counts"].values() for c in counts})
    if classes:
        lines += ["", "| split | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for split, counts in s["class_counts"].items():
            lines.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in classes) + " |")
    if s["warning"]:
        lines += ["", f"**{s['warning']}**"]
    return "\n".join(lines)
