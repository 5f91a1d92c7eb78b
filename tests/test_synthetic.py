"""The synthetic generator: deterministic, class-structured, with true boxes and listed faults."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from components.data.synthetic import Spec, allocate_classes, generate


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _rows(folder):
    return list(csv.DictReader(open(folder / "labels.csv")))


def test_same_spec_gives_the_same_bytes(tmp_path, cfg, synthetic_source):
    again = tmp_path / "again"
    generate(again, Spec.from_config(cfg))
    assert _digest(again) == _digest(synthetic_source)
    other = tmp_path / "other"
    generate(other, Spec.from_config(cfg, seed=cfg.seed + 1))
    assert _digest(other) != _digest(synthetic_source)


def test_regenerating_an_existing_set_is_skipped(synthetic_source, cfg):
    assert generate(synthetic_source, Spec.from_config(cfg))["skipped"] is True


def test_refuses_to_overwrite_a_folder_it_did_not_make(tmp_path, cfg):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(tmp_path, Spec.from_config(cfg))
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_classes_are_imbalanced_like_ham_with_a_floor(cfg, synthetic_source):
    lesions = {}
    for r in _rows(synthetic_source):
        lesions.setdefault(r["lesion_id"], r["label"])
    counts = Counter(v for k, v in lesions.items() if k.startswith("lesion_42_"))
    assert counts.most_common(1)[0][0] == "nv"
    assert all(counts[c] >= cfg.synthetic.min_lesions_per_class for c in cfg.classes.names)


def test_allocation_sums_and_respects_the_floor():
    labels = allocate_classes({"nv": 0.9, "mel": 0.05, "df": 0.05}, 30, 4)
    c = Counter(labels)
    assert len(labels) == 30 and c["mel"] == 4 and c["df"] == 4 and c["nv"] == 22


def test_several_images_per_lesion(synthetic_source):
    per_lesion = Counter(r["lesion_id"] for r in _rows(synthetic_source))
    assert max(per_lesion.values()) >= 2


def _clean_rows(folder):
    faults = {f["image_id"] for f in json.loads((folder / "faults.json").read_text())}
    return [r for r in _rows(folder) if r["image_id"] not in faults]


def test_box_contains_the_lesion(synthetic_source):
    distinct = 0
    rows = _clean_rows(synthetic_source)
    for r in rows:
        (box,) = json.loads(r["boxes"])
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        img = np.asarray(Image.open(synthetic_source / r["file"]).convert("RGB"), float)
        h, w, _ = img.shape
        x0, y0, x1, y1 = int(box[0] * w), int(box[1] * h), int(np.ceil(box[2] * w)), int(np.ceil(box[3] * h))
        bw, bh = x1 - x0, y1 - y0
        centre = img[y0 + bh // 3 : y1 - bh // 3 or None, x0 + bw // 3 : x1 - bw // 3 or None].reshape(-1, 3).mean(0)
        outside = np.ones((h, w), bool)
        outside[y0:y1, x0:x1] = False
        lit = img.mean(2) > 0.6 * np.median(img.mean(2))  # leave out the dermatoscope's dark ring
        skin = img[outside & lit].mean(0)
        distinct += np.abs(centre - skin).max() > 12
    # the lesion at the box's centre looks different from the skin outside the box
    assert distinct / len(rows) > 0.95


def test_faults_are_planted_and_listed(cfg, synthetic_source):
    faults = json.loads((synthetic_source / "faults.json").read_text())
    rows = {r["image_id"]: r for r in _rows(synthetic_source)}
    kinds = Counter(f["kind"] for f in faults)
    f = cfg.synthetic.faults
    assert kinds == {
        "exact_duplicate": f.exact_duplicates,
        "near_duplicate": f.near_duplicates,
        "corrupt": f.corrupt,
        "unknown_label": f.unknown_labels,
        "tiny": f.tiny,
    }
    for fault in faults:
        path = synthetic_source / rows[fault["image_id"]]["file"]
        if fault["kind"] == "exact_duplicate":
            assert path.read_bytes() == (synthetic_source / rows[fault["of"]]["file"]).read_bytes()
            assert rows[fault["image_id"]]["lesion_id"] != rows[fault["of"]]["lesion_id"]
        elif fault["kind"] == "near_duplicate":
            assert path.read_bytes() != (synthetic_source / rows[fault["of"]]["file"]).read_bytes()
        elif fault["kind"] == "corrupt":
            try:
                Image.open(path).load()
                decoded = True
            except Exception:
                decoded = False
            assert not decoded, fault
        elif fault["kind"] == "unknown_label":
            assert rows[fault["image_id"]]["label"] not in cfg.classes.names
        elif fault["kind"] == "tiny":
            assert max(Image.open(path).size) < 16


def test_shifted_variant_changes_colour_and_sharpness(tmp_path, cfg, synthetic_source):
    shifted = tmp_path / "shifted"
    generate(shifted, Spec.from_config(cfg, shifted=True, **dict.fromkeys(cfg.synthetic.faults.model_dump(), 0)))

    def stats(folder):
        means, sharp = [], []
        for r in _clean_rows(folder)[:20]:
            a = np.asarray(Image.open(folder / r["file"]).convert("RGB"), float)
            means.append(a.mean((0, 1)))
            sharp.append(np.abs(np.diff(a.mean(2), axis=1)).mean())
        return np.mean(means, 0), np.mean(sharp)

    (m0, s0), (m1, s1) = stats(synthetic_source), stats(shifted)
    assert m1[0] / m1[2] > m0[0] / m0[2] * 1.15  # warmer colour cast
    assert m1.mean() > m0.mean() * 1.05  # brighter exposure
    assert s1 < s0 * 0.85  # blurrier
