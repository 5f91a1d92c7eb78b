"""The offline and telemetry settings of every DrSpot entry point, applied in one place.

Importing :mod:`components` calls :func:`apply` before any heavy library is imported, so the CLI,
the tests, DVC stages (which run the CLI) and the BentoML service all run with the same settings.
Each library below was seen reaching for the network, or writing outside the project, without
its setting.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from infra.state import LIBRARY_HOMES, StatePaths

# Settings whose value does not depend on where the project lives.
FIXED: dict[str, str] = {
    "YOLO_OFFLINE": "1",  # ultralytics probes public DNS at import otherwise
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",  # else dvc forks a detached analytics process
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # a task run outside a flow (a DVC stage run by hand through its task) logs to the console only, without a
    # warning per line that the API could not take it
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "DO_NOT_TRACK": "1",
    # a tracking server that does not answer fails a call in seconds (MLflow's default: 7 retries, backoff 2: minutes)
    # the flows' own retry policy (flows/policy.py) decides whether the step is tried again
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    # the same for a Prefect server (Prefect's default: 5 retries backing off 2, 4, ... 32 s, a minute per call;
    # a server lost mid-run held `drspot train` 5 minutes before it ended in a traceback)
    "PREFECT_CLIENT_MAX_RETRIES": "2",
    "HF_HUB_OFFLINE": "1",  # timm would ask the Hugging Face hub for pretrained weights
    "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore::DeprecationWarning"),
}

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


HOME_ENV = "DRSPOT_HOME"
CODE = Path(__file__).resolve().parent.parent  # where this copy of the code sits (a checkout, a Bento, a package)


class StateError(RuntimeError):
    """DrSpot's state folder cannot be decided or used (not set where it must be, not writable, inside a Bento)."""


def is_checkout(folder: Path) -> bool:
    """A DrSpot project checkout (its pipeline and project file), as opposed to a Bento's or a package's copy."""
    return (folder / "dvc.yaml").is_file() and (folder / "pyproject.toml").is_file()


def project_root() -> Path:
    """The one folder DrSpot keeps its state in (the state home), decided here and nowhere else.

    ``$DRSPOT_HOME`` when set (``drspot serve`` hands it to the service, a Prefect worker or a container gets it
    by configuration); else the checkout this code runs from. Code that runs from anywhere else (a Bento, a
    container image, an installed package) has no home of its own: deriving one from the code's location would
    put the prediction log inside a folder that the next deploy replaces, so this refuses, naming the setting.

    Raises:
        StateError: no ``$DRSPOT_HOME`` and the code is not in a project checkout.
    """
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if is_checkout(CODE):
        return CODE
    raise StateError(
        f"DrSpot's code runs from {CODE}, which is not a project checkout (a Bento, a container or an installed "
        f"package): set {HOME_ENV} to the project folder that holds DrSpot's state (`drspot serve` does this)"
    )


def inside_code(path: str | Path) -> bool:
    """True when ``path`` lies inside a copy of the code that is not a checkout (a Bento's or a package's folder)."""
    return not is_checkout(CODE) and Path(path).expanduser().resolve().is_relative_to(CODE)


def check_home(home: Path | None = None) -> Path:
    """The state home, checked before any work starts: not inside a Bento or a package, and writable.

    Raises:
        StateError: naming the folder, what is wrong and the setting to give.
    """
    home = home or project_root()
    if inside_code(home):
        raise StateError(
            f"the state folder {home} ({HOME_ENV}) lies inside this copy of the code ({CODE}, a Bento or a "
            f"package), which a redeploy replaces: set {HOME_ENV} to the project folder"
        )
    try:
        state = StatePaths(home).dir
        state.mkdir(parents=True, exist_ok=True)
        probe = state / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        setting = HOME_ENV if os.environ.get(HOME_ENV) else f"{HOME_ENV} (default: the checkout)"
        raise StateError(
            f"the state folder {home} is not writable ({e.strerror or e}): set {setting} to a writable folder"
        ) from None
    return home


