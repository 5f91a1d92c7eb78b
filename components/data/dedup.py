"""``drspot dedup``: exact and near-duplicate images, merged with lesion links into groups.

* Exact duplicates: equal sha256. One copy is kept, chosen deterministically (the smallest
  image_id among the copies that carry a label); the others are dropped and listed.
* Near-duplicates: 64-bit pHash pairs within ``dedup.max_distance`` (Hamming), between the
  whole-image hashes and also between one image's centre-crop hashes and another's whole-image
  hash (a cropped copy is far from its original in pHash, but close to its original's crop), found by
  multi-index hashing (:func:`near_pairs`): the hash is cut into ``m`` chunks, and any pair within
  distance d agrees within ``d // m`` bits on at least one chunk, so each chunk's table is probed
  with the few keys at that radius. The work is vectorised numpy over bucket tables, not an
  all-pairs loop. Candidates are then *verified* (``dedup.verify``): some centre crop of one
  image must correlate with some crop of the other at ``dedup.min_correlation`` or more (grey, whole crop), and
  the middle of those crops, in colour, at ``dedup.min_centre_correlation`` or more. The second test removes
  look-alike lesions that merely share a layout: dermatoscope photos share a bright disk in a black frame, and
  whole-image thumbnails of different BCN20000 lesions correlate at up to 0.998 (1,778 false pairs among its
  10,461 photos, 1,271 of them across labels); their middles in colour do not (none of them at 0.95).
* Lesion links: images with the same lesion_id; patient links: images with the same ``patient_id``, where the
  source has one.
* Feedback (``source == "feedback"``, clinician-confirmed serving images) never displaces curated
  rows: an exact copy keeps the curated row, and feedback whose confirmed label disagrees with the
  curated rows it duplicates is dropped (``label_conflict``, for review) while they stay, so a
  frozen test image is never lost to a confirmation.

Everything is merged by union-find into groups (``group_id``: the smallest image_id in the group).
A group whose labelled images disagree is a *label conflict*: all its rows are quarantined, except where the curated
rows agree and only confirmed feedback disagrees (then the feedback rows go, for review).
Outputs: ``deduplicated.parquet`` (validated rows less dropped copies and conflicts, plus ``group_id``),
``dedup_pairs.parquet`` (a, b, kind, distance, correlation, centre_correlation), ``dedup_dropped.parquet``
(image_id, reason, detail) and ``dedup_report.json``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.data.manifest import read_step_input
from components.step_report import write_json
from infra.config import Config

DEDUPLICATED = "deduplicated.parquet"
PAIRS = "dedup_pairs.parquet"
DROPPED = "dedup_dropped.parquet"
REPORT = "dedup_report.json"
PAIR_SCHEMA = pa.schema(
    [
        ("a", pa.string()),
        ("b", pa.string()),
        ("kind", pa.string()),
        ("distance", pa.int64()),
        ("correlation", pa.float64()),
        ("centre_correlation", pa.float64()),
    ]
)
DROP_SCHEMA = pa.schema([("image_id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


# --- near-duplicate search ------------------------------------------------------------------------


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in c) for c in combinations(range(bits), r)]
    return np.array(masks, dtype=np.int64)


def plan(n: int, max_distance: int) -> tuple[int, int]:
    """Chunks ``m`` and per-chunk radius for multi-index hashing, from a cost model.

    Cost per chunk = probes x (n lookups + n * n / 2**bits candidate checks); ``m`` is chosen to
    minimise m x cost (the MIH rule of thumb, m ~ 64 / log2 n, falls out of it).
    """
    best = None
    for m in range(1, 9):
        bits = 64 // m
        if bits > 26:  # keep bucket tables small (2**26 entries at most)
            continue
        r = max_distance // m
        probes = sum(comb(bits, k) for k in range(r + 1))
        cost = m * probes * (n + n * n / 2**bits)
        if best is None or cost < best[0]:
            best = (cost, m)
    assert best is not None
    return best[1], max_distance // best[1]


def near_pairs(
    hashes: np.ndarray, max_distance: int, block: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of 64-bit hashes within ``max_distance`` bits: arrays i, j, distance.

    Exact (not approximate): multi-index hashing guarantees every qualifying pair shares a chunk
    within radius ``max_distance // m``; candidates are confirmed by popcount. Memory is bounded by
    processing candidate pairs in blocks of ``block``.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2:
        e = np.empty(0, np.int64)
        return e, e, e
    m, radius = plan(n, max_distance)
    widths = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    found_i, found_j, found_d = [], [], []
    shift = 0
    for width in widths:
        keys = ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
        shift += width
        order = np.argsort(keys, kind="stable")
        counts = np.bincount(keys, minlength=1 << width)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for mask in _flip_masks(width, radius):
            q = keys ^ mask
            cnt = counts[q]
            nz = np.flatnonzero(cnt)
            if not len(nz):
                continue
            c = cnt[nz]
            csum = np.cumsum(c)
            lo = 0
            while lo < len(nz):  # blocks of queries whose candidate lists fit in `block`
                base = csum[lo - 1] if lo else 0
                hi = int(np.searchsorted(csum, base + block, side="right"))
                hi = max(hi, lo + 1)
                qi = np.repeat(nz[lo:hi], c[lo:hi])
                offs = np.arange(len(qi)) - np.repeat(csum[lo:hi] - c[lo:hi] - base, c[lo:hi])
                j = order[np.repeat(starts[q[nz[lo:hi]]], c[lo:hi]) + offs]
                keep = qi < j
                qi, j = qi[keep], j[keep]
                d = np.bitwise_count(h[qi] ^ h[j]).astype(np.int64)
                ok = d <= max_distance
                found_i.append(qi[ok])
                found_j.append(j[ok])
                found_d.append(d[ok])
                lo = hi
    if not found_i:
        e = np.empty(0, np.int64)
        return e, e, e
    i, j, d = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
    # a pair close in several chunks is found once per chunk
    _, first = np.unique(i * n + j, return_index=True)
    return i[first], j[first], d[first]


def near_pairs_with_crops(full: np.ndarray, crops: np.ndarray, max_distance: int) -> dict[tuple[int, int], int]:
    """Near pairs of images from their whole-image hashes ``full`` (n,) and crop hashes ``crops`` (n, k).

    A pair qualifies when the whole-image hashes are within ``max_distance``, or when a crop hash
    of one is within ``max_distance`` of the other's whole-image hash (a cropped copy). Returns
    {(image i, image j): smallest distance} with i < j. One multi-index search over all n(k+1)
    hashes; pairs of two crop hashes are ignored.
    """
    n = len(full)
    allh = np.concatenate([full, crops.T.ravel()]) if crops.size else full
    i, j, d = near_pairs(allh, max_distance)
    vi, vj = i // n, j // n
    keep = ((vi == 0) | (vj == 0)) & (i % n != j % n)
    a, b, d = i[keep] % n, j[keep] % n, d[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    out: dict[tuple[int, int], int] = {}
    for x, y, dist in zip(lo.tolist(), hi.tolist(), d.tolist(), strict=True):
        if dist < out.get((x, y), 65):
            out[(x, y)] = dist
    return out


# --- verification ---------------------------------------------------------------------------------


# Thumbnails are 24 px crops: decoded with a shorter side of 200 px or more, they correlate as at full size (a
# 600x450 JPEG at half size: planted copies 0.99887 either way, 1.6 instead of 4.2 ms; at a quarter, 112 px, a
# planted copy lost 0.003), and a camera's 4000x3000 photo decodes at an eighth
VERIFY_MIN_SIDE = 200


CENTRE = 0.3  # the middle compared in colour: each crop less 30% of its width/height on each side


@lru_cache(maxsize=4096)
def _thumbs_of(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from components.data.images import decode, thumbnails

    rgb = decode(path, min_side=VERIFY_MIN_SIDE).rgb
    whole = thumbnails(rgb).astype(np.float32)  # 11.5 kB each, cached
    return whole, thumbnails(rgb, centre=CENTRE, colour=True).astype(np.float32)


def _thumbs(path: str) -> tuple[np.ndarray, np.ndarray]:
    """An image's crop thumbnails, kept per process (keyed by the file's mtime and size, so a rewritten file is
    read again): a verification chunk meets the same image in several pairs."""
    st = Path(path).stat()
    return _thumbs_of(path, st.st_mtime_ns, st.st_size)


def pair_correlation(pair: tuple[str, str]) -> tuple[float, float]:
    """Crop-aware correlations of two images' files, each the max over centre crops of both: whole crops in grey,
    and their middles in colour."""
    (wa, ca), (wb, cb) = _thumbs(pair[0]), _thumbs(pair[1])
    return float((wa @ wb.T).max()), float((ca @ cb.T).max())


def confirmed(corr: tuple[float, float], cfg: Config) -> bool:
    """A candidate pair is a near-duplicate: both correlations (:func:`pair_correlation`) reach their floors."""
    return corr[0] >= cfg.dedup.min_correlation and corr[1] >= cfg.dedup.min_centre_correlation


def verify(
    pairs: list[tuple[str, str]], paths: dict[str, Path], cfg: Config | None = None
) -> dict[tuple[str, str], tuple[float, float]]:
    """Crop-aware correlations of each candidate pair (:func:`pair_correlation`), on the run's compute target
    (local processes or a Dask cluster, ``infra/compute.py``) when ``cfg`` is given, else in this process."""
    jobs = [(str(paths[a]), str(paths[b])) for a, b in pairs]
    if cfg is None:
        corr = [pair_correlation(j) for j in jobs]
    else:
        from infra.compute import map_chunks

        corr = map_chunks(pair_correlation, jobs, cfg, min_jobs=256, chunk_size=cfg.compute.pair_chunk_size)
    return dict(zip(pairs, corr, strict=True))


# --- union-find -----------------------------------------------------------------------------------


def _newcomer(row: dict[str, Any]) -> bool:
    """Feedback rows never displace curated rows: not as the kept copy, not in a label conflict."""
    return row.get("source") == "feedback"


class UnionFind:
    def __init__(self, items: list[str]) -> None:
        self.parent = {x: x for x in items}

    def find(self, x: str) -> str:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller id becomes the root, so group ids are deterministic
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


@dataclass
class DedupResult:
    rows_in: int
    rows_out: int
    pairs: list[dict[str, Any]]
    dropped: list[dict[str, str]]
    groups: int
    multi_groups: int
    conflicts: list[dict[str, Any]]
    candidates: int
    rejected_candidates: int


def _exact(rows: list[dict], uf: UnionFind, pairs: list[dict], dropped: list[dict]) -> set[str]:
    """Exact duplicates: one copy kept per sha256, deterministically (curated before feedback, labelled, boxed,
    by id); the pairs recorded and grouped, the other copies dropped. Returns the dropped ids."""
    by_sha: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_sha[r["sha256"]].append(r)
    drop_ids: set[str] = set()
    for copies in by_sha.values():
        if len(copies) < 2:
            continue
        copies.sort(key=lambda r: (_newcomer(r), r["label"] is None, not r["boxes"], r["image_id"]))
        keeper = copies[0]["image_id"]
        for a, b in combinations(sorted(c["image_id"] for c in copies), 2):
            pairs.append({"a": a, "b": b, "kind": "exact", "distance": 0, "correlation": 1.0})
            uf.union(a, b)
        for c in copies[1:]:
            drop_ids.add(c["image_id"])
            dropped.append(
                {"image_id": c["image_id"], "reason": "exact_duplicate", "detail": f"same bytes as {keeper} (kept)"}
            )
    return drop_ids


def _near(distinct: list[dict], dataset_dir: Path, cfg: Config, uf: UnionFind, pairs: list[dict]) -> tuple[int, int]:
    """Near duplicates among the distinct files: perceptual-hash candidates (whole image and crops), verified by
    pixel correlation when ``dedup.verify``; the confirmed pairs recorded and grouped. Returns (candidates,
    candidates the verification rejected)."""
    hashes = np.array([int(r["phash"], 16) for r in distinct], dtype=np.uint64)
    crop_cols = [r.get("phash_crops") for r in distinct]
    crops = (
        np.array([[int(x, 16) for x in c.split(",")] for c in crop_cols], dtype=np.uint64)
        if all(crop_cols)
        else np.empty((len(distinct), 0), np.uint64)
    )
    found = near_pairs_with_crops(hashes, crops, cfg.dedup.max_distance)
    candidates = [(distinct[a]["image_id"], distinct[b]["image_id"], dist) for (a, b), dist in sorted(found.items())]
    candidates = [(min(a, b), max(a, b), dist) for a, b, dist in candidates]
    root = dataset_dir.resolve()
    paths = {r["image_id"]: root / r["path"] for r in distinct}
    corr = verify([(a, b) for a, b, _ in candidates], paths, cfg) if cfg.dedup.verify else {}
    rejected = 0
    for a, b, dist in sorted(candidates):
        c = corr.get((a, b), (None, None))
        if cfg.dedup.verify and not confirmed(c, cfg):
            rejected += 1
            continue
        pairs.append(
            {"a": a, "b": b, "kind": "near", "distance": dist, "correlation": c[0], "centre_correlation": c[1]}
        )
        uf.union(a, b)
    return len(candidates), rejected


def _link(rows: list[dict], uf: UnionFind, cfg: Config) -> None:
    """One lesion's images in one group (``dedup.link_lesions``), and one patient's, where the source says whose
    they are (a patient in two splits leaks their skin, camera and other lesions into the test set)."""
    if cfg.dedup.link_lesions:
        first_of: dict[str, str] = {}
        for r in rows:
            if r["lesion_id"]:
                uf.union(first_of.setdefault(r["lesion_id"], r["image_id"]), r["image_id"])
    first_of_patient: dict[str, str] = {}
    for r in rows:
        if r.get("patient_id"):
            uf.union(first_of_patient.setdefault(r["patient_id"], r["image_id"]), r["image_id"])


def _conflicts(members: dict[str, list[dict]], drop_ids: set[str], dropped: list[dict]) -> list[dict[str, Any]]:
    """Groups holding more than one label. Where the curated rows agree, the feedback rows that disagree go (for
    review; the curated rows, perhaps frozen test images, stay); otherwise every row of the group goes. Returns
    the conflicting groups; the dropped rows are added to ``drop_ids`` and ``dropped``."""
    conflicts = []
    for g, ms in sorted(members.items()):
        labels = sorted({m["label"] for m in ms if m["label"] is not None})
        if len(labels) < 2:
            continue
        curated = {m["label"] for m in ms if m["label"] is not None and not _newcomer(m)}
        conflicts.append({"group_id": g, "labels": labels, "images": sorted(m["image_id"] for m in ms)})
        for m in ms:
            if m["image_id"] in drop_ids:
                continue
            if len(curated) == 1:
                (label,) = curated
                if not _newcomer(m) or m["label"] == label:
                    continue
                detail = (
                    f"confirmed as {m['label']}, but it duplicates {label} images of group {g} "
                    "(curated labels are kept; review the confirmation)"
                )
            else:
                detail = f"group {g} holds labels {', '.join(labels)}"
            drop_ids.add(m["image_id"])
            dropped.append({"image_id": m["image_id"], "reason": "label_conflict", "detail": detail})
    return conflicts


def dedup(validated: str | Path, dataset_dir: str | Path, out_dir: str | Path, cfg: Config) -> DedupResult:
    """De-duplicate a validated manifest; write groups, pairs, dropped rows and a report.

    Args:
        validated: ``validated.parquet`` (needs the ``phash`` column the validate step writes).
        dataset_dir: the dataset folder the manifest's paths are relative to.
        out_dir: where the outputs go.

    Raises:
        DataError: the manifest is missing, lacks ``phash``, or has no rows.
    """
    validated, dataset_dir, out_dir = Path(validated), Path(dataset_dir), Path(out_dir)
    for name in (DEDUPLICATED, PAIRS, DROPPED, REPORT):
        (out_dir / name).unlink(missing_ok=True)
    table = read_step_input(validated, "phash", "validate", "de-duplicate")
    cols = ["image_id", "sha256", "label", "lesion_id", "phash", "path", "boxes"]
    cols += [c for c in ("phash_crops", "source", "patient_id") if c in table.column_names]
    rows = table.select(cols).to_pylist()
    ids = [r["image_id"] for r in rows]
    uf = UnionFind(ids)
    pairs: list[dict[str, Any]] = []
    dropped: list[dict[str, str]] = []
    drop_ids = _exact(rows, uf, pairs, dropped)
    candidates, rejected = _near([r for r in rows if r["image_id"] not in drop_ids], dataset_dir, cfg, uf, pairs)
    _link(rows, uf, cfg)

    group_of = {x: uf.find(x) for x in ids}
    members: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        members[group_of[r["image_id"]]].append(r)
    conflicts = _conflicts(members, drop_ids, dropped)

    keep = [k for k, x in enumerate(ids) if x not in drop_ids]
    out = table.take(keep).append_column("group_id", pa.array([group_of[ids[k]] for k in keep], pa.string()))
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(sorted(pairs, key=lambda p: (p["a"], p["b"])), schema=PAIR_SCHEMA), out_dir / PAIRS
    )
    pq.write_table(pa.Table.from_pylist(dropped, schema=DROP_SCHEMA), out_dir / DROPPED)
    result = DedupResult(
        rows_in=len(rows),
        rows_out=len(keep),
        pairs=pairs,
        dropped=dropped,
        groups=len(members),
        multi_groups=sum(1 for ms in members.values() if len(ms) > 1),
        conflicts=conflicts,
        candidates=candidates,
        rejected_candidates=rejected,
    )
    write_json(
        out_dir / REPORT,
        {
            "rows_in": result.rows_in,
            "rows_out": result.rows_out,
            "exact_pairs": sum(p["kind"] == "exact" for p in pairs),
            "near_pairs": sum(p["kind"] == "near" for p in pairs),
            "near_candidates": result.candidates,
            "near_candidates_rejected_by_verification": rejected,
            "groups": result.groups,
            "groups_with_several_images": result.multi_groups,
            "dropped_by_reason": {
                k: sum(x["reason"] == k for x in dropped) for k in sorted({x["reason"] for x in dropped})
            },
            "label_conflicts": conflicts,
            "dropped": dropped,
            "params": cfg.dedup.model_dump(),
        },
    )
    pq.write_table(out, out_dir / DEDUPLICATED, compression="zstd")
    return result
