"""The data gate: validation, de-duplication and the leakage-free split, on planted faults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from components.data import gate
from components.data.dedup import near_pairs
from components.data.ingest import ingest
from components.data.manifest import MANIFEST, SCHEMA, DataError
from components.data.split import assign, leakage
from components.data.synthetic import Spec, generate
from infra.config import ConfigError, load_config
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A synthetic dataset with many planted faults, validated and de-duplicated."""
    cfg = load_config("test")
    root = tmp_path_factory.mktemp("gate")
    src, ds, prep = root / "raw", root / "ds", root / "prep"
    generate(
        src, Spec.from_config(cfg, seed=7, exact_duplicates=6, near_duplicates=24, corrupt=4, unknown_labels=3, tiny=2)
    )
    ingest("synthetic", src, ds, cfg)
    v = gate.run_validate(ds, prep, cfg)
    d = gate.run_dedup(ds, prep, cfg)
    faults = json.loads((src / "faults.json").read_text())
    return {"cfg": cfg, "ds": ds, "prep": prep, "v": v, "d": d, "faults": faults}


def _of_kind(faults, kind):
    return [f for f in faults if f["kind"] == kind]


def test_every_corrupt_file_is_quarantined_with_its_reason(gated):
    q = {(x["image_id"], x["check"]): x["reason"] for x in gated["v"].quarantine}
    for f in _of_kind(gated["faults"], "corrupt"):
        reason = q[(f["image_id"], "decodes")]
        assert ("truncated" in reason) if f["detail"] == "truncated JPEG" else ("unreadable" in reason)


def test_every_unknown_label_and_tiny_image_is_caught(gated):
    checks = {(x["image_id"], x["check"]) for x in gated["v"].quarantine}
    for f in _of_kind(gated["faults"], "unknown_label"):
        assert (f["image_id"], "label_in_classes") in checks
    for f in _of_kind(gated["faults"], "tiny"):
        assert (f["image_id"], "size_bounds") in checks
    validated = pq.read_table(gated["prep"] / "validate" / "validated.parquet")
    bad = {f["image_id"] for f in gated["faults"] if f["kind"] in ("corrupt", "unknown_label", "tiny")}
    assert not bad & set(validated.column("image_id").to_pylist())
    for col in ("brightness", "contrast", "saturation", "blur", "phash"):
        assert validated.column(col).null_count == 0


def test_duplicates_found_with_few_false_pairs(gated):
    pairs = {frozenset((p["a"], p["b"])): p for p in gated["d"].pairs}
    exact = {frozenset((f["image_id"], f["of"])) for f in _of_kind(gated["faults"], "exact_duplicate")}
    near = {frozenset((f["image_id"], f["of"])) for f in _of_kind(gated["faults"], "near_duplicate")}
    assert exact <= {k for k, p in pairs.items() if p["kind"] == "exact"}  # 100% of exact
    found_near = near & {k for k, p in pairs.items() if p["kind"] == "near"}
    assert len(found_near) / len(near) >= 0.95
    false = set(pairs) - exact - near
    assert len(false) / len(pairs) < 0.01
    for p in gated["d"].pairs:
        assert p["distance"] is not None  # every pair is reported with its distance


def test_exact_duplicate_keeper_is_deterministic_and_the_copy_is_listed(gated):
    dropped = {x["image_id"]: x for x in gated["d"].dropped}
    for f in _of_kind(gated["faults"], "exact_duplicate"):
        keeper, copy = sorted([f["image_id"], f["of"]])
        assert dropped[copy]["reason"] == "exact_duplicate" and keeper in dropped[copy]["detail"]
        assert keeper not in dropped


def test_groups_merge_duplicates_and_lesions(gated):
    rows = pq.read_table(gated["prep"] / "dedup" / "deduplicated.parquet").to_pylist()
    group = {r["image_id"]: r["group_id"] for r in rows}
    for f in _of_kind(gated["faults"], "near_duplicate"):
        assert group[f["image_id"]] == group[f["of"]]
    by_lesion: dict[str, set] = {}
    for r in rows:
        by_lesion.setdefault(r["lesion_id"], set()).add(r["group_id"])
    assert all(len(g) == 1 for g in by_lesion.values())


def test_split_has_zero_leakage_and_is_deterministic(gated, tmp_path):
    cfg = gated["cfg"]
    first = gate.run_split(gated["ds"], gated["prep"], cfg)
    assert first.report["leakage"] == {
        "cross_split_groups": 0,
        "cross_split_lesions": 0,
        "cross_split_duplicate_pairs": 0,
    }
    rows = pq.read_table(gated["prep"] / "dedup" / "deduplicated.parquet").to_pylist()
    again, _ = assign(rows, cfg.split.ratios, cfg.seed)
    assert again == first.assignment
    assert set(first.assignment.values()) == {"train", "val", "test"}


