"""``drspot ui``: the Prefect UI and the MLflow UI on the project's own stores, until Ctrl-C.

A ``prefect server start`` or ``mlflow ui`` typed by hand opens empty consoles: DrSpot's Prefect home and tracking
store are project-local, set only inside DrSpot's own processes. This command starts both with the project's
settings (the same ones ``eval "$(drspot env --export)"`` gives a shell), prints their addresses, and stops both
by process id on exit. A shared server configured instead (``PREFECT_API_URL``, an ``http(s)``
``MLFLOW_TRACKING_URI``) is not started: its address is printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from infra.config import Config

START_TIMEOUT_S = 180


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_mlflow_ui(uri: str, port: int, log: Path) -> subprocess.Popen | None:
    """``mlflow ui`` on 127.0.0.1:``port`` over the tracking store ``uri`` (reused if one answers there)."""
    if _answers(f"http://127.0.0.1:{port}/health"):
        return None
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # ~0.6 GB instead of ~3 GB
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)  # noqa: SIM115
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if _answers(f"http://127.0.0.1:{port}/health"):
            return proc
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"the MLflow UI did not answer on port {port} within {START_TIMEOUT_S} s (log: {log})")


def stop(proc: subprocess.Popen | None) -> None:
    """End a process started here, and its children, by its process group."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_ui(cfg: Config, prefect_port: int, mlflow_port: int) -> int:
    from components.model import registry
    from flows.schedule import start_local_server

    logs = cfg.runtime.ui_logs
    logs.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen] = []

    def _stop(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        if os.environ.get("PREFECT_API_URL"):
            prefect = f"{os.environ['PREFECT_API_URL'].removesuffix('/api')} (shared server: PREFECT_API_URL)"
        else:
            _, proc = start_local_server(prefect_port, logs / "prefect.log")
            started += [proc] if proc else []
            prefect = f"http://127.0.0.1:{prefect_port}" + ("" if proc else " (already running)")
        uri = registry.tracking_uri()
        if uri.startswith(("http://", "https://")):
            mlflow = f"{uri} (shared server: MLFLOW_TRACKING_URI)"
        else:
            proc = start_mlflow_ui(uri, mlflow_port, logs / "mlflow.log")
            started += [proc] if proc else []
            mlflow = f"http://127.0.0.1:{mlflow_port}" + ("" if proc else " (already running)")
        print(f"Prefect UI  {prefect}   flow runs, artifacts, deployments (Prefect home {os.environ['PREFECT_HOME']})")
        print(f"MLflow UI   {mlflow}   runs, registered models, aliases (store {uri})")
        print(f"logs in {logs}; Ctrl-C stops what was started here", flush=True)
        while all(p.poll() is None for p in started):
            time.sleep(1)
        gone = [p.args[1] if len(p.args) > 1 else p.args[0] for p in started if p.poll() is not None]
        print(f"drspot ui: {', '.join(map(str, gone))} exited (logs in {logs})", flush=True)
        return 1 if gone else 0
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in started:
            stop(proc)
        print("drspot ui: stopped", flush=True)
