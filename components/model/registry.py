"""The MLflow record: registration with lineage, the champion/challenger gate, promote, rollback.

Models are registered as pyfunc "models from code" (``components/model/mlflow_models``) whose artifacts
are the model folder (weights + resolved config): loading never unpickles a project class. Each
new version gets the alias ``challenger`` and lineage tags: the data version (the md5 in
``data.dvc``), the split manifest's hash (the frozen test set it was judged on), the git commit,
the Prefect flow-run id and the params hash.

The gate (TFX's "blessing", done with MLflow aliases): a challenger becomes ``champion`` only if,
on the same frozen test split, its primary metric is not worse than the champion's by more than
``gate.tolerance`` and its malignant sensitivity is at least ``gate.malignant_sensitivity_floor``;
the first model must clear ``gate.first_model_floors``. The decision and both sets of numbers are
tagged on the version. Promotion moves one alias in one call, and ``rollback`` only ever *moves*
``champion`` back, so once a champion exists no failure leaves the registry without one.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.model.slices import SLICE_TAG, slice_problem, slice_tags, tagged_slices
from infra.config import Config
from infra.env import project_root, tracking_uri  # noqa: F401  (tracking_uri: part of this module's API)

CLASSIFIER = "drspot-classifier"
DETECTOR = "drspot-detector"
CODE = Path(__file__).parent / "mlflow_models"
HISTORY_TAG = "champion_history"
EXPERIMENT = "drspot"
PIP = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm==1.0.31",
    "ultralytics==8.4.190",
    "mlflow==3.17.2",
    "pillow",
    "numpy",
]


def model_name(kind: str) -> str:
    """The registered model name of ``kind`` ("classifier" or "detector")."""
    return {"classifier": CLASSIFIER, "detector": DETECTOR}[kind]


class RegistryError(RuntimeError):
    """A registry operation cannot be done (no champion to roll back to, unknown version, ...)."""


def client():
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    use_experiment(EXPERIMENT)
    return MlflowClient(uri, uri)


def use_experiment(name: str) -> None:
    """Make ``name`` the active MLflow experiment, creating it with project-local artifacts if needed."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None:
        # a SQLite store keeps its artifacts beside the database (MLflow's default is ./mlruns in
        # whatever folder the process runs in); a tracking server decides for itself
        location = (
            (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri() if uri.startswith("sqlite:///") else None
        )
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "none")
    except Exception:
        return "none"


def lineage(cfg: Config, split_manifest: str | Path, data_version: str | None) -> dict[str, str]:
    return {
        "data_version": data_version or "unversioned",
        "manifest_hash": file_hash(split_manifest),
        "git_commit": git_commit(),
        "prefect_flow_run_id": flow_run_id(),
        "params_hash": cfg.digest(),
        "profile": cfg.profile,
    }


