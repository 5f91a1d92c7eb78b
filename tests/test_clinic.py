"""The second-clinic loop's plumbing (``drspot demo --clinic``) on a few hundred shared photos with the ``test``
profile, run as a user runs it: a champion trained on HAM10000 photos, Barcelona photos ingested through the class
map with a frozen test split, drift found, cases confirmed through the review queue, a retrain that fine-tunes the
champion, and the gate judging both clinics' test rows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, shared, shell_env

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture
def project(tmp_path):
    """A fresh clone-like project whose ../shared/data is the real shared data (the demo's default sources)."""
    from components.data.versioning import dvc

    ham = shared("ham10000_200x150")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(ham.parent)
    root = tmp_path / "drspot"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc("init", "-q", cwd=root)
    dvc("remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=root)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "components", root / "components")
    return root


def test_the_clinic_loop_on_a_few_hundred_shared_photos(project):
    shared("bcn20000_84")
    env = shell_env(DRSPOT_HOME=str(project), DRSPOT_PROFILE="test")
    cmd = [str(Path(sys.executable).parent / "drspot"), "demo", "--clinic"]
    cmd += ["--budget", "40", "--lesions", "60", "--ham-photos", "700"]
    run = subprocess.run(cmd, env=env, cwd=project, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    out = json.loads((project / "reports" / "clinic" / "clinic.json").read_text())

    # the Barcelona photos came in through the class map: ak and scc are akiec, the test lesions joined the test set
    manifest = pq.read_table(project / "data" / "manifest.parquet").to_pylist()
    bcn_rows = [r for r in manifest if r["source"] == "bcn20000"]
    assert bcn_rows and {r["label"] for r in bcn_rows} <= {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert "ingested" in run.stdout and "class map (bcn20000): ak -> akiec, scc -> akiec" in run.stdout
    split = {
        r["image_id"]: r["split"]
        for r in pq.read_table(project / "prepared" / "data" / "split" / "split.parquet").to_pylist()
    }
    assert {split.get(r["image_id"]) for r in bcn_rows} == {"test"}  # never trained
    parts = (project / "raw" / "bcn20000" / "lesion_split.csv").read_text().splitlines()[1:]
    test_lesions = {line.split(",")[0] for line in parts if line.endswith(",test")}
    assert {r["lesion_id"] for r in bcn_rows} == test_lesions

    # the monitor: the clinic the model knows is calm, Barcelona drifts (with readable reasons)
    assert out["drift_detected_ham"] is False and out["drift_detected_bcn"] is True and out["drift_reasons"]
    # 40 cases confirmed from the review queue, its random share among them
    assert out["confirmed"] == 40
    assert "confirmed (10 of them the queue's random share)" in run.stdout
    # the retrain fine-tuned the champion and the gate judged both clinics' test rows
    assert out["start"]["classifier"] == "fine-tunes champion v1 for 1 epoch(s)"
    from infra.config import load_resolved

    assert load_resolved(project / ".drspot" / "run" / "config.yaml").classifier.init.version == "1"
    evaluation = json.loads((project / "reports" / "evaluation" / "evaluation.json").read_text())
    sources_judged = {s["value"] for s in evaluation["slices"] if s["column"] == "source"}
    assert sources_judged == {"ham10000", "bcn20000"}
    clf = next(g for g in out["gate"] if g["kind"] == "classifier")
    assert clf["version"] == "2" and clf["reason"]
    assert set(out["before"]) == {"Barcelona test", "HAM10000 test"}
    assert out["before"]["Barcelona test"]["photos"] == sum(1 for r in bcn_rows)
