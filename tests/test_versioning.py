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


def test_a_stack_secret_starting_with_a_dash_is_stored_as_the_remote_s_credential(git_dvc_repo):
    # drspot stack generates the S3 secret (secrets.token_urlsafe): 1 in 64 starts with "-", which dvc's argument
    # parser once refused as an unknown option, failing every DVC push to the stack's store
    rec = {
        "services": {"object_store": {"endpoint": "http://127.0.0.1:8333"}},
        "s3_key": "drspot",
        "s3_secret": "-8b_x",
    }
    assert versioning.use_dvc_remote(git_dvc_repo, rec) == "s3://dvc/store"
    local = (git_dvc_repo / ".dvc" / "config.local").read_text()
    assert "secret_access_key = -8b_x" in local and "access_key_id = drspot" in local
    assert "endpointurl = http://127.0.0.1:8333" in (git_dvc_repo / ".dvc" / "config").read_text()