def start_tags(model_config: dict[str, Any]) -> dict[str, str]:
    """Where a trained model started and how long it trained, from its config: ``init`` (champion | model |
    pretrained | scratch), ``init.parent_version`` (the registered version it fine-tuned), ``epochs``."""
    init = model_config.get("init") or {"from": "pretrained" if model_config.get("pretrained") else "scratch"}
    out = {"init": str(init["from"]), "epochs": str(model_config.get("epochs_run", model_config.get("epochs", "")))}
    if init.get("version"):
        out["init.parent_version"] = str(init["version"])
    return out


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def register(
    kind: str,
    model_dir: str | Path,
    metrics: dict[str, Any],
    tags: dict[str, str],
    report_dir: str | Path | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Log a training run with the model and register it; the new version becomes ``challenger``.

    Returns the new version number.
    """
    import shutil
    import tempfile

    import mlflow

    name = model_name(kind)
    c = client()
    staging = Path(tempfile.mkdtemp(prefix="drspot-register-"))
    shutil.copytree(model_dir, staging / "model_dir", ignore=shutil.ignore_patterns("ultralytics", "checkpoint.pt"))
    model_dir = staging / "model_dir"
    cfg_file = model_dir / ("model_config.json" if kind == "classifier" else "detector_config.json")
    calibration = Path(report_dir) / "calibration.json" if report_dir else None
    if kind == "classifier" and calibration and calibration.is_file():
        # the evaluation's temperature and malignant threshold travel with the registered model
        merged = {**json.loads(cfg_file.read_text()), **json.loads(calibration.read_text())}
        cfg_file.write_text(json.dumps(merged, indent=2, sort_keys=True))
        shutil.copy(Path(report_dir) / "model_card.md", model_dir / "model_card.md")
        from components.monitoring.quality import PERFORMANCE_REFERENCE

        if (Path(report_dir) / PERFORMANCE_REFERENCE).is_file():  # the monitor's CBPE calibrates on it
            shutil.copy(Path(report_dir) / PERFORMANCE_REFERENCE, model_dir / PERFORMANCE_REFERENCE)
    tags = {
        **tags,
        **start_tags(json.loads(cfg_file.read_text())),
        "model_hash": file_hash(model_dir / ("model.pt" if kind == "classifier" else "detector.pt")),
    }
    evaluation = Path(report_dir) / "evaluation.json" if report_dir else None
    if kind == "classifier" and evaluation and evaluation.is_file():  # per-slice metrics, for the gate's slice rules
        tags.update(slice_tags(json.loads(evaluation.read_text()).get("slices", [])))
    active = mlflow.active_run()
    nesting = {"nested": True} if active is not None else {"parent_run_id": parent_run_id}
    with mlflow.start_run(run_name=f"register-{kind}", tags={**tags, "kind": kind}, **nesting):
        params = json.loads(cfg_file.read_text()).get("params", {})
        mlflow.log_params({k: str(v)[:250] for k, v in params.items()})
        mlflow.log_metrics(_finite(metrics))
        if report_dir and Path(report_dir).is_dir():
            mlflow.log_artifacts(str(report_dir), artifact_path="evaluation")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(CODE / f"{kind}_model.py"),
            artifacts={"model_dir": str(model_dir)},
            pip_requirements=PIP,
        )
    shutil.rmtree(staging, ignore_errors=True)
    # the version is created with its tags in one call: a process killed here leaves either no version or a
    # version that find_version() recognises by its model_hash, never an untagged twin (tests/test_retrain_resume.py)
    version_tags = {**tags, **{f"metric.{m}": str(x) for m, x in _finite(metrics).items()}}
    mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
    version = _first_of_twins(c, name, str(mv.version), mv.run_id, tags["model_hash"])
    c.set_registered_model_alias(name, "challenger", version)
    return version


def _first_of_twins(c, name: str, version: str, run_id: str, model_hash: str) -> str:
    """The version one ``register_model`` call created, once. MLflow's HTTP client retries a POST whose answer did
    not arrive (a 5xx, a read timeout: urllib3 with ``allowed_methods=None``), so a server that created the
    version and answered late gets the request again and creates a twin: the same run's model, the same weights.
    The first stays; its twins are deleted."""
    twins = sorted(
        int(v.version)
        for v in c.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if v.tags.get("model_hash") == model_hash
    )
    for extra in twins[1:]:
        c.delete_model_version(name, str(extra))
    return str(twins[0]) if twins else version


def find_version(name: str, model_hash: str) -> str | None:
    """The version whose weights have this sha256, if one is registered (a cached re-run)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name='{name}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise  # a server that did not answer is not "never registered" (the task's retry policy decides)
    hits = sorted((int(v.version) for v in versions if v.tags.get("model_hash") == model_hash), reverse=True)
    return str(hits[0]) if hits else None


def _tag_metrics(mv) -> dict[str, float]:
    return {k[len("metric.") :]: float(v) for k, v in mv.tags.items() if k.startswith("metric.")}


