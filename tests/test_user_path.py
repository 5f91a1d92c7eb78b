"""The user's path as a test: a fresh clone of the project, `drspot demo` run there the way a new user runs it (a
subprocess with none of DrSpot's or the libraries' variables: only the clone's own virtual environment), and
what the user reads asserted: normal traffic NO DRIFT, shifted traffic DRIFT with its reasons, the flywheel
ingesting the confirmed cases into a new data version, the gate's decision with its reason, the served version
after a promotion, and `drspot status` afterwards. Then the demo a second time in the same folder.

The clone's environment reuses this test run's installed packages (a ``.pth`` line) and installs the clone itself
in editable mode, so the ``drspot`` its DVC stages call is the clone's own, not this checkout's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

DEMO_TIMEOUT_S = 1500


def _sh(*cmd: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def make_clone(top: Path) -> Path:
    """``git clone`` of this checkout into ``top``, with the working tree's tracked and new files laid over it (what CI
    gets is a clean clone: the same thing), ``../shared`` beside it, and its own virtual environment."""
    here = top / "main"
    _sh("git", "clone", "-q", str(ROOT), str(here), cwd=top)
    listed = _sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (here / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, here / rel)
    if (ROOT.parent / "shared").is_dir():
        (top / "shared").symlink_to(ROOT.parent / "shared")
    venv = here / ".venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=top)
    (inner,) = (venv / "lib").glob("python3*/site-packages")
    (inner / "_drspot_test_base.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q"]
    _sh(*pip, "--no-deps", "--no-build-isolation", "--no-index", "-e", str(here), cwd=top)
    return here


SWITCH_STEP = "the running `drspot serve` switches to the new Bento"


def user_env(clone: Path) -> dict[str, str]:
    """A new user's shell: PATH with the clone's venv, HOME, LANG; no DRSPOT_* and no library settings."""
    keep = ("HOME", "LANG", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    return {**env, "PATH": f"{clone / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin"}


def _demo_output(clone: Path, name: str) -> tuple[int, str]:
    """``drspot demo`` in the clone as the user runs it: its exit code and what it printed."""
    log = clone.parent / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [str(clone / ".venv" / "bin" / "drspot"), "demo"],
            cwd=clone,
            env=user_env(clone),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=DEMO_TIMEOUT_S,
        )
    return proc.returncode, log.read_text()


def step(text: str, title: str) -> str:
    """The lines a numbered step printed, from its title to the next step."""
    m = re.search(rf"^== \[\d+\] {re.escape(title)}.*?(?=^== )", text, re.M | re.S)
    assert m, f"no step starting {title!r} in the demo's output"
    return m.group(0)


def check_the_loop(text: str) -> dict[str, str]:
    """Assert what a user reads in one demo run; returns the figures the caller compares."""
    assert "Logging error" not in text and "Traceback" not in text
    normal = step(text, "monitor the normal traffic")
    assert "drift monitor: NO DRIFT" in normal, normal
    shifted = step(text, "monitor the shifted traffic")
    assert "drift monitor: DRIFT" in shifted and re.search(r"^\s+- \d+ of \d+ .* drifted \(", shifted, re.M), shifted
    judged = step(text, "model quality of the served classifier")
    assert re.search(r"model quality: (OK|QUALITY DROP|NOT ENOUGH CONFIRMED CASES) \(\d+ confirmed case", judged), (
        judged
    )
    assert re.search(
        r"estimated without labels \(CBPE, \d+ predictions of drspot-classifier/1\): accuracy 0\.\d+", judged
    )
    retrain = step(text, "retrain (the flywheel)")
    added = re.search(r"(\d+) confirmed case\(s\) added to", retrain)
    assert added and int(added.group(1)) >= 100, retrain
    versions = re.search(r"-> data ([\w.]+) -> ([\w.]+);", retrain)
    assert versions and versions.group(1) != versions.group(2), retrain
    gate = re.search(r"^\s+classifier v(\d+): (PROMOTED|rejected|unchanged): (.+)$", retrain, re.M)
    assert gate and len(gate.group(3)) > 20, retrain  # the decision with its reason
    # every promotion went through the serving check (a Bento of the pair started and queried before `champion` moved)
    assert "serving check: PASSED: served and answered 6 canaries and 4 bad inputs" in text
    if gate.group(2) == "PROMOTED":
        served = step(text + "\n== ", SWITCH_STEP)
        assert f"serving drspot-classifier/{gate.group(1)}" in served, served
    assert re.search(r"^ total \d+s$", text, re.M)
    assert "drspot ui" in text and "drspot status" in text  # where to look: the project's own consoles
    return {"data_after": versions.group(2), "decision": gate.group(2)}


class UserPath:
    """The user's path, run once: the clone, the first demo, what the user then reads (`drspot status --json`, the
    alert file, the Bento folders), the second demo. Started by the session's first fixture (conftest: the two
    demos, about ten minutes, run beside the rest of the suite instead of after it); the test below reads what it
    recorded, in the order the user met it."""

    def __init__(self, top: Path) -> None:
        import threading

        self.top, self.seen, self.error = top, {}, None
        self.thread = threading.Thread(target=self._run, name="user-path", daemon=True)

    def _run(self) -> None:
        try:
            clone = self.seen["clone"] = make_clone(self.top)
            self.seen["demo-1"] = _demo_output(clone, "demo-1")
            drspot = str(clone / ".venv" / "bin" / "drspot")
            self.seen["status"] = _sh(drspot, "status", "--json", cwd=clone, env=user_env(clone))
            self.seen["alerts"] = (clone / ".drspot" / "alerts.jsonl").read_text()
            self.seen["in_bentos"] = list((clone / ".drspot" / "bentoml" / "bentos").glob("*/*/src/.drspot"))
            self.seen["demo-2"] = _demo_output(clone, "demo-2")
        except BaseException as e:  # noqa: BLE001 - said by the test, in the main thread
            self.error = e

    def result(self) -> dict:
        self.thread.join(timeout=2 * DEMO_TIMEOUT_S + 900)
        assert not self.thread.is_alive(), "the user's path did not finish in time"
        return self.seen


STARTED: list[UserPath] = []  # the run the session started early (tests/conftest.py), if it did


def start(top: Path) -> UserPath:
    run = UserPath(top)
    STARTED.append(run)
    run.thread.start()
    return run


@pytest.fixture(scope="module")
def user_path(tmp_path_factory) -> dict:
    run = STARTED[0] if STARTED else start(tmp_path_factory.mktemp("user-path"))
    return run.result() | {"error": run.error}


def demo(recorded: dict, name: str) -> str:
    """What ``drspot demo`` printed in the recorded run ``name`` (its failure, if it failed)."""
    if name not in recorded:
        raise recorded["error"] or AssertionError(f"{name} did not run")
    proc_rc, text = recorded[name]
    assert proc_rc == 0, f"drspot demo exited {proc_rc}; last lines:\n{text[-6000:]}"
    return text


def test_a_new_user_runs_the_demo_twice_in_a_fresh_clone(user_path):
    clone = user_path.get("clone")
    text = demo(user_path, "demo-1")
    assert "an earlier run's" not in text  # a fresh clone has no earlier run to move aside
    first = check_the_loop(text)
    if "status" not in user_path:
        raise user_path["error"]
    status = json.loads(user_path["status"])
    assert status["home"] == str(clone) and status["profile"] == "demo"
    log = status["prediction_log"]
    assert log["location"] == str(clone / ".drspot" / "predictions.db")
    assert log["predictions"] >= 2 * 120 and log["confirmed_waiting"] == 0, log
    # logged after the last monitor run (the quality step, after the confirmations): the 20 checks of a promotion
    assert log["since_last_monitor"] == (20 if f"] {SWITCH_STEP}" in text else 0), log
    assert status["monitor"]["last"]["status"] == "drift"
    assert status["retrain"]["last"]["status"] == "retrained"
    assert status["retrain"]["last"]["data_version"] == status["data"]["version"] == f"{first['data_after']}"
    # the default alert sink works for a new user: the drift and the gate decisions are there
    alerts = [json.loads(line) for line in user_path["alerts"].splitlines()]
    assert {"drift", "gate"} <= {a["kind"] for a in alerts}, alerts
    assert status["alerts"]["newest"] is not None
    # nothing logged inside a Bento's own folder
    assert not user_path["in_bentos"]

    again = demo(user_path, "demo-2")
    assert "an earlier run's registry, models, reports and prediction log were moved to" in again
    check_the_loop(again)
