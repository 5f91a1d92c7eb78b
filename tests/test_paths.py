"""One paths object: the run's configuration knows where its state home keeps every file (infra/state.py), and a
run moved to another project folder (``root=``, ``cfg.at``) keeps all of its state there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.state import StatePaths


def _paths(state: StatePaths) -> dict[str, Path]:
    out = {}
    for name in dir(StatePaths):
        attr = getattr(StatePaths, name)
        if isinstance(attr, property):
            out[name] = getattr(state, name)
    out["run_config"] = state.run_config("serve-3000")
    out["metrics"] = state.metrics("backend", 3000)
    out.update({f"library:{k}": Path(v) for k, v in state.library_homes().items()})
    return out


def test_a_run_at_another_root_keeps_every_state_file_under_that_root(cfg, tmp_path):
    from flows.retrain import journal_path, lock_path
    from infra.config import hand_over
    from serving.store import database_url

    project = tmp_path / "project"
    other = cfg.at(project)
    assert Path(os.environ["DRSPOT_HOME"]).resolve() != project.resolve()  # the process's own home is elsewhere
    found = _paths(other.runtime)
    assert len(found) >= 18
    outside = {k: str(v) for k, v in found.items() if not v.resolve().is_relative_to(project.resolve())}
    assert not outside, outside
    assert database_url(other) == f"sqlite:///{project.resolve() / '.drspot' / 'predictions.db'}"
    for configured in (other.alerts.file, other.serving.images_dir):
        assert other.resolve(configured).is_relative_to(project.resolve())
    assert lock_path(project).is_relative_to(project) and journal_path(project).is_relative_to(project)
    handed = hand_over(other, "worker")
    assert Path(handed["DRSPOT_CONFIG"]).is_file() and Path(handed["DRSPOT_CONFIG"]).is_relative_to(project.resolve())
    assert handed["DRSPOT_HOME"] == str(project.resolve())


def test_a_failed_flow_run_with_a_root_alerts_into_that_roots_file(cfg, tmp_path):
    from prefect import flow

    from components.monitoring import alerts
    from flows.policy import HOOKS

    @flow(name="fails-at-a-root", **HOOKS)
    def fails(root: str, profile: str = "test"):
        raise RuntimeError("the disk is full")

    with pytest.raises(RuntimeError):
        fails(root=str(tmp_path))
    here = [a for a in alerts.recent(cfg.at(tmp_path)) if a["kind"] == "flow_failed"]
    assert len(here) == 1 and here[0]["detail"]["flow"] == "fails-at-a-root"
    assert alerts.alert_file(cfg.at(tmp_path)).is_relative_to(tmp_path)
