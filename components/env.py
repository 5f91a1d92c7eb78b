"""The offline and telemetry settings of every DrSpot entry point, applied in one place.

Importing :mod:`components` calls :func:`apply` before any heavy library is imported, so the CLI,
the tests, DVC stages (which run the CLI) and the BentoML service all run with the same settings.
Each library below was seen reaching for the network, or writing outside the project, without
its setting (see ``../shared/STACK.md``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Settings whose value does not depend on where the project lives.
FIXED: dict[str, str] = {
    "YOLO_OFFLINE": "1",  # ultralytics probes public DNS at import otherwise
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",  # else dvc forks a detached analytics process
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",  # timm would ask the Hugging Face hub for pretrained weights
    "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::DeprecationWarning"),
}

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def project_root() -> Path:
    """The folder DrSpot keeps its state in: ``$DRSPOT_HOME``, else the repository root."""
    env = os.environ.get("DRSPOT_HOME")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parent.parent


def runtime_dir() -> Path:
    """Project-local homes for the libraries (git-ignored)."""
    return project_root() / ".drspot"


def homes() -> dict[str, str]:
    """Environment variables that point each library at a project-local home."""
    rt = runtime_dir()
    return {
        "PREFECT_HOME": str(rt / "prefect"),
        "BENTOML_HOME": str(rt / "bentoml"),
        "DVC_SITE_CACHE_DIR": str(rt / "dvc-site-cache"),
        "YOLO_CONFIG_DIR": str(rt / "ultralytics"),
        "MPLCONFIGDIR": str(rt / "matplotlib"),
    }


def settings() -> dict[str, str]:
    """Every variable :func:`apply` sets, with the value it would set."""
    return {**FIXED, **homes()}


def _install_fonts(config_dir: Path) -> None:
    """Put a TTF named Arial.ttf where ultralytics' ``check_font`` looks, so it never downloads one.

    matplotlib ships DejaVuSans.ttf, which serves for plot labels.
    """
    missing = [n for n in _FONT_NAMES if not (config_dir / n).is_file()]
    if not missing:
        return
    import matplotlib  # a dependency of ultralytics; only imported the first time

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in missing:
        tmp = config_dir / f".{name}.tmp"
        shutil.copyfile(source, tmp)
        tmp.replace(config_dir / name)


def apply(force: bool = False) -> dict[str, str]:
    """Set the offline/telemetry variables and create the project-local homes.

    A variable the user already set wins (so a shared Prefect server or another BENTOML_HOME can be
    chosen by configuration), unless ``force``. Returns the settings now in force.
    """
    for key, value in settings().items():
        if force or not os.environ.get(key):
            os.environ[key] = value
    for key in homes():
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    # DVC stages run `drspot ...` through a shell: the interpreter's bin folder (the venv) first
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    # ultralytics reads its user config (settings.yaml, fonts) from $YOLO_CONFIG_DIR/Ultralytics
    _install_fonts(Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics")
    return {k: os.environ[k] for k in settings()}


def ultralytics():
    """Import ultralytics with its own MLflow logging and hub sync switched off.

    DrSpot logs to its own tracking store on purpose; with mlflow installed, ultralytics would
    otherwise log every training run to ``./mlflow.db`` in the working directory.
    """
    apply()
    import ultralytics as ul

    # ultralytics replaces PIL.Image.open process-wide with a version that, on a file Pillow cannot
    # identify, tries to pip-install pi-heif (network) and then raises ModuleNotFoundError instead of
    # UnidentifiedImageError, which breaks every caller's bad-image handling. Put Pillow's back.
    from PIL import Image
    from ultralytics.utils import SETTINGS, patches

    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original

    wanted = {"mlflow": False, "sync": False, "hub": False, "wandb": False, "tensorboard": False}
    wanted = {k: v for k, v in wanted.items() if k in SETTINGS and SETTINGS[k] != v}
    if wanted:
        SETTINGS.update(wanted)
    return ul