def unreachable(exc: BaseException) -> str | None:
    """A sentence naming the setting behind ``exc`` when it says a configured server did not answer (the MLflow
    tracking server, the Prefect API), else None."""
    text = str(exc)
    refused = ("Failed to establish a new connection", "Max retries exceeded", "Connection refused", "timed out")
    if type(exc).__name__ == "MlflowException" and any(t in text for t in refused):
        uri = os.environ.get("MLFLOW_TRACKING_URI", "(unset)")
        return f"the MLflow tracking server of MLFLOW_TRACKING_URI={uri} did not answer; is it running? ({text[:300]})"
    if "Failed to reach API at" in text:
        url = os.environ.get("PREFECT_API_URL", "(unset)")
        return f"the Prefect server of PREFECT_API_URL={url} did not answer; is it running? ({text[:300]})"
    if prefect_lost(exc):
        url = os.environ.get("PREFECT_API_URL", "(unset)")
        return (
            f"the Prefect server of PREFECT_API_URL={url} stopped answering during the run "
            f"({type(exc).__name__}: {text[:200]}); the steps that finished before keep their outputs "
            "(drspot status); run the command again once the server is back"
        )
    return None


def prefect_lost(exc: BaseException) -> bool:
    """``exc`` is a connection failure of Prefect's API client (a server that was there and went away)."""
    if type(exc).__module__.split(".")[0] not in ("httpx", "httpcore"):
        return False
    if not any(t in type(exc).__name__ for t in ("Connect", "Timeout", "RemoteProtocol", "ReadError")):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").startswith("prefect.client"):
            return True
        tb = tb.tb_next
    return False


def homes() -> dict[str, str]:
    """Environment variables that point each library at a project-local home."""
    return StatePaths(project_root()).library_homes()


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` (a shared server), else SQLite under ``mlflow/`` in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow' / 'mlflow.db'}"


def settings() -> dict[str, str]:
    """Every variable :func:`apply` sets, with the value it would set."""
    return {**FIXED, **homes()}


# what DrSpot sets for its own processes but never exports into a user's shell: they would change the user's other
# tools there (Python's warnings for every program, Hugging Face and Ultralytics offline, every tool's telemetry)
NOT_EXPORTED = {"PYTHONWARNINGS", "HF_HUB_OFFLINE", "YOLO_OFFLINE", "DO_NOT_TRACK"}


def exports() -> dict[str, str]:
    """What a shell needs so that ``prefect``, ``mlflow``, ``bentoml`` and ``dvc`` typed by hand see DrSpot's state:
    their homes and telemetry settings, the state home and the tracking store (``drspot env --export``); nothing
    that would change the shell's other tools (:data:`NOT_EXPORTED`)."""
    out = {k: os.environ.get(k) or v for k, v in settings().items() if k not in NOT_EXPORTED}
    out[HOME_ENV] = str(project_root())
    out["MLFLOW_TRACKING_URI"] = tracking_uri()
    for key in ("DRSPOT_DATABASE_URL", "PREFECT_API_URL", "DRSPOT_PARAMS"):
        if os.environ.get(key):
            out[key] = os.environ[key]
    return out


def close_prefect() -> None:
    """Flush Prefect's log and event workers and stop the temporary server it started, while the streams are open.

    Left to Prefect's own ``atexit`` hook, the server is stopped after the interpreter has closed the output
    stream, and its "Stopping temporary server" log line ends every command (and the test run) with a
    ``--- Logging error ---`` traceback.
    """
    if "prefect.server.api.server" not in sys.modules:
        return
    import logging

    from prefect.server.api.server import SubprocessASGIServer

    servers = [s for s in list(SubprocessASGIServer._instances.values()) if s.server_process is not None]
    if not servers:
        return
    for worker in ("prefect.logging.handlers:APILogWorker", "prefect.events.worker:EventsWorker"):
        module, name = worker.split(":")
        try:
            getattr(sys.modules[module], name).drain_all(timeout=5)
        except Exception:  # noqa: BLE001 - flushing is best effort; the server still stops
            pass
    logger = logging.getLogger("prefect")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the "Stopping temporary server" line is noise at the end of a command
    try:
        for server in servers:
            server.stop()
    finally:
        logger.setLevel(level)


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
    try:
        wanted = settings()
    except StateError:
        # no state home (a Bento run without DRSPOT_HOME): the fixed settings only; whatever needs the home
        # (the service, a command) asks for it and refuses with the reason
        wanted = dict(FIXED)
    for key, value in wanted.items():
        if force or not os.environ.get(key):
            os.environ[key] = value
    for key in set(LIBRARY_HOMES) & set(wanted):
        try:
            Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # an unwritable home: check_home() says so before any work starts
    # DVC stages run `drspot ...` through a shell: the interpreter's bin folder (the venv) first
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    # ultralytics reads its user config (settings.yaml, fonts) from $YOLO_CONFIG_DIR/Ultralytics
    if "YOLO_CONFIG_DIR" in os.environ:
        try:
            _install_fonts(Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics")
        except OSError:
            pass
    return {k: os.environ[k] for k in wanted}


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