# --- frozen test set --------------------------------------------------------------------------------


def _rows(n_lesions, per_lesion=2, label_cycle=("nv", "nv", "mel", "bkl"), prefix="x"):
    return [
        {
            "image_id": f"{prefix}{i:03d}_{k}",
            "label": label_cycle[i % len(label_cycle)],
            "lesion_id": f"L{prefix}{i}",
            "group_id": f"L{prefix}{i}",
        }
        for i in range(n_lesions)
        for k in range(per_lesion)
    ]


def test_frozen_test_set_never_changes_and_new_rows_never_enter_it():
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    old = _rows(60)
    first, held = assign(old, ratios, seed=1)
    assert not held
    test_rows = {k for k, v in first.items() if v == "test"}
    a_test_group = old[[r["image_id"] for r in old].index(sorted(test_rows)[0])]["group_id"]
    new = _rows(20, prefix="n") + [
        {"image_id": "dup_of_test", "label": "nv", "lesion_id": "new", "group_id": a_test_group}
    ]
    second, held = assign(old + new, ratios, seed=1, prior=first)
    assert {k for k, v in second.items() if v == "test"} == test_rows  # nothing left, nothing joined
    assert all(second[k] == v for k, v in first.items())  # earlier rows keep their split
    assert [h["image_id"] for h in held] == ["dup_of_test"]
    assert "frozen test group" in held[0]["reason"]
    assert {second[r["image_id"]] for r in new if r["image_id"] != "dup_of_test"} <= {"train", "val"}


def test_a_new_sources_own_test_split_joins_the_frozen_test_set_and_nothing_else_does():
    """A second clinic's frozen test lesions (rows its ingest marks ``test``) join the test set; the clinic's other
    rows, and a marked row whose group already has earlier rows, do not."""
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    old = _rows(60)
    first, _ = assign(old, ratios, seed=1)
    clinic_test = [{**r, "split": "test"} for r in _rows(10, prefix="b")]
    incoming = _rows(20, prefix="c")
    a_train_group = next(r for r in old if first[r["image_id"]] == "train")["group_id"]
    sneaky = {"image_id": "marked_test_in_train_group", "label": "nv", "group_id": a_train_group, "split": "test"}
    second, held = assign(old + clinic_test + incoming + [sneaky], ratios, seed=1, prior=first)
    old_test = {k for k, v in first.items() if v == "test"}
    assert {k for k, v in second.items() if v == "test"} == old_test | {r["image_id"] for r in clinic_test}
    assert {second[r["image_id"]] for r in incoming} <= {"train", "val"}
    assert second["marked_test_in_train_group"] == "train" and not held


def test_split_persists_across_runs_through_the_output(gated):
    cfg = gated["cfg"]
    first = gate.run_split(gated["ds"], gated["prep"], cfg).assignment
    second = gate.run_split(gated["ds"], gated["prep"], cfg)
    assert second.report["frozen_test"] is True and second.assignment == first


# --- bad input ------------------------------------------------------------------------------------


def _write_manifest(tmp_path, rows):
    from components.data.manifest import Row, write_manifest

    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    write_manifest(ds, [Row(**r) for r in rows])
    return ds


def _img(ds, name, mode="RGB", size=(64, 48), fmt="PNG", **kw):
    import hashlib

    seed = int(hashlib.md5(name.encode()).hexdigest()[:8], 16)  # distinct pixels per name
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    img = img.convert(mode) if mode not in ("I;16",) else Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    path = ds / "images" / name
    img.save(path, fmt, **kw)
    return {
        "image_id": Path(name).stem,
        "path": f"images/{name}",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "width": size[0],
        "height": size[1],
        "label": "nv",
        "lesion_id": Path(name).stem,
        "source": "test",
        "boxes": [],
    }


def test_id_collision_stops_validation_naming_the_check_and_row(tmp_path, cfg):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    a = _img(ds, "a.png")
    pq.write_table(pa.Table.from_pylist([{**a, "split": None}] * 2, schema=SCHEMA), ds / MANIFEST)
    with pytest.raises(DataError, match=r"image_id_unique.*2 rows: a, a"):
        gate.run_validate(ds, tmp_path / "prep", cfg)
    assert not (tmp_path / "prep" / "validate" / "validated.parquet").exists()
    assert json.loads((tmp_path / "prep" / "validate" / "validate_summary.json").read_text())["status"] == "failed"


def test_missing_columns_and_empty_dataset_are_clear(tmp_path, cfg):
    ds = tmp_path / "ds"
    ds.mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "path": ["a.png"]}), ds / MANIFEST)
    with pytest.raises(DataError, match="missing required column.*sha256"):
        gate.run_validate(ds, tmp_path / "p1", cfg)
    empty = _write_manifest(tmp_path / "e", [])
    with pytest.raises(DataError, match="is empty"):
        gate.run_validate(empty, tmp_path / "p2", cfg)


