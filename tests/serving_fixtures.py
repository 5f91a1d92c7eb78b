"""A deployed, running DrSpot service for the serving tests (module-scoped, real everything).

Trains a one-epoch classifier and detector on the test profile, registers both as champions in a
throwaway MLflow store, runs the real ``drspot deploy`` (Bento model store + Bento build) and the
real ``drspot serve`` on a free loopback port, with its own prediction log and image store.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serving.launch import Server, free_port  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-feedback-key-123"


def train_and_register(root: Path, synthetic_source: Path, cfg) -> dict[str, str]:
    from components.model import registry
    from components.model.evaluate import evaluate
    from components.model.train_classifier import train_classifier
    from components.model.train_detector import train_detector
    from tests.conftest import gated_dataset

    ds, split = gated_dataset(root, synthetic_source, cfg)
    train_classifier(split, ds, root / "clf", cfg, progress=lambda m: None)
    train_detector(split, ds, root / "det", cfg, progress=lambda m: None)
    ev = evaluate(root / "clf", split, ds, root / "eval", cfg, data_version="v-serving-test")
    tags = registry.lineage(cfg, split, "v-serving-test")
    c = registry.register("classifier", root / "clf", ev["metrics"], tags, root / "eval")
    import json

    d = registry.register(
        "detector", root / "det", json.loads((root / "det" / "detector_config.json").read_text())["metrics"], tags
    )
    registry.set_champion(registry.CLASSIFIER, c)
    registry.set_champion(registry.DETECTOR, d)
    return {"classifier": c, "detector": d, "dataset": str(ds)}


def service_env(root: Path, **extra: str) -> dict[str, str]:
    """A project at ``root`` (its own params.yaml) and the environment of a shell that points DrSpot at it with
    ``DRSPOT_HOME`` alone: the libraries' homes, the prediction log and the params are derived from that, as for
    a user (none of this test process's own settings are passed on)."""
    from tests.conftest import shell_env

    params = (ROOT / "params.yaml").read_text()
    params = params.replace("    store_images: false", "    store_images: true")
    params = params.replace("    detector_conf: null", "    detector_conf: 0.001")  # one-epoch detector
    # a one-epoch classifier is near-uniform once calibrated (top ~0.144 of 7 classes): report its classes and let
    # camera frames count at any confidence (the confidence rule itself: tests/test_stability.py)
    params = params.replace("    uncertain_below: 0.5", "    uncertain_below: 0.0")
    params = params.replace("      min_confidence: 0.6", "      min_confidence: 0.0")
    (root / "params.yaml").write_text(params)
    return shell_env(
        DRSPOT_HOME=str(root),
        DRSPOT_PROFILE="test",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        DRSPOT_FEEDBACK_API_KEY=API_KEY,
        **extra,
    )


def drspot(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "drspot"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