def champion(name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


@dataclass
class Decision:
    promote: bool
    reason: str
    challenger: dict[str, float]
    champion: dict[str, float] | None


def decide(
    kind: str,
    challenger: dict[str, float],
    champion_: dict[str, float] | None,
    cfg: Config,
    slices: tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]] | None] | None = None,
) -> Decision:
    """The gate, as a pure function of both models' test metrics (and, for the classifier, of their per-slice
    metrics on the same test split: ``slices`` = (challenger's, champion's or None))."""
    g = cfg.gate
    if kind == "detector":
        metric, tol, floors, sens_floor = (
            g.detector_metric,
            g.detector_tolerance,
            {g.detector_metric: g.detector_first_floor},
            None,
        )
    else:
        metric, tol, floors, sens_floor = (
            g.primary_metric,
            g.tolerance,
            g.first_model_floors,
            g.malignant_sensitivity_floor,
        )
    new = challenger.get(metric, float("nan"))
    if not math.isfinite(new):
        return Decision(False, f"challenger has no finite {metric}", challenger, champion_)
    if sens_floor is not None:
        sens = challenger.get("malignant_sensitivity", float("nan"))
        if not (sens >= sens_floor):
            return Decision(
                False, f"malignant sensitivity {sens:.4f} is below the floor {sens_floor}", challenger, champion_
            )
    if kind == "classifier" and slices is not None:
        problem = slice_problem(slices[0], slices[1] if champion_ is not None else None, cfg)
        if problem:
            return Decision(False, problem, challenger, champion_)
    if champion_ is None:
        low = {
            k: (challenger.get(k, float("nan")), v)
            for k, v in floors.items()
            if not challenger.get(k, float("nan")) >= v
        }
        if low:
            detail = ", ".join(f"{k} {got:.4f} < {need}" for k, (got, need) in low.items())
            return Decision(False, f"first model below the absolute floors: {detail}", challenger, None)
        return Decision(
            True,
            f"first model: clears the floors ({', '.join(f'{k} >= {v}' for k, v in floors.items())})",
            challenger,
            None,
        )
    old = champion_.get(metric, float("nan"))
    if new < old - tol:
        return Decision(
            False,
            f"{metric} {new:.4f} is worse than the champion's {old:.4f} by more than {tol}",
            challenger,
            champion_,
        )
    return Decision(True, f"{metric} {new:.4f} vs champion {old:.4f} (tolerance {tol})", challenger, champion_)


def _history(name: str) -> list[str]:
    rm = client().get_registered_model(name)
    return json.loads(rm.tags.get(HISTORY_TAG, "[]"))


def set_champion(name: str, version: str) -> None:
    c = client()
    history = [v for v in _history(name) if v != version] + [version]
    c.set_registered_model_alias(name, "champion", version)  # one call: never a moment without a champion
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def download(name: str, version: str, dst: str | Path | None = None) -> Path:
    """The registered model folder (weights + config) of ``name`` v``version``, downloaded."""
    import tempfile

    import mlflow

    client()
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="drspot-model-"))
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst))
    return Path(local) / "artifacts" / "model_dir"


def rejudge_key(split_manifest: str | Path) -> str:
    return f"rejudged.{file_hash(split_manifest)[:16]}"


def rejudge(kind: str, version: str, split_manifest: str | Path, dataset_dir: str | Path, cfg: Config) -> dict:
    """Score a registered version on ``split_manifest``'s frozen test split (tagged, so done once)."""
    import shutil

    name = model_name(kind)
    c = client()
    key = rejudge_key(split_manifest)
    done = c.get_model_version(name, version).tags.get(key)
    if done:
        return json.loads(done)
    folder = download(name, version)
    try:
        if kind == "classifier":
            from components.model.evaluate import score

            scored = score(folder, split_manifest, dataset_dir, cfg)
            metrics = _finite(scored.metrics)
            for k, v in slice_tags(scored.slices, f"{key}.{SLICE_TAG}").items():
                c.set_model_version_tag(name, version, k, v)
        else:
            from components.model.train_detector import score

            metrics = _finite(score(folder, split_manifest, dataset_dir, cfg))
    finally:
        shutil.rmtree(folder.parent.parent, ignore_errors=True)
    c.set_model_version_tag(name, version, key, json.dumps(metrics, sort_keys=True))
    return metrics


