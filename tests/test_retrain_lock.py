"""One retrain per project at a time (flows/retrain.py: one_at_a_time): a killed holder leaves no lock behind,
a contender says whom it waits for, and the next holder says that the previous retrain did not finish."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import shell_env

ROOT = Path(__file__).resolve().parent.parent
HOLD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from flows.retrain import one_at_a_time\n"
    "with one_at_a_time(Path(sys.argv[1])):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def _holder(home: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(home)],
        cwd=ROOT,
        env=shell_env(DRSPOT_HOME=str(home)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_killed_retrain_leaves_no_lock_and_the_next_one_says_so(tmp_path, monkeypatch):
    from flows.retrain import lock_path, one_at_a_time

    monkeypatch.setenv("DRSPOT_HOME", str(tmp_path))
    holder = _holder(tmp_path)
    assert f"pid {holder.pid} on " in lock_path(tmp_path).read_text()
    # a contender waits, naming the holder; it gets the lock the moment the holder is killed
    said: list[str] = []
    killer = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; time.sleep(1.5); os.kill({holder.pid}, {int(signal.SIGKILL)})"]
    )
    t0 = time.monotonic()
    with one_at_a_time(tmp_path, said.append):
        waited = time.monotonic() - t0
        assert f"pid {holder.pid} on " in said[0] and said[0].startswith("retrain: waiting for the retrain already")
        assert said[1].startswith(f"retrain: the previous retrain (pid {holder.pid} on ")
        assert "did not finish (killed?); the kernel released its lock" in said[1]
        assert 1.0 < waited < 30
    killer.wait()
    assert holder.wait(timeout=10) == -signal.SIGKILL
    # a retrain that ends normally leaves nothing to report
    said.clear()
    with one_at_a_time(tmp_path, said.append):
        pass
    with one_at_a_time(tmp_path, said.append):
        pass
    assert said == [] and lock_path(tmp_path).read_text() == ""
