"""Where the files of a state home live: the one place that knows the layout of ``<home>/.drspot/``.

A state home is the project folder DrSpot keeps its state in (:func:`infra.env.project_root` decides which one);
:attr:`infra.config.Config.runtime` gives the paths of the run's own home (``cfg.at(root)`` moves all of them), so
no module spells ``.drspot`` itself. Files the configuration names (``serving.images_dir``, ``alerts.file``,
``serving.database_url``) resolve against the same home.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DIR = ".drspot"  # under the state home; git-ignored
STAGE_CONFIG = f"{DIR}/run/config.yaml"  # the resolved configuration dvc.yaml's stages read (relative to the home)

# library -> its home under .drspot/ (set for every process by infra.env.apply)
LIBRARY_HOMES = {
    "PREFECT_HOME": "prefect",
    "BENTOML_HOME": "bentoml",
    "DVC_SITE_CACHE_DIR": "dvc-site-cache",
    "YOLO_CONFIG_DIR": "ultralytics",
    "MPLCONFIGDIR": "matplotlib",
}


class StatePaths:
    """The paths of one state home's files. Nothing is created here: the code that writes a file makes its folder."""

    def __init__(self, home: str | Path) -> None:
        self.home = Path(home)
        self.dir = self.home / DIR

    def __repr__(self) -> str:
        return f"StatePaths({str(self.home)!r})"

    # -- the prediction log and what the service keeps
    @property
    def predictions_db(self) -> Path:
        """The SQLite prediction log when no database URL is configured."""
        return self.dir / "predictions.db"

    @property
    def deployed(self) -> Path:
        """What the last ``drspot deploy`` built (read by ``drspot serve``)."""
        return self.dir / "deployed.json"

    @property
    def deployed_config(self) -> Path:
        """The resolved configuration the last ``drspot deploy`` ran with: what ``drspot serve`` serves its Bento
        with unless told otherwise."""
        return self.dir / "deployed-config.yaml"

    @property
    def serve_logs(self) -> Path:
        """The logs of the Bento backends ``drspot serve`` starts."""
        return self.dir / "serve"

    def metrics(self, label: str, port: int) -> Path:
        """The Prometheus folder of one backend (``serving/backend.py``)."""
        return self.dir / "metrics" / f"{label}-{port}"

    @property
    def model_cache(self) -> Path:
        """``drspot predict``'s copies of the registry's champions."""
        return self.dir / "cache" / "models"

    # -- runs
    def run_config(self, name: str) -> Path:
        """A resolved configuration handed to a child process (``infra.config.hand_over``)."""
        return self.dir / "run" / f"{name}.yaml"

    @property
    def stage_config(self) -> Path:
        """The resolved configuration dvc.yaml's stages read."""
        return self.home / STAGE_CONFIG

    @property
    def retrain_lock(self) -> Path:
        """One retrain at a time per project (named by the project's path: a shared home stays unambiguous)."""
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:16]
        return self.dir / f"retrain-{digest}.lock"

    @property
    def previous(self) -> Path:
        """Where ``drspot demo`` moves an earlier run's state (never deleted)."""
        return self.dir / "previous"

    # -- servers DrSpot starts
    @property
    def stack(self) -> Path:
        """``drspot stack``: its record, credentials, logs and data."""
        return self.dir / "stack"

    @property
    def prefect_log(self) -> Path:
        """The local Prefect server ``drspot schedule`` starts."""
        return self.dir / "prefect-server.log"

    @property
    def ui_logs(self) -> Path:
        """The servers ``drspot ui`` starts."""
        return self.dir / "ui"

    @property
    def demo_serve_log(self) -> Path:
        return self.dir / "demo-serve.log"

    @property
    def demo_traffic(self) -> Path:
        """The photos ``drspot demo`` sends to its service."""
        return self.dir / "demo-traffic"

    def library_homes(self) -> dict[str, str]:
        """Environment variables that point each library at its home under this state home."""
        return {key: str(self.dir / sub) for key, sub in LIBRARY_HOMES.items()}
