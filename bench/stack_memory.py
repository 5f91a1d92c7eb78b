"""Memory of each service of `drspot stack up` on one machine, at rest and while the worker runs a flow.

Run:  .venv/bin/python bench/stack_memory.py

Starts the stack in a temporary state home (PostgreSQL, SeaweedFS, the MLflow server, the Prefect server, a
Prefect worker), measures each service's process tree (PSS: shared pages split between the processes that map
them, so PostgreSQL's shared buffers are not counted once per backend), registers the project's deployments
(`drspot schedule --pool drspot`, profile `test`) and runs `monitor/hourly` on the worker, sampling every 0.25 s,
then stops the stack by process id. Writes bench/results/stack_memory.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infra.state import StatePaths  # noqa: E402

BIN = Path(sys.executable).parent
SERVICES = ("postgres", "object_store", "mlflow", "prefect", "worker")


def pss_mib(pid: int) -> float:
    """PSS of ``pid`` and its descendants in MiB (0 when gone)."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for q in procs:
        try:
            total += q.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="drspot-stack-mem-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DRSPOT_", "MLFLOW_", "PREFECT_", "AWS_"))}
    env |= {"DRSPOT_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"}
    start = time.perf_counter()
    subprocess.run([BIN / "drspot", "stack", "up"], env=env, check=True, capture_output=True, text=True, timeout=400)
    up_s = round(time.perf_counter() - start, 1)
    rec = json.loads((StatePaths(home).stack / "stack.json").read_text())
    pids = {name: rec["services"][name]["pid"] for name in SERVICES}
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "up_s": up_s}
    try:
        time.sleep(5)
        result["at_rest_mib"] = {name: round(pss_mib(pid)) for name, pid in pids.items()}
        flow_env = env | rec["env"] | {"DRSPOT_PROFILE": "test"}
        subprocess.run(
            [BIN / "drspot", "schedule", "--pool", "drspot"], env=flow_env, check=True, capture_output=True, timeout=300
        )
        peak = dict.fromkeys(pids, 0.0)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for name, pid in pids.items():
                    peak[name] = max(peak[name], pss_mib(pid))
                stop.wait(0.25)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        code = (
            "from prefect.deployments import run_deployment\n"
            "fr = run_deployment('monitor/hourly', timeout=300)\n"
            "print(fr.state_type.value)\n"
        )
        ran = subprocess.run([sys.executable, "-c", code], env=flow_env, capture_output=True, text=True, timeout=400)
        stop.set()
        t.join()
        result["monitor_run_state"] = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else ran.stderr[-500:]
        result["peak_while_a_flow_runs_mib"] = {name: round(v) for name, v in peak.items()}
    finally:
        subprocess.run([BIN / "drspot", "stack", "down"], env=env, capture_output=True, timeout=120)
        from infra.stack import _pg_folder

        subprocess.run(["rm", "-rf", str(_pg_folder(home)), str(home)])
    total_rest = sum(result["at_rest_mib"].values())
    total_peak = sum(result.get("peak_while_a_flow_runs_mib", {}).values())
    print(f"drspot stack up: {up_s} s; the worker's monitor run: {result.get('monitor_run_state')}")
    print("| service | at rest (PSS MiB) | peak while the worker runs a flow |")
    print("|---|---|---|")
    for name in SERVICES:
        print(f"| {name} | {result['at_rest_mib'][name]} | {result.get('peak_while_a_flow_runs_mib', {}).get(name)} |")
    print(f"| all five | {total_rest} | {total_peak} (sum of each service's peak) |")
    out = ROOT / "bench" / "results" / "stack_memory.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
