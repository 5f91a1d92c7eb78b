"""Every ingest adapter on a small fixture, the manifest contract, and bad input."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data.ingest import IngestError, ingest
from components.data.manifest import MANIFEST, SCHEMA, probe_image, read_manifest


def _jpeg(path, size=(40, 30), colour=(180, 120, 90), exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    kw = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    img.save(path, "JPEG", **kw)
    return path


def _manifest(out):
    return read_manifest(out).to_pylist()


def _report(out):
    return json.loads((out / "ingest_report.json").read_text())


# --- synthetic -----------------------------------------------------------------------------------


def test_synthetic_rows_follow_the_contract(tmp_path, cfg, synthetic_source):
    out = tmp_path / "ds"
    result = ingest("synthetic", synthetic_source, out, cfg)
    rows = _manifest(out)
    n_source = sum(1 for _ in open(synthetic_source / "labels.csv")) - 1
    assert result.rows == len(rows) == n_source  # nothing lost: bad rows are kept for the gate
    assert pq.read_schema(out / MANIFEST).names == SCHEMA.names
    for r in rows:
        data = (out / r["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        assert r["path"].endswith(".jpg")  # the source's own extension (the files are JPEGs)
        assert r["source"] == "synthetic" and r["lesion_id"] and r["split"] is None
    faults = json.loads((synthetic_source / "faults.json").read_text())
    unknown = {f["image_id"] for f in faults if f["kind"] == "unknown_label"}
    reported = {p.row for p in result.problems if p.check == "label_unknown"}
    assert reported == unknown
    garbage = {f["image_id"] for f in faults if f["detail"] == "random bytes"}
    undecodable = {p.row for p in result.problems if p.check == "image_undecodable"}
    assert garbage <= undecodable
    assert all(r["width"] is None for r in rows if r["image_id"] in garbage)
    assert all(len(r["boxes"]) == 1 for r in rows if r["image_id"] not in {f["image_id"] for f in faults})


def test_reingest_gives_a_byte_identical_manifest(tmp_path, cfg, synthetic_source):
    a, b = tmp_path / "a", tmp_path / "b"
    ingest("synthetic", synthetic_source, a, cfg)
    ingest("synthetic", synthetic_source, b, cfg)
    assert (a / MANIFEST).read_bytes() == (b / MANIFEST).read_bytes()
    ingest("synthetic", synthetic_source, a, cfg)  # again into the same folder
    assert (a / MANIFEST).read_bytes() == (b / MANIFEST).read_bytes()
    assert (a / "ingest_report.json").read_bytes() == (b / "ingest_report.json").read_bytes()


def test_manifest_is_written_in_row_groups_as_rows_arrive(tmp_path, cfg, synthetic_source):
    small = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"row_group_size": 8})})
    out = tmp_path / "ds"
    result = ingest("synthetic", synthetic_source, out, small)
    assert pq.ParquetFile(out / MANIFEST).num_row_groups == -(-result.rows // 8)


def test_append_keeps_existing_rows_and_reports_id_collisions(tmp_path, cfg, synthetic_source):
    folder = tmp_path / "folder"
    _jpeg(folder / "nv" / "a.jpg")
    out = tmp_path / "ds"
    first = ingest("synthetic", synthetic_source, out, cfg)
    second = ingest("imagefolder", folder, out, cfg, append=True)
    assert second.rows == first.rows + 1
    third = ingest("imagefolder", folder, out, cfg, append=True)
    assert third.rows == second.rows
    assert [p.check for p in third.problems] == ["duplicate_image_id"]


# --- ham10000 ------------------------------------------------------------------------------------


HAM_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def _ham(tmp_path, rows):
    src = tmp_path / "ham"
    src.mkdir()
    csv_path = src / "HAM10000_metadata.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HAM_HEADER)
        w.writerows(rows)
    return csv_path


def test_ham10000_keeps_metadata_and_reports_missing_images(tmp_path, cfg):
    csv_path = _ham(
        tmp_path,
        [
            ["HAM_1", "ISIC_0000001", "mel", "histo", "55.0", "male", "back"],
            ["HAM_1", "ISIC_0000002", "mel", "histo", "55.0", "male", "back"],
            ["HAM_2", "ISIC_0000003", "nv", "follow_up", "", "unknown", "face"],
        ],
    )
    _jpeg(csv_path.parent / "images" / "ISIC_0000001.jpg")
    _jpeg(csv_path.parent / "extra" / "ISIC_0000003.jpg", size=(60, 45))
    out = tmp_path / "ds"
    result = ingest("ham10000", csv_path, out, cfg, images=[csv_path.parent / "images", csv_path.parent / "extra"])
    rows = {r["image_id"]: r for r in _manifest(out)}
    assert set(rows) == {"ISIC_0000001", "ISIC_0000003"}
    assert result.missing_images == ["ISIC_0000002"]
    assert rows["ISIC_0000001"]["lesion_id"] == "HAM_1" and rows["ISIC_0000001"]["age"] == 55.0
    assert rows["ISIC_0000003"]["age"] is None and rows["ISIC_0000003"]["localization"] == "face"
    assert (rows["ISIC_0000003"]["width"], rows["ISIC_0000003"]["height"]) == (60, 45)
    assert _report(out)["missing_images"] == ["ISIC_0000002"]


def test_ham10000_boxes_file_bad_rows_are_reported_one_by_one_and_good_rows_kept(tmp_path, cfg):
    csv_path = _ham(
        tmp_path,
        [
            ["HAM_1", "ISIC_0000001", "mel", "histo", "55.0", "male", "back"],
            ["HAM_2", "ISIC_0000002", "nv", "histo", "40.0", "female", "face"],
            ["HAM_3", "ISIC_0000003", "bcc", "histo", "70.0", "male", "scalp"],
        ],
    )
    for i in (1, 2, 3):
        _jpeg(csv_path.parent / "images" / f"ISIC_000000{i}.jpg")
    boxes = tmp_path / "lesion_boxes.csv"
    boxes.write_text(
        "image_id,x_min,y_min,x_max,y_max\n"
        "ISIC_0000001,0.1,0.2,0.8,0.9\n"
        "ISIC_0000001,0.1,0.2,0.8,0.9\n"  # listed twice
        "ISIC_0000002,0.5,0.2,1.4,0.9\n"  # outside the image
        "ISIC_0000003,0.2,abc,0.6,0.7\n"  # unreadable
        "ISIC_0009999,0.1,0.1,0.5,0.5\n"  # an image the metadata does not list
    )
    out = tmp_path / "ds"
    result = ingest("ham10000", csv_path, out, cfg, boxes=boxes)
    rows = {r["image_id"]: r for r in _manifest(out)}
    assert set(rows) == {"ISIC_0000001", "ISIC_0000002", "ISIC_0000003"}  # every good row kept
    assert rows["ISIC_0000001"]["boxes"] == [[0.1, 0.2, 0.8, 0.9]]
    assert rows["ISIC_0000002"]["boxes"] == [] and rows["ISIC_0000003"]["boxes"] == []
    assert rows["ISIC_0000001"]["sex"] == "male" and rows["ISIC_0000003"]["localization"] == "scalp"
    by = {p.check: p for p in result.problems}
    assert result.problem_counts() == {
        "box_duplicate": 1,
        "box_outside_image": 1,
        "box_unknown_image": 1,
        "box_unreadable": 1,
    }
    assert by["box_duplicate"].detail.startswith("lesion_boxes.csv line 3")
    assert by["box_outside_image"].row == "ISIC_0000002" and "line 4" in by["box_outside_image"].detail
    assert by["box_unreadable"].row == "ISIC_0000003" and "'y_min': 'abc'" in by["box_unreadable"].detail
    assert by["box_unknown_image"].row == "ISIC_0009999"
    missing = tmp_path / "no_box_column.csv"
    missing.write_text("image_id,x_min,y_min,x_max\nISIC_0000001,0.1,0.2,0.8\n")
    with pytest.raises(IngestError, match="missing column.*y_max"):
        ingest("ham10000", csv_path, tmp_path / "ds2", cfg, boxes=missing)


def test_ham10000_missing_column_names_it(tmp_path, cfg):
    src = tmp_path / "bad.csv"
    src.write_text("lesion_id,image,dx\nHAM_1,ISIC_1,mel\n")
    (tmp_path / "images").mkdir()
    with pytest.raises(IngestError, match="missing column.*image_id"):
        ingest("ham10000", src, tmp_path / "ds", cfg)
    assert not (tmp_path / "ds" / MANIFEST).exists()


def test_unreadable_csv_is_a_clear_error(tmp_path, cfg):
    src = tmp_path / "bin.csv"
    src.write_bytes(b"\xff\xfe\x00\x81garbage\x00\x9c" * 50)
    (tmp_path / "images").mkdir()
    with pytest.raises(IngestError, match="bin.csv"):
        ingest("ham10000", src, tmp_path / "ds", cfg)


def test_exif_orientation_swaps_width_and_height(tmp_path):
    path = _jpeg(tmp_path / "rot.jpg", size=(40, 20), exif_orientation=6)
    assert probe_image(path) == (20, 40)


# --- isic ----------------------------------------------------------------------------------------


def test_isic_one_hot_with_aliases_and_bad_rows(tmp_path, cfg):
    src = tmp_path / "isic"
    (src / "images").mkdir(parents=True)
    (src / "gt.csv").write_text(
        "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC\n"
        "ISIC_1,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_2,0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0\n"
        "ISIC_3,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n"
        "ISIC_4,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
    )
    (src / "lesions.csv").write_text("image,lesion_id\nISIC_1,L1\nISIC_2,L1\n")
    for i in (1, 2, 3, 4):
        _jpeg(src / "images" / f"ISIC_{i}.jpg")
    out = tmp_path / "ds"
    result = ingest("isic", src / "gt.csv", out, cfg, lesion_csv=src / "lesions.csv")
    rows = {r["image_id"]: r for r in _manifest(out)}
    assert rows["ISIC_1"]["label"] == "mel" and rows["ISIC_1"]["lesion_id"] == "L1"
    assert rows["ISIC_2"]["label"] == "akiec"  # AK is an alias
    assert rows["ISIC_3"]["label"] == "SCC"  # kept, reported, for the gate to quarantine
    assert rows["ISIC_3"]["lesion_id"] == "ISIC_3"
    assert "ISIC_4" not in rows
    checks = {(p.row, p.check) for p in result.problems}
    assert ("ISIC_3", "label_unknown") in checks and ("ISIC_4", "label_unreadable") in checks


# --- medmnist ------------------------------------------------------------------------------------


def test_medmnist_writes_pngs_and_keeps_the_official_split(tmp_path, cfg):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 7).reshape(-1, 1).astype(np.uint8)
    npz = tmp_path / "dermamnist.npz"
    np.savez(npz, **arrays)
    out = tmp_path / "ds"
    ingest("medmnist", npz, out, cfg)
    rows = _manifest(out)
    assert [r["split"] for r in rows].count("train") == 5 and [r["split"] for r in rows].count("test") == 3
    first = next(r for r in rows if r["image_id"] == "dermamnist_train_00001")
    assert first["label"] == cfg.classes.names[1]
    png = np.asarray(Image.open(out / first["path"]))
    assert (png == arrays["train_images"][1]).all()  # lossless


def test_medmnist_missing_key_is_a_clear_error(tmp_path, cfg):
    npz = tmp_path / "x.npz"
    np.savez(npz, train_images=np.zeros((1, 28, 28, 3), np.uint8))
    with pytest.raises(IngestError, match="train_images but no train_labels"):
        ingest("medmnist", npz, tmp_path / "ds", cfg)


# --- yolo ----------------------------------------------------------------------------------------


def _yolo(tmp_path):
    src = tmp_path / "yolo"
    src.mkdir()
    (src / "data.yaml").write_text("path: .\ntrain: train/images\nval: valid/images\nnames: ['AKIEC', 'MEL', 'NV']\n")
    _jpeg(src / "train/images/ISIC_0024306_jpg.rf.abc.jpg")
    (src / "train/labels").mkdir(parents=True)
    (src / "train/labels/ISIC_0024306_jpg.rf.abc.txt").write_text(
        "1 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n1 0.6 0.6 0.8 0.6 0.8 0.9\n"
    )
    _jpeg(src / "valid/images/other.jpg")
    (src / "valid/labels").mkdir(parents=True)
    (src / "valid/labels/other.txt").write_text("2 0.5 0.5 0.2 0.4\n9 0.5 0.5 0.1 0.1\n")
    return src


def test_yolo_polygons_become_boxes_and_classes_are_mapped(tmp_path, cfg):
    src = _yolo(tmp_path)
    out = tmp_path / "ds"
    result = ingest("yolo", src, out, cfg, class_map={"AKIEC": "akiec", "MEL": "mel", "NV": "nv"})
    rows = {r["image_id"]: r for r in _manifest(out)}
    isic = rows["ISIC_0024306"]
    assert isic["label"] == "mel" and isic["split"] == "train"
    assert isic["boxes"] == [[0.1, 0.2, 0.5, 0.6], [0.6, 0.6, 0.8, 0.9]]
    other = rows["other"]
    assert other["split"] == "val" and other["label"] == "nv"
    assert other["boxes"] == [pytest.approx([0.4, 0.3, 0.6, 0.7])]
    assert any(p.check == "yolo_label_line" and "class id 9" in p.detail for p in result.problems)


def test_yolo_joins_ham_metadata_and_prefers_its_label(tmp_path, cfg):
    src = _yolo(tmp_path)
    meta = tmp_path / "meta.csv"
    meta.write_text(",".join(HAM_HEADER) + "\nHAM_0000001,ISIC_0024306,nv,histo,40.0,female,back\n")
    out = tmp_path / "ds"
    result = ingest("yolo", src, out, cfg, ham_metadata=meta)
    isic = {r["image_id"]: r for r in _manifest(out)}["ISIC_0024306"]
    assert isic["lesion_id"] == "HAM_0000001" and isic["sex"] == "female"
    assert isic["label"] == "nv"
    assert any(p.check == "label_disagreement" and "metadata says nv" in p.detail for p in result.problems)


# --- imagefolder and path safety -----------------------------------------------------------------


def test_imagefolder_labels_from_folders_and_skips_non_images(tmp_path, cfg):
    src = tmp_path / "folder"
    _jpeg(src / "mel" / "a.jpg")
    _jpeg(src / "NV" / "b.png")
    (src / "NV" / "notes.txt").write_text("not an image")
    out = tmp_path / "ds"
    result = ingest("imagefolder", src, out, cfg)
    assert {r["image_id"]: r["label"] for r in _manifest(out)} == {"mel_a": "mel", "NV_b": "nv"}
    assert [(p.row, p.check) for p in result.problems] == [("NV/notes.txt", "not_an_image_file")]


def test_a_path_escaping_the_source_is_refused_and_good_rows_kept(tmp_path, cfg):
    src = tmp_path / "folder"
    _jpeg(src / "mel" / "good.jpg")
    secret = _jpeg(tmp_path / "outside" / "secret.jpg")
    os.symlink(secret, src / "mel" / "link.jpg")
    out = tmp_path / "ds"
    result = ingest("imagefolder", src, out, cfg)
    assert [r["image_id"] for r in _manifest(out)] == ["mel_good"]
    assert [(p.row, p.check) for p in result.problems] == [("mel_link", "path_escapes_source")]


def test_undecodable_image_is_kept_and_reported(tmp_path, cfg):
    src = tmp_path / "folder"
    _jpeg(src / "nv" / "ok.jpg")
    (src / "nv" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, "JPEG")
    out = tmp_path / "ds"
    result = ingest("imagefolder", src, out, cfg)
    rows = {r["image_id"]: r for r in _manifest(out)}
    assert rows["nv_broken"]["width"] is None and rows["nv_ok"]["width"] == 40
    assert [p.check for p in result.problems] == ["image_undecodable"]


def test_unknown_kind_and_missing_source(tmp_path, cfg):
    with pytest.raises(IngestError, match="unknown source kind 'dicom'"):
        ingest("dicom", tmp_path, tmp_path / "ds", cfg)
    with pytest.raises(IngestError, match="source not found"):
        ingest("ham10000", tmp_path / "nope.csv", tmp_path / "ds", cfg)


def test_cli_ingest_error_exits_1_with_message(drspot_cli, tmp_path):
    out = drspot_cli("ingest", "ham10000", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "ds"))
    assert out.returncode == 1
    assert "source not found" in out.stderr and "nope.csv" in out.stderr
