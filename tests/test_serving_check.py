"""The serving check before promotion (serving/canary.py), for real: `drspot promote` builds the candidate pair
into a Bento, starts it on a free loopback port, sends the canaries and compares with the registered model.
A broken candidate leaves the champion and the running endpoint as they were, with the reason recorded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def registry_env(deployed, monkeypatch):
    from components.model import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", deployed["env"]["MLFLOW_TRACKING_URI"])
    before = registry.champion(registry.CLASSIFIER)
    yield registry
    registry.set_champion(registry.CLASSIFIER, before)  # the shared fixture keeps its champion


def _candidate(deployed, registry, folder) -> str:
    """``folder`` registered as a new classifier version with the trained model's own test metrics (the champion's
    or better: the gate passes it)."""
    from infra.config import load_config

    root = deployed["root"]
    metrics = json.loads((root / "eval" / "evaluation.json").read_text())["metrics"]
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    metrics["macro_auc"] = 1.0  # above any champion the other tests registered
    tags = registry.lineage(load_config("test"), root / "prep" / "split" / "split.parquet", "v-serving-test")
    return registry.register("classifier", folder, metrics, tags, root / "eval")


def _promote(deployed, version: str, profile: str | None = None) -> subprocess.CompletedProcess:
    """``drspot promote``; with ``profile``, as ``drspot --profile PROFILE promote`` and no DRSPOT_PROFILE set."""
    from tests.serving_fixtures import drspot

    root = deployed["root"]
    env = {**deployed["env"], "DRSPOT_SET": "gate.serving_check.enabled=true"}
    args = ("promote", "--version", version, "--dataset", str(root / "ds"), "--prepared", str(root / "prep"))
    if profile:
        env.pop("DRSPOT_PROFILE", None)
        args = ("--profile", profile, *args)
    return drspot(*args, env=env)


def test_a_candidate_whose_weights_do_not_load_is_not_promoted(deployed, server, registry_env, tmp_path):
    registry = registry_env
    champion = registry.champion(registry.CLASSIFIER)
    served = httpx.get(f"{server.url}/readyz").json()["models"]
    broken = tmp_path / "broken"
    shutil.copytree(deployed["root"] / "clf", broken)
    (broken / "model.pt").write_bytes(b"these are not weights" * 100)
    v = _candidate(deployed, registry, broken)
    out = _promote(deployed, v)
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "serving check: FAILED: the candidate did not start" in out.stdout + out.stderr
    assert f"drspot-classifier v{v}: REJECTED: the gate passed it" in out.stdout
    assert registry.champion(registry.CLASSIFIER) == champion  # nothing moved
    tags = registry.client().get_model_version(registry.CLASSIFIER, v).tags
    assert tags["serving_check.result"] == "failed" and tags["gate.decision"] == "rejected"
    assert "did not start" in tags["serving_check.reason"] and "did not start" in tags["gate.reason"]
    # the running endpoint still answers, with the models it had
    assert httpx.get(f"{server.url}/readyz").json()["models"] == served


def test_a_bento_that_does_not_serve_what_was_registered_is_not_promoted(deployed, server, registry_env):
    """The Bento model store already holds a copy of the candidate (same registry version and weights hash) whose
    calibration was altered: the Bento serves it, and its answers disagree with the registered model."""
    registry = registry_env
    champion = registry.champion(registry.CLASSIFIER)
    v = _candidate(deployed, registry, deployed["root"] / "clf")
    tamper = (
        "import json, pathlib, components; from serving.deploy import to_bento_store; import bentoml;"
        "from infra.config import load_config;"
        f"tag, _ = to_bento_store('classifier', load_config(), '{v}');"
        "p = pathlib.Path(bentoml.models.get(tag).path) / 'model_config.json';"
        "c = json.loads(p.read_text()); c['temperature'] = c.get('temperature', 1.0) * 3; p.write_text(json.dumps(c))"
    )
    done = subprocess.run([sys.executable, "-c", tamper], env=deployed["env"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = _promote(deployed, v)
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "serving check: FAILED: served probabilities differ from the registered model's by" in said
    assert registry.champion(registry.CLASSIFIER) == champion
    reason = registry.client().get_model_version(registry.CLASSIFIER, v).tags["serving_check.reason"]
    assert "the Bento does not serve what was registered" in reason


def test_a_sound_candidate_passes_and_becomes_champion(deployed, registry_env, tmp_path):
    registry = registry_env
    v = _candidate(deployed, registry, deployed["root"] / "clf")
    out = _promote(deployed, v, profile="test")  # the profile named on the command line, not by the environment
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(x for x in (out.stdout + out.stderr).splitlines() if "serving check: PASSED" in x)
    assert "served and answered 6 canaries and 4 bad inputs as the contract says; probabilities within" in line
    assert registry.champion(registry.CLASSIFIER) == v
    tags = registry.client().get_model_version(registry.CLASSIFIER, v).tags
    assert tags["serving_check.result"] == "passed" and tags["gate.decision"] == "promoted"
    # latency measured against the champion in the same check (same weights here: about 1x)
    assert "champions' latency" in line
    ratio = float(line.split("probabilities within ")[1].split(", ")[1].split("x")[0])
    assert 0.2 < ratio < 5, line
    assert json.loads(json.dumps(tags))  # plain strings, readable by any MLflow client
    # the candidate Bento ran with the promotion's own configuration (profile test), which it checked by digest,
    # not one re-loaded from DRSPOT_PROFILE or the demo default
    served = json.loads(tags["serving_check.config"])
    assert served["profile"] == "test" and served["runtime"] == "torch", served
    assert f"served under profile test (configuration {served['config_digest']}, runtime torch)" in line