def test_every_row_failing_is_an_error_with_the_quarantine_kept(tmp_path, cfg):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    rows = [_img(ds, f"{i}.png") for i in range(3)]
    for r in rows:
        (ds / r["path"]).write_bytes(b"broken")
    from components.data.manifest import Row, write_manifest

    write_manifest(ds, [Row(**r) for r in rows])
    with pytest.raises(DataError, match="every one of the 3 rows failed"):
        gate.run_validate(ds, tmp_path / "prep", cfg)
    assert not (tmp_path / "prep" / "validate" / "validated.parquet").exists()
    q = pq.read_table(tmp_path / "prep" / "validate" / "quarantine.parquet").to_pylist()
    assert {x["check"] for x in q} >= {"decodes", "file_unchanged"}


def test_image_modes_are_converted_and_blank_images_quarantined(tmp_path, cfg):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    rows = [
        _img(ds, "cmyk.jpg", mode="CMYK", fmt="JPEG"),
        _img(ds, "rgba.png", mode="RGBA"),
        _img(ds, "palette.gif", mode="P", fmt="GIF"),
        _img(ds, "gray16.png", mode="I;16"),
        _img(ds, "gray.png", mode="L"),
    ]
    Image.new("RGB", (64, 48), (120, 90, 80)).save(ds / "images" / "blank.png")
    import hashlib

    rows.append(
        {
            **rows[-1],
            "image_id": "blank",
            "path": "images/blank.png",
            "lesion_id": "blank",
            "sha256": hashlib.sha256((ds / "images" / "blank.png").read_bytes()).hexdigest(),
        }
    )
    from components.data.manifest import Row, write_manifest

    write_manifest(ds, [Row(**r) for r in rows])
    result = gate.run_validate(ds, tmp_path / "prep", cfg)
    validated = pq.read_table(tmp_path / "prep" / "validate" / "validated.parquet").to_pylist()
    modes = {r["image_id"]: r["original_mode"] for r in validated}
    assert modes == {"cmyk": "CMYK", "rgba": "RGBA", "palette": "P", "gray16": "I;16", "gray": "L"}
    assert [(q["image_id"], q["check"]) for q in result.quarantine] == [("blank", "not_blank")]


def test_verification_decodes_large_photos_smaller_and_correlates_as_at_full_size(tmp_path):
    """The near-duplicate verification decodes a photo at the smallest of 1/2, 1/4, 1/8 whose shorter side stays
    >= 200 px (JPEG: scaled in its DCT); its thumbnails correlate with the full-size ones, small images are whole."""
    from components.data.dedup import VERIFY_MIN_SIDE
    from components.data.images import decode, thumbnails

    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((4000, 3000), Image.BICUBIC)
    sizes = {}
    for name, size, fmt in [
        ("big.jpg", (4000, 3000), "JPEG"),
        ("mid.jpg", (600, 450), "JPEG"),
        ("mid.png", (600, 450), "PNG"),
        ("ham.jpg", (200, 150), "JPEG"),
        ("derma.png", (28, 28), "PNG"),
    ]:
        base.resize(size).save(tmp_path / name, format=fmt)
        sizes[name] = decode(tmp_path / name, min_side=VERIFY_MIN_SIDE).rgb.size
    assert sizes == {
        "big.jpg": (500, 375),
        "mid.jpg": (300, 225),
        "mid.png": (300, 225),
        "ham.jpg": (200, 150),
        "derma.png": (28, 28),
    }
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the shrunk decode is turned upright too
    base.resize((600, 450)).save(rotated, exif=exif)
    assert decode(rotated, min_side=VERIFY_MIN_SIDE).rgb.size == (225, 300)
    for name in ("big.jpg", "mid.jpg"):
        full = thumbnails(decode(tmp_path / name).rgb)
        small = thumbnails(decode(tmp_path / name, min_side=VERIFY_MIN_SIDE).rgb)
        assert float(np.diag(full @ small.T).min()) > 0.999


def test_a_duplicate_group_with_two_labels_is_a_label_conflict(tmp_path, cfg):
    import shutil

    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    a = _img(ds, "a.png")
    shutil.copy(ds / "images" / "a.png", ds / "images" / "b.png")
    b = {**a, "image_id": "b", "path": "images/b.png", "lesion_id": "b", "label": "mel"}
    others = [_img(ds, f"o{i}.png") for i in range(3)]
    from components.data.manifest import Row, write_manifest

    write_manifest(ds, [Row(**r) for r in [a, b, *others]])
    gate.run_validate(ds, tmp_path / "prep", cfg)
    result = gate.run_dedup(ds, tmp_path / "prep", cfg)
    assert [c["labels"] for c in result.conflicts] == [["mel", "nv"]]
    dropped = {d["image_id"]: d["reason"] for d in result.dropped}
    assert dropped["a"] == "label_conflict"  # the kept copy goes too: which label is right is unknown
    kept = pq.read_table(tmp_path / "prep" / "dedup" / "deduplicated.parquet").column("image_id").to_pylist()
    assert "a" not in kept and "b" not in kept and len(kept) == 3