def gate_and_promote(
    kind: str,
    version: str,
    cfg: Config,
    split_manifest: str | Path | None = None,
    dataset_dir: str | Path | None = None,
    move: bool = True,
) -> Decision:
    """Run the gate for ``version`` against the current champion; promote it when it passes (and ``move``: the
    train and promote flows pass False and move the alias only after the serving check,
    :func:`flows.train.promote_passing`).

    Both models must be judged on the same frozen test split. When the champion was judged on
    another split manifest (the data changed since), it is re-judged on the challenger's one
    (``split_manifest`` with its ``dataset_dir``; the result is tagged on the champion's version).
    Without them, or when ``split_manifest`` is not the one the challenger was judged on, the gate
    refuses rather than compare unfairly.
    """
    name = model_name(kind)
    c = client()
    new_mv = c.get_model_version(name, version)
    current = champion(name)
    champ_metrics, champ_slices, note = None, None, ""
    if current is not None and current != version:
        champ_mv = c.get_model_version(name, current)
        wanted = new_mv.tags.get("manifest_hash")
        if champ_mv.tags.get("manifest_hash") == wanted:
            champ_metrics, champ_slices = _tag_metrics(champ_mv), tagged_slices(champ_mv.tags)
        elif split_manifest and dataset_dir and Path(split_manifest).is_file() and file_hash(split_manifest) == wanted:
            champ_metrics = rejudge(kind, current, split_manifest, dataset_dir, cfg)
            rejudged = c.get_model_version(name, current).tags
            champ_slices = tagged_slices(rejudged, f"{rejudge_key(split_manifest)}.{SLICE_TAG}")
            note = f"champion v{current} re-judged on the challenger's test split; "
        else:
            decision = Decision(
                False,
                f"champion v{current} was judged on another split manifest and the challenger's split manifest "
                f"(sha256 {str(wanted)[:12]}) is not available here to re-judge it; run the gate where it is "
                "(`drspot promote --dataset ...`)",
                _tag_metrics(new_mv),
                None,
            )
            _record(name, version, current, decision)
            return decision
    decision = decide(kind, _tag_metrics(new_mv), champ_metrics, cfg, (tagged_slices(new_mv.tags), champ_slices))
    decision.reason = note + decision.reason
    _record(name, version, current, decision)
    if decision.promote and move:
        set_champion(name, version)
    return decision


def record_serving_check(kind: str, version: str, check: dict[str, Any]) -> None:
    """The serving check's outcome on the model version; a failure turns the gate's decision into a rejection."""
    name = model_name(kind)
    c = client()
    c.set_model_version_tag(name, version, "serving_check.result", "passed" if check["passed"] else "failed")
    c.set_model_version_tag(name, version, "serving_check.reason", check["reason"][:5000])
    if check.get("served_config"):  # the configuration the candidate Bento was started with (profile, digest)
        c.set_model_version_tag(name, version, "serving_check.config", json.dumps(check["served_config"]))
    if not check["passed"]:
        c.set_model_version_tag(name, version, "gate.decision", "rejected")
        c.set_model_version_tag(name, version, "gate.reason", f"serving check failed: {check['reason']}"[:5000])


def _record(name: str, version: str, champion_version: str | None, d: Decision) -> None:
    c = client()
    for k, v in {
        "gate.decision": "promoted" if d.promote else "rejected",
        "gate.reason": d.reason,
        "gate.champion_version": champion_version or "none",
        "gate.challenger_metrics": json.dumps(d.challenger, sort_keys=True),
        "gate.champion_metrics": json.dumps(d.champion, sort_keys=True) if d.champion else "none",
    }.items():
        c.set_model_version_tag(name, version, k, v[:5000])


def rollback(kind: str) -> tuple[str, str]:
    """Move ``champion`` back to the previous champion. Returns (from version, to version).

    Raises:
        RegistryError: there is no previous champion (the current one stays).
    """
    name = model_name(kind)
    history = _history(name)
    current = champion(name)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    earlier = [v for v in history if v != current]
    if not earlier:
        raise RegistryError(f"{name} v{current} is the only champion there has been; nothing to roll back to")
    target = earlier[-1]
    c = client()
    c.set_registered_model_alias(name, "champion", target)
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(earlier))
    c.set_model_version_tag(name, current, "rolled_back_to", target)
    return current, target
