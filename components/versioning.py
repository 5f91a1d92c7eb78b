"""Data versions with DVC: ``dvc add`` / ``push`` and the md5 that names a dataset version.

DVC runs as a subprocess of the current interpreter (``python -m dvc``), so it inherits the
offline settings applied by :mod:`components.env` (no analytics process, project-local site cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


class DvcError(RuntimeError):
    """A dvc command failed; the message holds its output."""


def dvc(*args: str, cwd: str | Path) -> str:
    """Run ``dvc ARGS`` in ``cwd`` and return its output.

    Raises:
        DvcError: dvc exited non-zero (its stderr is in the message).
    """
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=os.environ.copy(), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {cwd}:\n{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


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
