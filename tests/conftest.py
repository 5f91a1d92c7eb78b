"""Shared fixtures. Tests run the real libraries on tiny data; ``../shared/data`` tests skip with
a reason when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The suite runs in a sandbox state home: no test reads or writes the checkout's own .drspot/ (the user's prediction
# log, alerts, locks and registry). Set before DrSpot is imported, since importing it points the libraries' homes
# at the state home. A test of a user's defaults runs its own shell without it (shell_env).
SANDBOX = Path(tempfile.mkdtemp(prefix="drspot-test-home-"))
os.environ["DRSPOT_HOME"] = str(SANDBOX)
for _var in ("DRSPOT_CONFIG", "DRSPOT_PROFILE", "DRSPOT_SET", "DRSPOT_PARAMS", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)

import components  # noqa: E402,F401  (offline settings, as for every entry point)
from infra.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DRSPOT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shell_env(**extra: str) -> dict[str, str]:
    """The environment of a new user's shell: none of DrSpot's or the libraries' variables (this test process set
    them for itself), the interpreter's venv first on PATH; ``extra`` on top (e.g. ``DRSPOT_HOME`` for isolation)."""
    keep = {"PATH", "HOME", "LANG", "TMPDIR", "DRSPOT_SHARED_DATA", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return {**env, **extra}


def shared(sub: str) -> Path:
    """A folder of ../shared/data, or skip the test saying what is missing."""
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (CI has ../shared beside the clone)")
    return path


def gated_dataset(root: Path, synthetic_source: Path, cfg) -> tuple[Path, Path]:
    """Ingest the synthetic source into ``root/ds`` and run the data gate into ``root/prep``.

    Returns (dataset folder, split manifest).
    """
    from components.data import gate
    from components.data.ingest import ingest

    ds, prep = root / "ds", root / "prep"
    ingest("synthetic", synthetic_source, ds, cfg)
    for step in (gate.run_validate, gate.run_dedup, gate.run_split):
        step(ds, prep, cfg)
    return ds, prep / "split" / "split.parquet"


@pytest.fixture(scope="session", autouse=True)
def _user_path_started_early(request, tmp_path_factory):
    """The user's path (tests/test_user_path.py: a fresh clone and two demos, about ten minutes of one process) starts
    with the session when it is selected, so that it runs beside the rest of the suite; its test reads the record."""
    if any(item.nodeid.startswith("tests/test_user_path.py") for item in request.session.items):
        from tests import test_user_path

        test_user_path.start(tmp_path_factory.mktemp("user-path"))
    yield


@pytest.fixture(scope="session")
def cfg():
    return load_config("test")


def _checkout_state() -> dict[str, int]:
    """The checkout's own state files (not the libraries' homes, which a test of a fresh shell's defaults creates)."""
    from infra.state import LIBRARY_HOMES, StatePaths

    state = StatePaths(ROOT).dir
    skip = {state / sub for sub in LIBRARY_HOMES.values()}
    if not state.is_dir():
        return {}
    return {
        str(p): p.stat().st_mtime_ns
        for p in state.rglob("*")
        if p.is_file() and not any(p.is_relative_to(s) for s in skip)
    }


@pytest.fixture(scope="session", autouse=True)
def _prefect_closed_while_output_is_open():
    """Stop Prefect's temporary server before pytest closes its streams (else the run ends on a logging traceback);
    then check that the suite left the checkout's own state home as it found it."""
    before = _checkout_state()
    yield
    from infra.env import close_prefect

    close_prefect()
    changed = sorted(k for k, v in _checkout_state().items() if before.get(k) != v)
    shutil.rmtree(SANDBOX, ignore_errors=True)
    assert not changed, f"the tests wrote into the checkout's own state home: {changed[:10]}"


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory, cfg):
    """A generated synthetic raw source on the `test` profile, with planted faults (read-only)."""
    from components.data.synthetic import Spec, generate

    out = tmp_path_factory.mktemp("synthetic") / "raw"
    generate(out, Spec.from_config(cfg))
    return out


@pytest.fixture
def drspot_cli():
    """Run the real `drspot` console script; returns the CompletedProcess."""
    exe = Path(sys.executable).parent / "drspot"

    def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)

    return run


@pytest.fixture
def git_dvc_repo(tmp_path):
    """An empty git + DVC project with a local remote, like a fresh clone of DrSpot."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    from components.data.versioning import dvc

    dvc("init", "-q", cwd=tmp_path)
    dvc("remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=tmp_path)
    return tmp_path


@pytest.fixture
def copytree(tmp_path):
    def copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def dvc_project(git_dvc_repo, cfg, synthetic_source):
    """A fresh clone-like project: params, dvc.yaml, the stages' code deps, data/ added (flows run it with the
    `test` profile, which they write where the stages read it)."""
    from components.data.ingest import ingest
    from components.data.versioning import dvc

    root = git_dvc_repo
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "components", root / "components")
    ingest("synthetic", synthetic_source, root / "data", cfg)
    dvc("add", "data", cwd=root)
    return root


@pytest.fixture(scope="session")
def deployed(tmp_path_factory, synthetic_source):
    """Champions trained, registered and deployed by the real `drspot deploy` (tests/serving_fixtures.py)."""
    from infra.config import load_config
    from tests.serving_fixtures import drspot, service_env, train_and_register

    root = tmp_path_factory.mktemp("serving")
    env = service_env(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    versions = train_and_register(root, synthetic_source, load_config("test"))
    mp.undo()
    out = drspot("deploy", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    yield {"root": root, "env": env, "versions": versions, "deploy_stdout": out.stdout}


@pytest.fixture(scope="session")
def server(deployed):
    """The deployed Bento served by the real `drspot serve` on a free loopback port."""
    from tests.serving_fixtures import Server

    s = Server(deployed["env"], deployed["root"] / "serve.log")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def confident(server, deployed) -> tuple[bytes, dict]:
    """The photo of the test set that the served one-epoch model names most clearly (the widest margin between its
    first and second class) without abstaining, and its /predict answer, for the frame and camera tests."""
    import httpx

    best, seen = None, []
    for path in sorted((deployed["root"] / "ds" / "images").glob("*.jpg"))[:80]:
        data = path.read_bytes()
        r = httpx.post(f"{server.url}/predict", files={"image": ("x.jpg", data, "image/jpeg")}, timeout=60)
        if r.status_code != 200:  # the set's planted corrupt and tiny files
            continue
        answer = r.json()
        top = max(answer["lesions"], key=lambda les: les["malignant_probability"])
        first, second = sorted(top["probabilities"].values(), reverse=True)[:2]
        seen.append((answer["abstain"], round(first, 3)))
        if answer["abstain"] is None and (best is None or first - second > best[0]):
            best = (first - second, data, answer)
    if best is None:
        pytest.fail(f"the test model abstained on every photo of the test set: {seen}")
    return best[1], best[2]


@pytest.fixture(scope="session")
def gated(tmp_path_factory, synthetic_source, cfg) -> tuple[Path, Path]:
    """The synthetic source ingested and through the data gate once: (dataset, split manifest), for tests that
    only read them (training writes elsewhere)."""
    return gated_dataset(tmp_path_factory.mktemp("gated"), synthetic_source, cfg)