def test_ratios_must_sum_to_one(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["default"]["split"]["ratios"] = {"train": 0.8, "val": 0.15, "test": 0.15}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="split.ratios must sum to 1, they sum to 1.1"):
        load_config("demo", p)


def test_a_class_with_too_few_groups_is_named():
    rows = _rows(30, label_cycle=("nv",)) + _rows(2, label_cycle=("df",), prefix="d")
    with pytest.raises(DataError, match="class 'df' has 2 group"):
        assign(rows, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)


def test_dedup_needs_the_validated_manifest(tmp_path, cfg):
    with pytest.raises(DataError, match="run `drspot validate` first"):
        gate.run_dedup(tmp_path, tmp_path / "prep", cfg)


# --- the search itself -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_distance", [0, 3, 8, 10])
def test_near_pair_search_equals_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    h = rng.integers(0, 2**64 - 1, 3000, dtype=np.uint64, endpoint=True)
    flips = rng.integers(0, 2**64 - 1, 300, dtype=np.uint64, endpoint=True)
    h[:300] = h[300:600] ^ (flips & rng.integers(0, 2**64 - 1, 300, dtype=np.uint64, endpoint=True))  # close pairs
    i, j, d = near_pairs(h, max_distance, block=1000)  # small blocks exercise the chunking
    full = np.bitwise_count(h[:, None] ^ h[None, :])
    bi, bj = np.nonzero(np.triu(full <= max_distance, 1))
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == sorted(zip(bi.tolist(), bj.tolist(), strict=True))
    assert (d == full[i, j]).all()


def test_leakage_counts():
    rows = [{"image_id": "a", "group_id": "g", "lesion_id": "L"}, {"image_id": "b", "group_id": "g", "lesion_id": "L"}]
    assert leakage(rows, {"a": "train", "b": "test"}, [("a", "b")]) == {
        "cross_split_groups": 1,
        "cross_split_lesions": 1,
        "cross_split_duplicate_pairs": 1,
    }


def test_cli_steps_write_their_outputs(drspot_cli, tmp_path, synthetic_source, cfg):
    ds = tmp_path / "ds"
    ingest("synthetic", synthetic_source, ds, cfg)
    prep = tmp_path / "prep"
    for step in ("validate", "dedup", "split"):
        out = drspot_cli("--profile", "test", step, str(ds), "--prepared", str(prep))
        assert out.returncode == 0, out.stderr
    assert "leakage {'cross_split_duplicate_pairs': 0, 'cross_split_groups': 0, 'cross_split_lesions': 0}" in out.stdout
    assert (prep / "validate" / "validate_report.html").is_file()
    report = json.loads((prep / "split" / "split_report.json").read_text())
    split_rows = pq.read_table(prep / "split" / "split.parquet").to_pylist()
    assert len(split_rows) == report["rows_assigned"] == sum(report["rows_per_split"].values())
    assert {r["split"] for r in split_rows} == {"train", "val", "test"}


def test_a_patients_images_form_one_group_across_lesions(tmp_path):
    """A source with a patient id: two lesions of one patient share a group, so no split can divide them."""
    import csv

    cfg = load_config("test")
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    rows = [("L1", "ISIC_0000001", "P1"), ("L2", "ISIC_0000002", "P1"), ("L3", "ISIC_0000003", "P2")]
    with open(src / "HAM10000_metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["lesion_id", "image_id", "dx", "patient_id"])
        for i, (lesion, image, patient) in enumerate(rows):
            w.writerow([lesion, image, "nv", patient])
            rng = np.random.default_rng(i)  # unrelated images: no duplicate links
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(src / "images" / f"{image}.jpg")
    ingest("ham10000", src / "HAM10000_metadata.csv", tmp_path / "ds", cfg)
    gate.run_validate(tmp_path / "ds", tmp_path / "prep", cfg)
    gate.run_dedup(tmp_path / "ds", tmp_path / "prep", cfg)
    out = pq.read_table(gate.step_dirs(tmp_path / "prep")["dedup"] / "deduplicated.parquet").to_pylist()
    group = {r["image_id"]: r["group_id"] for r in out}
    assert {r["image_id"]: r["patient_id"] for r in out}["ISIC_0000002"] == "P1"
    assert group["ISIC_0000001"] == group["ISIC_0000002"] != group["ISIC_0000003"]
