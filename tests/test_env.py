"""The offline/telemetry settings are in force for every entry point and its subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.env import FIXED, homes
from tests.conftest import ROOT, shell_env


def _clean_env() -> dict[str, str]:
    """The environment of a fresh shell: none of DrSpot's settings."""
    return shell_env()


def test_cli_applies_the_settings_for_itself(drspot_cli):
    out = drspot_cli("env", "--json", env=_clean_env())
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    for key in ("YOLO_OFFLINE", "MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK", "DVC_NO_ANALYTICS"):
        assert seen[key] == FIXED[key]
    rt = str(ROOT / ".drspot")
    for key in ("PREFECT_HOME", "BENTOML_HOME", "DVC_SITE_CACHE_DIR", "YOLO_CONFIG_DIR"):
        assert seen[key].startswith(rt), (key, seen[key])


def test_subprocesses_of_an_entry_point_inherit_the_settings():
    code = (
        "import components, subprocess, sys;"
        "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ[\"DVC_NO_ANALYTICS\"],"
        ' os.environ["PREFECT_HOME"])\'], capture_output=True, text=True).stdout)'
    )
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    flag, prefect_home = out.stdout.split()
    assert flag == "1" and prefect_home == str(ROOT / ".drspot" / "prefect")


def test_a_user_setting_wins(tmp_path):
    env = {**_clean_env(), "BENTOML_HOME": str(tmp_path / "bento")}
    code = "import components, os; print(os.environ['BENTOML_HOME'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(tmp_path / "bento")


def test_font_is_where_ultralytics_looks_and_its_mlflow_callback_is_off():
    # check_font returns the local file without any download when it is in the config dir;
    # with no network here, a download attempt would fail the subprocess.
    code = (
        "import infra.env as e; ul = e.ultralytics();"
        "from ultralytics.utils.checks import check_font; from ultralytics.utils import SETTINGS;"
        "print(check_font('Arial.ttf')); print(SETTINGS['mlflow'], SETTINGS['sync'])"
    )
    env = shell_env(DRSPOT_HOME=os.environ["DRSPOT_HOME"])  # the suite's sandbox home, as homes() below sees it
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    font, flags = out.stdout.strip().splitlines()[-2:]
    assert Path(font) == Path(homes()["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf"
    assert Path(font).stat().st_size > 100_000  # a real TTF (DejaVuSans), not an empty placeholder
    assert flags == "False False"


def test_ultralytics_does_not_hijack_pillow_for_unreadable_files(tmp_path):
    import pytest
    from PIL import Image, UnidentifiedImageError

    import infra.env as e
    from components.data.manifest import probe_image

    e.ultralytics()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UnidentifiedImageError):  # not ModuleNotFoundError('pi_heif'), no pip install
        Image.open(bad)
    with pytest.raises(ValueError, match="not a recognisable image file"):
        probe_image(bad)


@pytest.mark.parametrize(
    "setting, value, named",
    [
        (
            "MLFLOW_TRACKING_URI",
            "http://127.0.0.1:9",
            "the MLflow tracking server of MLFLOW_TRACKING_URI=http://127.0.0.1:9",
        ),
        ("PREFECT_API_URL", "http://127.0.0.1:9/api", "the Prefect server of PREFECT_API_URL=http://127.0.0.1:9/api"),
    ],
)
def test_a_server_that_does_not_answer_is_named_by_its_setting(tmp_path, drspot_cli, setting, value, named):
    """A command pointed at a server that is not there fails in bounded time with the setting, not a traceback."""
    import time

    start = time.monotonic()
    r = drspot_cli("monitor", env=shell_env(DRSPOT_HOME=str(tmp_path), **{setting: value}))
    assert r.returncode == 1 and f"drspot monitor: error: {named} did not answer" in r.stderr, r.stderr[-2000:]
    # the command's last word is that sentence (Prefect may log the failed task's traceback before it)
    assert r.stderr.strip().splitlines()[-1].startswith(f"drspot monitor: error: {named}")
    assert time.monotonic() - start < 90


@pytest.mark.slow
def test_a_prefect_server_lost_mid_run_is_named_in_bounded_time(tmp_path, cfg, synthetic_source, monkeypatch):
    """`drspot train` against a Prefect server that is SIGKILLed while the classifier trains: the command ends with
    exit 2 and one sentence naming PREFECT_API_URL, within a minute of the loss (Prefect's own retries and its log
    and event workers held it 5 minutes before a traceback); with the server back, the same command completes."""
    import os
    import signal
    import time

    from components.data.ingest import ingest
    from flows.schedule import start_local_server
    from serving.launch import free_port

    home = tmp_path / "home"
    ingest("synthetic", synthetic_source, home / "data", cfg)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # the server's own database
    port = free_port()
    url, server = start_local_server(port, tmp_path / "server.log")
    env = shell_env(DRSPOT_HOME=str(home), PREFECT_API_URL=url)
    cmd = [str(Path(sys.executable).parent / "drspot"), "--profile", "test", "train"]
    err = tmp_path / "train.err"
    try:
        with open(err, "w") as stderr:
            run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
            deadline = time.monotonic() + 300
            while "Task run 'train-classifier" not in err.read_text() and run.poll() is None:
                assert time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.1)
            os.killpg(server.pid, signal.SIGKILL)  # mid-run: the prepare subflow done, the models training
            lost = time.monotonic()
            rc = run.wait(timeout=300)
            took = time.monotonic() - lost
    finally:
        if run.poll() is None:
            run.kill()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    last = err.read_text().strip().splitlines()[-1]
    assert rc == 1, err.read_text()[-3000:]
    assert last.startswith(f"drspot train: error: the Prefect server of PREFECT_API_URL={url} stopped answering"), last
    assert "run the command again once the server is back" in last
    assert took < 90, took

    _, again = start_local_server(port, tmp_path / "server2.log")  # the same database, back
    try:
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.killpg(again.pid, signal.SIGKILL)
        again.wait()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "classifier: v" in rerun.stdout and "champion v" in rerun.stdout, rerun.stdout[-2000:]
