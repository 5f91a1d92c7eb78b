"""The `prepare` Prefect flow: tasks, the markdown artifact, and DVC stages that cache."""

from __future__ import annotations

import subprocess

import pytest

from components.data.ingest import ingest
from flows.prepare import prepare_flow

pytestmark = pytest.mark.slow


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(arts, key=lambda a: a.created)[-1].data


def test_flow_on_a_dataset_folder_publishes_the_figures(tmp_path, cfg, synthetic_source):
    ds = tmp_path / "ds"
    ingest("synthetic", synthetic_source, ds, cfg)
    result = prepare_flow(str(ds), str(tmp_path / "prep"), "test")
    assert result["steps"] == {"validate": "ran", "dedup": "ran", "split": "ran"}
    assert result["leakage"] == {"cross_split_groups": 0, "cross_split_lesions": 0, "cross_split_duplicate_pairs": 0}
    assert result["quarantined_by_check"]["decodes"] == cfg.synthetic.faults.corrupt
    md = _artifact("prepare-summary")
    assert f"# Data gate: `{ds}`" in md and "| leakage: cross_split_groups | 0 |" in md
    assert f"| quarantined: decodes | {cfg.synthetic.faults.corrupt} |" in md


def test_flow_runs_the_dvc_stages_and_a_rerun_does_nothing(dvc_project):
    root = dvc_project
    first = prepare_flow(str(root / "data"), profile="test", root=str(root))
    assert first["steps"] == {"validate": "ran", "dedup": "ran", "split": "ran"}
    assert (root / "dvc.lock").is_file() and first["rows_per_split"]["test"] > 0
    second = prepare_flow(str(root / "data"), profile="test", root=str(root))
    assert second["steps"] == {"validate": "cached", "dedup": "cached", "split": "cached"}
    assert second["rows_per_split"] == first["rows_per_split"]
    for step in ("validate", "dedup", "split"):  # stage outputs are DVC's: git ignores them
        ignored = subprocess.run(
            ["git", "check-ignore", f"prepared/data/{step}"], cwd=root, capture_output=True, text=True
        )
        assert ignored.returncode == 0, step


def test_flow_stops_on_a_data_error_without_retrying(tmp_path, cfg):
    from components.data.manifest import write_manifest

    ds = tmp_path / "empty"
    write_manifest(ds, [])
    with pytest.raises(Exception, match="is empty"):
        prepare_flow(str(ds), str(tmp_path / "prep"), "test")
