"""`drspot schedule` for real: a local Prefect server, the four deployments, cron runs, and the
drift event starting the retrain deployment."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.launch import free_port
from tests.conftest import shell_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


async def _runs(url: str) -> list[tuple[str, str, dict, str]]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(url) as c:
        deps = {d.id: f"{d.name}" for d in await c.read_deployments()}
        runs = await c.read_flow_runs(limit=200)
        return [(deps.get(r.deployment_id), r.state_type.value, r.parameters, str(r.expected_start_time)) for r in runs]


def _emit_and_wait(code: str, env: dict, url: str, deadline: float, runs: int) -> list:
    """Run ``code`` (emitting an event as the monitor does) and wait until ``runs`` on-drift runs have ended."""
    done = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PREFECT_API_URL": url}, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found: list = []
    while time.monotonic() < deadline:
        found = [r for r in asyncio.run(_runs(url)) if r[0] == "on-drift"]
        if len(found) >= runs and all(r[1] in ("COMPLETED", "FAILED", "CRASHED") for r in found):
            break
        time.sleep(2)
    return found


def test_schedule_serves_cron_deployments_and_the_drift_event_starts_a_retrain(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # a project home without a params.yaml of its own: the parameters come from the code's copy
    env = shell_env(
        DRSPOT_HOME=str(tmp_path), DRSPOT_PROFILE="test", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"
    )
    out = tmp_path / "schedule.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "drspot"), "schedule", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=open(out, "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while "retrain/on-drift" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()[-3000:]
            time.sleep(1)
        text = out.read_text()
        assert "monitor/hourly: 0 * * * *" in text and "retrain/nightly: 0 2 * * *" in text
        assert "retrain/feedback-threshold: 0 * * * *" in text and "on drspot.drift.detected" in text

        # the scheduler service gives the cron deployments their upcoming runs (02:00 UTC nightly)
        while time.monotonic() < deadline:
            runs = asyncio.run(_runs(url))
            if {"nightly", "hourly", "feedback-threshold"} <= {r[0] for r in runs if r[1] == "SCHEDULED"}:
                break
            time.sleep(2)
        nightly = [r for r in runs if r[0] == "nightly"]
        assert nightly and all(r[3].endswith("02:00:00+00:00") for r in nightly)
        assert nightly[0][2] == {"trigger": "nightly schedule", "min_new": 0, "profile": "test"}

        # `drspot status` names the server, the deployments and the next runs
        status = subprocess.run(
            [str(Path(sys.executable).parent / "drspot"), "status", "--json"],
            env={**env, "PREFECT_API_URL": url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0, status.stderr[-2000:]
        sched = json.loads(status.stdout)["schedule"]
        assert sched["answering"] and "retrain/nightly" in sched["deployments"]
        assert {"monitor/hourly", "retrain/nightly"} <= {r["deployment"] for r in sched["next_runs"]}

        # the monitor's drift event, as the monitor flow emits it, starts retrain/on-drift
        report = str(tmp_path / "reports" / "drift_report.html")
        emit = (
            "from flows.monitor import emit_drift; "
            f"emit_drift({{'report': {report!r}, 'classifier_version': 'drspot-classifier/1', "
            "'reasons': ['test'], 'drifted': ['brightness'], 'share_image_features_drifted': 0.9, "
            "'share_embedding_components_drifted': 0.8})"
        )
        drift_runs = _emit_and_wait(emit, env, url, deadline, runs=1)
        assert drift_runs, "the drift event started no retrain run"
        (name, state, params, _), *rest = drift_runs
        assert not rest and state == "COMPLETED"
        assert params == {"trigger": f"drspot.drift.detected: {report}", "min_new": 1, "profile": "test"}
        log = out.read_text()
        # no confirmed feedback in this empty project: the triggered retrain says so and trains nothing
        assert f"retrain (drspot.drift.detected: {report}): skipped: 0 new confirmed case(s) with a stored image" in log

        # the quality rule's event starts the same deployment
        emit = (
            "from flows.monitor import emit_quality; "
            f"emit_quality({{'report': {report!r}, 'rule': {{'version': 'drspot-classifier/1', 'reason': 'test', "
            "'malignant_sensitivity': 0.2, 'malignant_sensitivity_95': [0.1, 0.4], 'malignant_cases': 20, "
            "'cases': 100}})"
        )
        drift_runs = _emit_and_wait(emit, env, url, deadline, runs=2)
        triggers = sorted(r[2]["trigger"] for r in drift_runs)
        assert triggers == [f"drspot.drift.detected: {report}", f"drspot.quality.degraded: {report}"], drift_runs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert "drspot schedule: stopped" in out.read_text()
