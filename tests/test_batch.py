"""`drspot predict`: offline batch scoring with the champions, as the service scores, resumable, Excel-ready."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serving_fixtures import drspot

pytestmark = pytest.mark.slow


def _photos(deployed, folder: Path, n: int) -> Path:
    """``n`` of the deployed test set's photos in two sub-folders, a corrupt .jpg, a tiny photo and a text file."""
    src = sorted((deployed["root"] / "ds" / "images").glob("*.jpg"))
    good = []
    for p in src:
        try:
            Image.open(p).verify()
        except Exception:  # the synthetic set's planted corrupt files
            continue
        good.append(p)
        if len(good) == n:
            break
    for k, p in enumerate(good):
        (folder / f"visit{k % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / f"visit{k % 2}" / p.name)
    (folder / "corrupt.jpg").write_bytes(b"this is not a photo")
    Image.new("RGB", (8, 8), (120, 80, 60)).save(folder / "tiny.png")
    (folder / "notes.txt").write_text("not a photo, not listed")
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8-sig"))))


def test_a_folder_is_scored_as_the_service_scores_it(deployed, server, tmp_path):
    folder = _photos(deployed, tmp_path / "photos", 4)
    out = tmp_path / "out" / "scores.csv"
    r = drspot("predict", str(folder), "--out", str(out), "--batch", "2", "--language", "vi", env=deployed["env"])
    assert r.returncode == 0, r.stderr[-3000:]
    v = deployed["versions"]
    assert f"scored 6 photos with drspot-classifier/{v['classifier']} + drspot-detector/{v['detector']}" in r.stdout
    assert "2 not scored" in r.stdout and f"wrote {out}" in r.stdout
    assert "predict: 6/6 photos (100%)" in r.stderr
    data = out.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf")  # Excel reads UTF-8 only with the byte-order mark
    rows = _rows(out)
    errors = {row["source"]: row["error"] for row in rows if row["error"]}
    assert errors["corrupt.jpg"].startswith("not an image: the file is not a recognisable image")
    assert errors["tiny.png"].startswith("image too small")
    assert not any(row["source"] == "notes.txt" for row in rows)
    scored = [row for row in rows if not row["error"]]
    assert {row["source"].split("/")[0] for row in scored} == {"visit0", "visit1"}
    # the service's answer for the same photo: the same lesions, classes and probabilities
    for source in sorted({row["source"] for row in scored}):
        mine = [row for row in scored if row["source"] == source]
        upload = {"image": ("x.jpg", (folder / source).read_bytes(), "image/jpeg")}
        answer = httpx.post(f"{server.url}/predict", files=upload, timeout=60).json()
        assert len(mine) == len(answer["lesions"]), source
        for row, lesion in zip(mine, answer["lesions"], strict=True):
            assert row["label"] == lesion["label"] and row["risk"] == lesion["risk"]
            for c, p in lesion["probabilities"].items():
                assert abs(float(row[f"p_{c}"]) - p) < 1e-4, (source, c)
            assert row["fallback"] == str(answer["fallback"])
            assert row["image_sha256"] == answer["image"]["sha256"]
    assert all("bác sĩ da liễu" in row["guidance"] for row in scored)  # the Vietnamese guidance, intact
    assert not (out.parent / "scores.csv.parts").exists()


def test_an_interrupted_run_resumes_without_scoring_anything_twice(deployed, tmp_path):
    folder = _photos(deployed, tmp_path / "photos", 10)
    whole = tmp_path / "whole.parquet"
    r = drspot("predict", str(folder), "--out", str(whole), env=deployed["env"])
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "cut.parquet"
    parts = tmp_path / "cut.parquet.parts"
    exe = str(Path(sys.executable).parent / "drspot")
    run = subprocess.Popen(
        [exe, "predict", str(folder), "--out", str(out), "--batch", "1"],
        env=deployed["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while len(list(parts.glob("part-*.parquet"))) < 3:
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not out.exists()
    finished = len(list(parts.glob("part-*.parquet")))
    assert 3 <= finished < 12

    again = drspot("predict", str(folder), "--out", str(out), "--batch", "1", env=deployed["env"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"predict: resuming {parts}: {finished} of 12 photos already scored" in again.stderr
    assert f"{finished} from the interrupted run" in again.stdout
    import pyarrow.parquet as pq

    a, b = pq.read_table(whole).to_pylist(), pq.read_table(out).to_pylist()
    assert [(x["source"], x["lesion"]) for x in b] == [(x["source"], x["lesion"]) for x in a]  # each once, in order
    for x, y in zip(a, b, strict=True):
        assert x["label"] == y["label"] and x["error"] == y["error"]
        assert x["malignant_probability"] == pytest.approx(y["malignant_probability"], abs=1e-5)
    assert not parts.exists()


def test_bad_sources_and_a_changed_run_are_named(deployed, tmp_path):
    env = deployed["env"]
    folder = _photos(deployed, tmp_path / "photos", 2)
    listed = tmp_path / "list.csv"
    first = sorted(folder.glob("visit0/*.jpg"))[0]
    listed.write_text(f"path,note\n{first.relative_to(tmp_path)},ok\n,blank\nphotos/gone.jpg,moved\n{first},again\n")
    out = tmp_path / "listed.csv"
    r = drspot("predict", str(listed), "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    errors = [row["error"] for row in rows if row["error"]]
    assert errors == ["no file named in this row", f"missing file: {tmp_path / 'photos' / 'gone.jpg'} does not exist"]
    assert sum(1 for row in rows if not row["error"]) >= 2  # the listed photo, by its relative and absolute path

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("name,label\na.jpg,mel\n")
    r = drspot("predict", str(wrong), env=env)
    assert r.returncode == 1  # a runtime failure: the list cannot be read
    assert "no column naming the photos (path / image / file / filename); its columns are name, label" in r.stderr
    r = drspot("predict", str(folder), "--out", str(tmp_path / "x.txt"), env=env)
    assert r.returncode == 2 and "the output must end in .csv or .parquet" in r.stderr
    r = drspot("predict", str(folder), "--language", "fr", "--out", str(tmp_path / "x.csv"), env=env)
    assert r.returncode == 2 and "language='fr' is not offered; use one of en, ko, vi" in r.stderr

    parts = tmp_path / "old.csv.parts"
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps({"models": {"classifier": "drspot-classifier/99"}}))
    r = drspot("predict", str(folder), "--out", str(tmp_path / "old.csv"), env=env)
    assert r.returncode == 1 and f"{parts} holds an unfinished run with other source, models" in r.stderr
    r = drspot("predict", str(folder), "--out", str(tmp_path / "old.csv"), "--restart", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
