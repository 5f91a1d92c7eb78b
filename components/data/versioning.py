"""Data versions with DVC: ``dvc add`` / ``push`` and the md5 that names a dataset version.

DVC runs as a subprocess of the current interpreter (``python -m dvc``), so it inherits the
offline settings applied by :mod:`infra.env` (no analytics process, project-local site cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class DvcError(RuntimeError):
    """A dvc command failed; the message holds its output."""


def dvc(
    *args: str,
    cwd: str | Path,
    echo: Callable[[str], None] | None = None,
    home: str | Path | None = None,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``dvc ARGS`` in ``cwd`` and return its output.

    Args:
        echo: called with each output line as it arrives (a stage's progress), stdout and stderr merged.
        home: the state home handed to the stages' ``drspot`` commands (``$DRSPOT_HOME``), decided by the caller.
        timeout_s: stop dvc (and what it started) after this long (without ``echo`` only).
        env: variables set for dvc on top of this process's.

    Raises:
        DvcError: dvc exited non-zero (its stderr is in the message), or ran past ``timeout_s``.
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, **(env or {})}
    if home is not None:
        env["DRSPOT_HOME"] = str(home)
    if echo is None:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_tree(p)
            p.communicate()
            raise DvcError(f"`dvc {' '.join(args)}` did not finish within {timeout_s:g} s in {cwd}: stopped") from None
        except BaseException:
            _stop_tree(p)
            raise
        rc = p.returncode
    else:
        lines: list[str] = []
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in p.stdout:  # type: ignore[union-attr]
                lines.append(line)
                echo(line.rstrip())
            p.wait()
        except BaseException:  # the task's timeout, Ctrl-C: stop dvc and the stage command it runs, not just dvc
            _stop_tree(p)
            raise
        finally:
            p.stdout.close()  # type: ignore[union-attr]
        out, err, rc = "".join(lines), "".join(lines[-40:]), p.returncode
    if rc != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {cwd}:\n{err.strip() or out.strip()}")
    return out


def _stop_tree(p: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM ``p`` and every process under it (dvc and the stage command it runs), SIGKILL what is left after
    ``grace_s``."""
    import psutil

    try:
        procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def data_version(dvc_file: str | Path) -> str | None:
    """The md5 a ``.dvc`` file records for its output (the dataset version), or None if absent."""
    path = Path(dvc_file)
    if not path.is_file():
        return None
    meta = yaml.safe_load(path.read_text()) or {}
    outs = meta.get("outs") or []
    return outs[0].get("md5") if outs else None


def add(target: str | Path, cwd: str | Path) -> str:
    """``dvc add TARGET`` and return the new data version (md5 of the folder)."""
    dvc("add", "--quiet", str(target), cwd=cwd)
    version = data_version(Path(cwd) / f"{target}.dvc")
    if version is None:
        raise DvcError(f"dvc add {target} wrote no md5 into {target}.dvc")
    return version


# what a remote's error says, and what DrSpot tells the user instead
_REFUSED = ("(403)", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch", "access denied", "accessdenied")
_SILENT = ("read timeout", "connect timeout", "could not connect", "connection refused", "timed out", "reset by peer")


def remote_url(cwd: str | Path, name: str) -> tuple[str, str | None]:
    """(url, S3 endpoint or None) of the DVC remote ``name``."""
    url = dvc("remote", "list", cwd=cwd)
    found = dict(line.split(None, 1) for line in url.splitlines() if line.strip())
    try:
        endpoint = dvc("config", f"remote.{name}.endpointurl", cwd=cwd).strip() or None
    except DvcError:
        endpoint = None
    return found.get(name, "?").split()[0], endpoint


def push(cwd: str | Path, remote: str | None = None, timeout_s: float | None = None) -> str:
    """``dvc push`` to the default (or named) remote within ``timeout_s``; returns dvc's output.

    An S3 request is tried twice (``AWS_MAX_ATTEMPTS=2``, unless set), so a remote that does not answer fails within
    about ``2 x`` the remote's ``connect_timeout``/``read_timeout`` per request, and the whole push within
    ``timeout_s``. The error names the remote, its address and the settings to check: credentials refused, or no
    answer. A push is idempotent (content-addressed): running it again uploads only what is missing.

    Raises:
        DvcError: the push failed or ran past ``timeout_s``.
    """
    name = remote or default_remote(cwd) or "?"
    env = {"AWS_MAX_ATTEMPTS": os.environ.get("AWS_MAX_ATTEMPTS", "2")}
    try:
        return dvc("push", *(["-r", remote] if remote else []), cwd=cwd, timeout_s=timeout_s, env=env)
    except DvcError as e:
        text = str(e).lower()
        try:
            url, endpoint = remote_url(cwd, name)
        except DvcError:
            url, endpoint = "?", None
        where = f"the DVC remote '{name}' ({url}{f' at {endpoint}' if endpoint else ''})"
        if any(w in text for w in _REFUSED):
            raise DvcError(
                f"{where} refused the credentials (403): set them with `dvc remote modify --local {name} "
                f"access_key_id ...` / `secret_access_key ...` or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. "
                f"Nothing was pushed that a rerun would duplicate.\n{e}"
            ) from None
        if any(w in text for w in _SILENT) or "did not finish within" in text:
            raise DvcError(
                f"{where} did not answer (connection refused or timed out): is the object store running "
                f"(drspot stack status)? The files pushed so far stay; a rerun uploads only the rest.\n{e}"
            ) from None
        raise


def default_remote(cwd: str | Path) -> str | None:
    """The name of the default DVC remote, or None when none is configured."""
    try:
        name = dvc("remote", "default", cwd=cwd).strip()
    except DvcError:
        return None
    return name or None


def use_dvc_remote(root: Path, rec: dict[str, Any], name: str = "store") -> str:
    """Make the ``dvc`` bucket of the stack that ``rec`` (``drspot stack``'s record) describes the default DVC remote
    of the project ``root`` (credentials in ``.dvc/config.local``, never committed); returns the remote's URL."""
    url = "s3://dvc/store"
    dvc("remote", "add", "--force", "-d", name, url, cwd=root)
    # each value after "--": a generated secret may start with "-" (1 in 64), which dvc's argument parser took for an
    # option ("unrecognized arguments")
    dvc("remote", "modify", name, "endpointurl", "--", rec["services"]["object_store"]["endpoint"], cwd=root)
    # a store that stops answering fails a request in seconds, not botocore's 60 s per attempt
    dvc("remote", "modify", name, "connect_timeout", "--", "5", cwd=root)
    dvc("remote", "modify", name, "read_timeout", "--", "30", cwd=root)
    dvc("remote", "modify", "--local", name, "access_key_id", "--", rec["s3_key"], cwd=root)
    dvc("remote", "modify", "--local", name, "secret_access_key", "--", rec["s3_secret"], cwd=root)
    return url
