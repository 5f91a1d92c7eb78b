"""One state home: where DrSpot keeps everything is decided once (``infra.env.project_root``), handed to every
process, and refused with the setting's name where it would be lost or cannot be used. Each default is checked the
way a user gets it: a subprocess with none of DrSpot's variables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.conftest import shell_env as clean_env


def test_a_copy_of_the_code_outside_a_checkout_has_no_home_of_its_own(tmp_path):
    # what a Bento holds: the packages and params.yaml, but no dvc.yaml / pyproject.toml
    src = tmp_path / "bento" / "src"
    for package in ("components", "infra"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", src / "params.yaml")
    code = "import infra.env as e; print(e.project_root())"
    out = subprocess.run([sys.executable, "-c", code], cwd=src, env=clean_env(), capture_output=True, text=True)
    assert out.returncode != 0
    assert "is not a project checkout" in out.stderr and "set DRSPOT_HOME to the project folder" in out.stderr
    # a home handed over is used; one inside the copy itself is refused by name
    home = tmp_path / "project"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=src, env=clean_env(DRSPOT_HOME=str(home)), capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == str(home)
    check = "import infra.env as e; e.check_home()"
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=src, env=clean_env(DRSPOT_HOME=str(src)), capture_output=True, text=True
    )
    assert out.returncode != 0 and "lies inside this copy of the code" in out.stderr


def test_an_unwritable_state_folder_is_refused_before_any_work(drspot_cli):
    out = drspot_cli("status", env=clean_env(DRSPOT_HOME="/sys/drspot-state"))
    assert out.returncode == 1
    assert "the state folder /sys/drspot-state is not writable" in out.stderr
    assert "set DRSPOT_HOME to a writable folder" in out.stderr


def test_a_database_that_does_not_answer_is_named_without_its_password(drspot_cli, tmp_path):
    from serving.launch import free_port

    url = f"postgresql+psycopg://drspot:s3cret@127.0.0.1:{free_port()}/drspot"
    out = drspot_cli("monitor", env=clean_env(DRSPOT_HOME=str(tmp_path), DRSPOT_DATABASE_URL=url))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the prediction log at postgresql+psycopg://drspot:***@127.0.0.1" in out.stderr
    assert "(DRSPOT_DATABASE_URL) cannot be used" in out.stderr and "s3cret" not in out.stderr
    assert not (tmp_path / "reports").exists()  # refused before the monitor wrote anything


def test_env_export_gives_a_shell_the_projects_stores(tmp_path):
    script = (
        f'eval "$({Path(sys.executable).parent / "drspot"} env --export)"; '
        f"{sys.executable} -c \"import os, mlflow; print(os.environ['DRSPOT_HOME']); print(os.environ['PREFECT_HOME']);"
        " print(os.environ['BENTOML_HOME']); print(mlflow.get_tracking_uri())\""
    )
    out = subprocess.run(["bash", "-c", script], env=clean_env(), capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    home, prefect, bento, tracking = out.stdout.split()
    assert home == str(ROOT)
    assert prefect == str(ROOT / ".drspot" / "prefect") and bento == str(ROOT / ".drspot" / "bentoml")
    assert tracking == f"sqlite:///{ROOT / 'mlflow' / 'mlflow.db'}"  # what `drspot` itself uses


def test_import_of_logs_left_inside_bento_folders_is_complete_and_idempotent(tmp_path, drspot_cli):
    from serving.log_import import stranded
    from serving.store import PredictionLog

    home = tmp_path / "project"
    # what an earlier version left behind: a log and a stored image inside a Bento's own folder
    src = home / ".drspot" / "bentoml" / "bentos" / "drspot" / "abc123" / "src" / ".drspot"
    old = PredictionLog(f"sqlite:///{src / 'predictions.db'}", src / "images")
    image = b"\xff\xd8 a stored photo"
    for i, rid in enumerate(("r1", "r2")):
        old.record(
            {
                "request_id": rid,
                "image_sha256": f"{i}" * 64,
                "width": 10,
                "height": 10,
                "format": "JPEG",
                "quality": {},
                "embedding": [0.5],
                "lesions": [],
                "label": "nv",
                "confidence": 0.9,
                "fallback": True,
                "image_path": old.store_image(f"{i}" * 64, image, "JPEG") if i == 0 else None,
            }
        )
    old.add_feedback("r1", "mel", "dr a")
    old.engine.dispose()
    env = clean_env(DRSPOT_HOME=str(home))
    assert stranded(home / ".drspot" / "bentoml") == [src / "predictions.db"]

    out = drspot_cli("import-logs", env=env)
    assert out.returncode == 0, out.stderr
    assert "2 predictions, 1 confirmations, 1 images imported" in out.stdout
    log = PredictionLog(f"sqlite:///{home / '.drspot' / 'predictions.db'}")
    assert log.count() == 2 and [r["confirmed_label"] for r in log.confirmed()] == ["mel"]
    moved = log.get("r1")["image_path"]
    assert Path(moved).is_relative_to(home / ".drspot" / "images") and Path(moved).read_bytes() == image
    assert (src / "predictions.db").is_file()  # the source is kept

    # found once: the next search skips it; an explicit second import finds everything already there
    assert stranded(home / ".drspot" / "bentoml") == []
    out = drspot_cli("import-logs", str(src / "predictions.db"), env=env)
    assert out.returncode == 0, out.stderr
    assert "0 predictions, 0 confirmations, 0 images imported (2 predictions and 1 confirmations" in out.stdout
    assert log.count() == 2 and len(log.confirmed()) == 1


def test_status_on_an_empty_project_creates_nothing(drspot_cli, tmp_path):
    out = drspot_cli("status", "--json", env=clean_env(DRSPOT_HOME=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["home"] == str(tmp_path) and s["profile"] == "demo"
    assert s["models"]["note"].startswith("no registry yet")
    assert s["prediction_log"] == {
        "location": str(tmp_path / ".drspot" / "predictions.db"),
        "predictions": 0,
        "note": "nothing logged yet",
    }
    assert s["monitor"] == {"last": None} and s["retrain"] == {"last": None}
    assert not (tmp_path / ".drspot" / "predictions.db").exists() and not (tmp_path / "mlflow").exists()


def test_run_folders_read_back_as_their_times():
    from flows.status import _when

    assert _when("20261130T065543Z").isoformat() == "2026-11-30T06:55:43+00:00"  # monitor reports
    assert _when("20261130T065548456436Z").isoformat() == "2026-11-30T06:55:48.456436+00:00"  # retrain records


@pytest.mark.slow
def test_a_flow_command_ends_on_its_own_last_line(drspot_cli, tmp_path, cfg, synthetic_source):
    from components.data.ingest import ingest

    ingest("synthetic", synthetic_source, tmp_path / "ds", cfg)
    out = drspot_cli("--profile", "test", "prepare", str(tmp_path / "ds"), env=clean_env(DRSPOT_HOME=str(tmp_path)))
    assert out.returncode == 0, out.stderr[-3000:]
    both = out.stdout + out.stderr
    assert "Logging error" not in both and "I/O operation on closed file" not in both
    assert out.stdout.strip().splitlines()[-1].startswith("steps: {'validate': 'ran'")


@pytest.mark.slow
def test_ui_opens_the_projects_own_prefect_and_mlflow_and_stops_them(tmp_path, drspot_cli, cfg, synthetic_source):
    """`drspot ui` over a project with one flow run and one MLflow experiment: both consoles show them."""
    import signal
    import time

    import httpx

    from components.data.ingest import ingest
    from serving.launch import free_port

    env = clean_env(DRSPOT_HOME=str(tmp_path))
    ingest("synthetic", synthetic_source, tmp_path / "ds", cfg)
    assert drspot_cli("--profile", "test", "prepare", str(tmp_path / "ds"), env=env).returncode == 0
    code = "import components, mlflow; from components.model import registry; registry.use_experiment('drspot-ui-test')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)

    pp, mp = free_port(), free_port()
    log = tmp_path / "ui.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "drspot"), "ui", "--prefect-port", str(pp), "--mlflow-port", str(mp)],
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while "MLflow UI" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        text = log.read_text()
        assert f"Prefect UI  http://127.0.0.1:{pp}" in text and f"MLflow UI   http://127.0.0.1:{mp}" in text, text
        runs = httpx.post(f"http://127.0.0.1:{pp}/api/flow_runs/filter", json={}, timeout=10).json()
        flows = httpx.post(f"http://127.0.0.1:{pp}/api/flows/filter", json={}, timeout=10).json()
        assert runs and "prepare" in {f["name"] for f in flows}  # the project's flow run, not an empty console
        exps = httpx.get(
            f"http://127.0.0.1:{mp}/api/2.0/mlflow/experiments/search", params={"max_results": 10}, timeout=10
        ).json()
        assert "drspot-ui-test" in {e["name"] for e in exps["experiments"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert "drspot ui: stopped" in log.read_text()
    for port in (pp, mp):  # both servers went with it
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)


def test_the_real_demo_names_what_its_data_folder_lacks(drspot_cli, tmp_path):
    (tmp_path / "ham" / "images").mkdir(parents=True)
    out = drspot_cli("demo", "--real", str(tmp_path / "ham"), env=clean_env(DRSPOT_HOME=str(tmp_path / "home")))
    assert out.returncode == 1
    assert f"{tmp_path / 'ham'} lacks HAM10000_metadata.csv, lesion_boxes.csv" in out.stderr
    assert "drspot demo --real DIR" in out.stderr


def _entry(version: str, macro_auc: float, profile: str = "ham10000") -> dict:
    return {
        "version": version,
        "metrics": {"macro_auc": macro_auc},
        "profile": profile,
        "data_version": "e790fe25a8f3c1d2.dir",
        "gate": "promoted",
        "gate_reason": "",
    }


def test_status_names_the_champions_own_profile_and_a_challenger_only_when_it_differs():
    from flows.status import render

    s = {
        "home": "/p",
        "profile": "demo",
        "config_digest": "abc",
        "data": {"path": "/p/data", "version": "v1"},
        "models": {
            "tracking_uri": "sqlite:///p/mlflow.db",
            "classifier": {"champion": _entry("3", 0.9), "challenger": _entry("3", 0.9)},
            "detector": {"champion": _entry("1", 0.8), "challenger": _entry("2", 0.7, "demo")},
        },
        "serving": {"deployed": {"bento": "drspot:x"}, "deployed_profile": "ham10000", "url": "u", "answering": False},
        "prediction_log": {"location": "/p/log.db", "predictions": 0},
        "monitor": {"last": {"at": "2026-12-05T21:14:30.123456+00:00", "status": "drift", "rows": 5, "reasons": []}},
        "retrain": {"last": None},
        "schedule": {"answering": False, "server": "s"},
        "approvals": {"waiting": []},
        "alerts": {"newest": None, "file": "/p/a.jsonl", "other_registries": 2},
    }
    title, rows = render(s)
    text = dict(rows)
    assert title == "DrSpot status: state home /p"
    assert text["classifier"] == "champion v3 (profile ham10000, data e790fe25a8f3; macro_auc 0.900)"  # no repeat
    assert "; challenger v2 (profile demo, data e790fe25a8f3; macro_auc 0.700), gate promoted" in text["detector"]
    assert "deployed with profile ham10000" in text["serving"]
    assert text["monitor"].startswith("last run 2026-12-05 21:14:30 UTC: DRIFT")  # to the second
    assert text["alerts"] == "none about this registry (/p/a.jsonl) (2 about other registries not shown)"


def test_status_counts_the_alerts_of_the_registry_in_force(tmp_path, monkeypatch, cfg):
    from flows.status import alerts_status

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////now/mlflow.db")
    here = cfg.at(tmp_path)
    path = tmp_path / here.alerts.file
    path.parent.mkdir(parents=True, exist_ok=True)
    now = "2026-12-05T21:00:00+00:00"
    records = [
        {"at": now, "kind": "gate", "title": "old", "registry": "sqlite:////before/mlflow.db"},
        {"at": now, "kind": "drift", "title": "ours", "registry": "sqlite:////now/mlflow.db"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    s = alerts_status(here)
    assert s["newest"]["title"] == "ours" and s["other_registries"] == 1
