"""`drspot retrain` SIGKILLed at each of its steps in turn, then run again: it resumes from the step it was killed in
and completes, the registry holds no duplicate version, every confirmed case is in the dataset exactly once, the lock
is free after every kill, and the Bento serves the champions."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.model import registry
from flows.retrain import STEPS
from flows.train import train_flow
from tests.conftest import shell_env
from tests.test_flywheel import _serve

pytestmark = pytest.mark.slow

INSIDE_TRAIN = {"register", "promote"}  # checkpoints inside the `train` step


def _runtime_file(root: Path, suffix: str) -> Path:
    (lock,) = (root / ".drspot").glob("retrain-*.lock")
    return lock if suffix == ".lock" else lock.with_suffix(suffix)


def _lock_is_free(root: Path) -> bool:
    with open(_runtime_file(root, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def _retrain(drspot: str, env: dict, root: Path, log: Path) -> tuple[int, str]:
    """``drspot retrain`` in its own process group, output to ``log``; whatever it left running is stopped after
    (a SIGKILLed run's temporary Prefect server lives on, holding a pipe open: never read its output from a pipe)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [drspot, "retrain"], env=env, cwd=root, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return rc, log.read_text()


def test_a_retrain_killed_at_each_step_resumes_without_duplicates(dvc_project, cfg, tmp_path, monkeypatch):
    from components.data.synthetic import Spec, generate
    from serving.store import PredictionLog

    root = dvc_project
    env = shell_env(
        DRSPOT_HOME=str(root),
        DRSPOT_PROFILE="test",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        DRSPOT_DATABASE_URL=f"sqlite:///{root / 'predictions.db'}",
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.setenv("DRSPOT_DATABASE_URL", env["DRSPOT_DATABASE_URL"])
    train_flow(profile="test", root=str(root))
    # new lesions from another camera, confirmed by a clinician
    src = tmp_path / "clinic"
    faults = dict.fromkeys(("exact_duplicates", "near_duplicates", "corrupt", "unknown_labels", "tiny"), 0)
    one_each = {"n_lesions": 7, "images_per_lesion": (1, 1), "min_lesions_per_class": 1}
    generate(src, Spec.from_config(cfg, shifted=True, seed=4321, **one_each, **faults))
    log = PredictionLog(env["DRSPOT_DATABASE_URL"], root / ".drspot" / "images")
    with open(src / "labels.csv") as f:
        confirmed = []
        for r in csv.DictReader(f):
            rid = _serve(log, (src / r["file"]).read_bytes())
            log.add_feedback(rid, r["label"], "dr.kill")
            confirmed.append(rid)

    # one Prefect server for the nine runs (each would start a temporary one: ~10 s apiece), stopped by process id
    from flows.schedule import start_local_server
    from serving.launch import free_port

    url, server = start_local_server(free_port(), tmp_path / "prefect-server.log")
    env["PREFECT_API_URL"] = url
    try:
        _kill_at_each_step_then_resume(env, root, tmp_path, confirmed, monkeypatch, cfg)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def _kill_at_each_step_then_resume(env, root, tmp_path, confirmed, monkeypatch, cfg) -> None:
    drspot = str(Path(sys.executable).parent / "drspot")
    for step in STEPS:
        rc, out = _retrain(drspot, {**env, "DRSPOT_KILL_AT": step}, root, tmp_path / f"killed-{step}.log")
        assert rc == -signal.SIGKILL, (step, rc, out[-4000:])
        journal = json.loads(_runtime_file(root, ".journal.json").read_text())
        assert journal["running"] == ("train" if step in INSIDE_TRAIN else step), (step, journal)
        assert _lock_is_free(root), f"the lock is still held after the kill during {step}"
        if step != STEPS[0]:
            assert "resuming the retrain" in out and "did not finish (killed?)" in out, out[-4000:]

    rc, out = _retrain(drspot, env, root, tmp_path / "final.log")
    assert rc == 0, out[-5000:]
    assert "resuming the retrain" in out and "retrain (by hand; resumes the run (by hand) of " in out
    assert not _runtime_file(root, ".journal.json").exists() and _lock_is_free(root)
    # no duplicate model version: each registered version has its own weights
    for name in (registry.CLASSIFIER, registry.DETECTOR):
        hashes = [mv.tags.get("model_hash") for mv in registry.client().search_model_versions(f"name='{name}'")]
        assert None not in hashes and len(hashes) == len(set(hashes)), (name, hashes)
    # every confirmed case reached the dataset, once
    rows = pq.read_table(root / "data" / "manifest.parquet", columns=["image_id", "source"]).to_pylist()
    fb = Counter(r["image_id"] for r in rows if r["source"] == "feedback")
    assert len(fb) == len(confirmed) and set(fb.values()) == {1}, fb
    # the deployed Bento serves the champions (built by the run that resumed at `deploy`)
    from serving.deploy import serves_champions

    monkeypatch.setenv("DRSPOT_HOME", str(root))
    assert serves_champions(cfg.at(root))
    # and a retrain now finds nothing left to do
    rc, out = _retrain(drspot, env, root, tmp_path / "again.log")
    assert rc == 0 and "skipped: 0 new confirmed case(s)" in out, out[-3000:]
