"""DVC versions the dataset: the same source gives the same version; a change gives a new one."""

from __future__ import annotations

import shutil

from components.data import versioning
from components.data.ingest import ingest


def test_dvc_add_push_and_stable_version(git_dvc_repo, cfg, synthetic_source):
    data = git_dvc_repo / "data"
    ingest("synthetic", synthetic_source, data, cfg)
    v1 = versioning.add("data", cwd=git_dvc_repo)
    assert v1.endswith(".dir") and versioning.data_version(git_dvc_repo / "data.dvc") == v1
    assert "/data" in (git_dvc_repo / ".gitignore").read_text()
    versioning.push(git_dvc_repo)
    assert any((git_dvc_repo / "remote").rglob("*")), "push wrote nothing to the local remote"

    # re-ingesting the same source from scratch reproduces the same version
    shutil.rmtree(data)
    ingest("synthetic", synthetic_source, data, cfg)
    assert versioning.add("data", cwd=git_dvc_repo) == v1

    # new rows make a new version
    folder = git_dvc_repo / "extra"
    (folder / "nv").mkdir(parents=True)
    shutil.copy(next((synthetic_source / "images").glob("*.jpg")), folder / "nv" / "x.jpg")
    ingest("imagefolder", folder, data, cfg, append=True)
    assert versioning.add("data", cwd=git_dvc_repo) != v1


def test_dvc_failure_is_reported_with_its_output(tmp_path):
    try:
        versioning.dvc("add", "nothing-here", cwd=tmp_path)
    except versioning.DvcError as e:
        assert "dvc add nothing-here" in str(e)
    else:
        raise AssertionError("dvc add outside a DVC repo should fail")
