"""``drspot split``: stratified by label, grouped by (lesion_id ∪ duplicate group), deterministic,
with a frozen test set.

* Groups never span two splits: a lesion's images, and duplicates of each other, land together.
* Stratified: groups of each label are dealt, in a seeded order, largest first, to the split
  whose share of that label is furthest below its target ratio.
* Frozen test set: when a previous assignment exists (the last ``split.parquet``), rows keep their
  split, test rows never leave test, and new rows never enter it, except a new source's own test split: a new
  group whose every row its source marks ``test`` (``drspot demo --clinic`` ingests a new clinic's frozen test
  lesions so) joins the test set, which then holds both sources' test rows. A new row whose group holds a
  frozen test row cannot go to train/val either (that would leak): it is *held out* and listed.
* A source-defined split (MedMNIST, the YOLO export) is regrouped by default; with
  ``split.source_split: keep`` it is kept as is and any leakage in it is reported loudly.
* Every run counts cross-split groups, lesions and near-duplicate pairs and writes them into the
  report; in a split DrSpot made, a non-zero count is a bug and raises.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.data.manifest import SPLITS, DataError, read_step_input
from components.step_report import kv, table, write_html, write_json
from infra.config import Config

SPLIT = "split.parquet"
REPORT = "split_report.json"
NONE = "(none)"


@dataclass
class SplitResult:
    assignment: dict[str, str]  # image_id -> split
    held_out: list[dict[str, str]]
    report: dict[str, Any]


def _label_of_group(labels: list[str | None]) -> str:
    named = Counter(x for x in labels if x is not None)
    return named.most_common(1)[0][0] if named else NONE


def leakage(
    rows: list[dict[str, Any]], assignment: dict[str, str], pairs: list[tuple[str, str]] = ()
) -> dict[str, int]:
    """Counts of groups, lesions and duplicate pairs whose members sit in more than one split."""

    def spanning(key: str) -> int:
        seen: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            if r["image_id"] in assignment and r.get(key):
                seen[r[key]].add(assignment[r["image_id"]])
        return sum(1 for s in seen.values() if len(s) > 1)

    cross_pairs = sum(1 for a, b in pairs if a in assignment and b in assignment and assignment[a] != assignment[b])
    return {
        "cross_split_groups": spanning("group_id"),
        "cross_split_lesions": spanning("lesion_id"),
        "cross_split_duplicate_pairs": cross_pairs,
    }


def assign(
    rows: list[dict[str, Any]],
    ratios: dict[str, float],
    seed: int,
    prior: dict[str, str] | None = None,
) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Assign each row's group to a split. Rows need image_id, label and group_id (and may carry the split their
    source gave).

    Args:
        prior: image_id -> split from the previous run (frozen test set); None for a fresh split.

    Returns:
        (image_id -> split, held-out rows with their reason).

    Raises:
        DataError: a class has fewer groups than splits with a non-zero ratio (fresh split only).
    """
    prior = prior or {}
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["group_id"]].append(r)
    frozen_test = any(s == "test" for s in prior.values())
    assignment: dict[str, str] = {}
    held: list[dict[str, str]] = []
    fresh: list[str] = []
    for g, members in groups.items():
        old = {prior[m["image_id"]] for m in members if m["image_id"] in prior}
        if not old and frozen_test and all(m.get("split") == "test" for m in members):
            for m in members:  # a new source's own test split joins the frozen test set
                assignment[m["image_id"]] = "test"
        elif not old:
            fresh.append(g)
        elif "test" in old:
            for m in members:
                if prior.get(m["image_id"]) == "test":
                    assignment[m["image_id"]] = "test"
                else:
                    reason = (
                        "new row joins a frozen test group"
                        if m["image_id"] not in prior
                        else "linked to a frozen test group"
                    )
                    held.append({"image_id": m["image_id"], "reason": reason, "detail": f"group {g}"})
        else:
            # train/val only: the group follows the split holding most of its earlier rows
            votes = Counter(prior[m["image_id"]] for m in members if m["image_id"] in prior)
            target = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
            for m in members:
                assignment[m["image_id"]] = target

    splits = [s for s in SPLITS if ratios[s] > 0 and not (frozen_test and s == "test")]
    share = {s: ratios[s] / sum(ratios[t] for t in splits) for s in splits}
    by_label: dict[str, list[str]] = defaultdict(list)
    for g in fresh:
        by_label[_label_of_group([m["label"] for m in groups[g]])].append(g)
    if not prior:
        few = {lab: len(gs) for lab, gs in by_label.items() if lab != NONE and len(gs) < len(splits)}
        if few:
            detail = ", ".join(f"'{k}' has {v}" for k, v in sorted(few.items()))
            raise DataError(
                f"too few groups to stratify into {len(splits)} splits: class {detail} group(s) "
                "(a group = a lesion with its duplicates); add data for it or drop the class"
            )
    rng = random.Random(seed)
    for lab in sorted(by_label):
        gs = sorted(by_label[lab])
        rng.shuffle(gs)
        gs.sort(key=lambda g: -len(groups[g]))  # stable: big groups first, seeded order among equals
        # counts already held by each split for this label (earlier rows), then deal groups
        have = Counter(
            assignment[r["image_id"]]
            for r in rows
            if r["image_id"] in assignment and _label_of_group([r["label"]]) == lab
        )
        have = Counter({s: have.get(s, 0) for s in splits})
        total = sum(have.values()) + sum(len(groups[g]) for g in gs)
        for g in gs:
            # the split furthest below its target share of this label takes the group
            s = min(splits, key=lambda s: (have[s] - share[s] * total) / max(share[s], 1e-9))
            for m in groups[g]:
                assignment[m["image_id"]] = s
            have[s] += len(groups[g])
    return assignment, held


