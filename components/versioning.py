"""Data versions with DVC: ``dvc add`` / ``push`` and the md5 that names a dataset version.

DVC runs as a subprocess of the current interpreter (``python -m dvc``), so it inherits the
offline settings applied by :mod:`components.env` (no analytics process, project-local site cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml


class DvcError(RuntimeError):
    """A dvc command failed; the message holds its output."""


def dvc(*args: str, cwd: str | Path, echo: Callable[[str], None] | None = None, home: str | Path | None = None) -> str:
    """Run ``dvc ARGS`` in ``cwd`` and return its output.

    Args:
        echo: called with each output line as it arrives (a stage's progress), stdout and stderr merged.
        home: the state home handed to the stages' ``drspot`` commands (``$DRSPOT_HOME``), decided by the caller.

    Raises:
        DvcError: dvc exited non-zero (its stderr is in the message).
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    env = os.environ.copy()
    if home is not None:
        env["DRSPOT_HOME"] = str(home)
    if echo is None:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
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


def push(cwd: str | Path, remote: str | None = None) -> str:
    """``dvc push`` to the default (or named) remote; returns dvc's output."""
    return dvc("push", *(["-r", remote] if remote else []), cwd=cwd)


def default_remote(cwd: str | Path) -> str | None:
    """The name of the default DVC remote, or None when none is configured."""
    try:
        name = dvc("remote", "default", cwd=cwd).strip()
    except DvcError:
        return None
    return name or None