def split(
    deduplicated: str | Path, out_dir: str | Path, cfg: Config, pairs_file: str | Path | None = None
) -> SplitResult:
    """Split a de-duplicated manifest; writes ``split.parquet`` and the split report.

    A previous ``split.parquet`` in ``out_dir`` is the frozen assignment.

    Raises:
        DataError: input missing or empty, too few groups in a class, or leakage in a split
            DrSpot made (a bug guard).
    """
    deduplicated, out_dir = Path(deduplicated), Path(out_dir)
    tbl = read_step_input(deduplicated, "group_id", "dedup", "split")
    rows = tbl.select(["image_id", "label", "lesion_id", "group_id", "split"]).to_pylist()
    pairs = []
    if pairs_file and Path(pairs_file).is_file():
        pairs = [(p["a"], p["b"]) for p in pq.read_table(pairs_file, columns=["a", "b"]).to_pylist()]
    out_path = out_dir / SPLIT
    prior = None
    if out_path.is_file():
        prior = dict(zip(*pq.read_table(out_path, columns=["image_id", "split"]).to_pydict().values(), strict=True))
    mode = cfg.split.source_split
    source_defined = {r["image_id"]: r["split"] for r in rows if r["split"]}
    kept_source = mode == "keep" and bool(source_defined)
    if kept_source:
        prior = {**source_defined, **(prior or {})}
    assignment, held = assign(rows, cfg.split.ratios, cfg.seed, prior)
    if kept_source:  # rows the source left unsplit were assigned above; source rows keep theirs
        assignment.update({k: v for k, v in source_defined.items() if k not in {h["image_id"] for h in held}})

    leaks = leakage(rows, assignment, pairs)
    source_leaks = leakage(rows, source_defined, pairs) if source_defined else None
    if not kept_source and any(leaks.values()):
        raise DataError(f"leakage in the split DrSpot made (a bug, please report): {leaks}")

    counts: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for r in rows:
        if r["image_id"] in assignment:
            counts[assignment[r["image_id"]]][r["label"] or NONE] += 1
    overall = sum(counts.values(), Counter())
    n_all = sum(overall.values())
    drift = {}
    for s in SPLITS:
        n_s = sum(counts[s].values())
        if n_s:
            drift[s] = max(abs(counts[s][c] / n_s - overall[c] / n_all) for c in overall)
    report = {
        "rows_in": len(rows),
        "rows_assigned": len(assignment),
        "held_out": len(held),
        "frozen_test": bool(prior) and any(v == "test" for v in (prior or {}).values()),
        "joined_frozen_test": (
            sum(1 for r in rows if assignment.get(r["image_id"]) == "test" and r["image_id"] not in prior)
            if prior and not kept_source
            else 0
        ),
        "source_split": mode if source_defined else "none (the source defines no split)",
        "rows_per_split": {s: sum(counts[s].values()) for s in SPLITS},
        "groups_per_split": {
            s: len({r["group_id"] for r in rows if assignment.get(r["image_id"]) == s}) for s in SPLITS
        },
        "class_counts": {s: dict(sorted(counts[s].items())) for s in SPLITS},
        "max_class_share_drift": drift,
        "class_drift_within_limit": all(v <= cfg.split.max_class_drift for v in drift.values()),
        "leakage": leaks,
        "source_split_leakage": source_leaks,
        "held_out_rows": held,
        "ratios": cfg.split.ratios,
        "seed": cfg.seed,
    }
    if kept_source and any(leaks.values()):
        report["warning"] = (
            f"LEAKAGE in the kept source-defined split: {leaks['cross_split_lesions']} lesions, "
            f"{leaks['cross_split_groups']} groups and {leaks['cross_split_duplicate_pairs']} duplicate pairs "
            "span two splits; set split.source_split: regroup for an honest evaluation"
        )
    full = tbl.drop_columns(["split"]).append_column(
        "split", pa.array([assignment.get(x) for x in tbl.column("image_id").to_pylist()], pa.string())
    )
    full = full.filter(pc.is_valid(full.column("split")))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(".split.parquet.partial")
    pq.write_table(full, tmp, compression="zstd")
    tmp.replace(out_path)
    write_json(out_dir / REPORT, report)
    write_html(
        out_dir / "split_report.html",
        "DrSpot split report",
        [
            ("Summary", kv({k: v for k, v in report.items() if k not in ("class_counts", "held_out_rows")})),
            ("Rows per split and class", table([{"split": s, **report["class_counts"][s]} for s in SPLITS])),
            ("Held-out rows", table(held)),
        ],
    )
    return SplitResult(assignment=assignment, held_out=held, report=report)
