"""The ``train`` flow: prepare → train detector ∥ train classifier → evaluate → register → gate.

For the project dataset (``data/`` with ``dvc.yaml``) the training and evaluation steps are the DVC
stages ``train_classifier``, ``train_detector`` and ``evaluate``: with unchanged data, params and
code DVC skips them, the weights are byte-identical to a registered version, and the flow says that
nothing was trained instead of registering a duplicate. (DVC takes a repository lock, so in this
mode the two trainings run one after the other.) For any other dataset folder the tasks call the
components directly and the two trainings run concurrently.

Every MLflow run is tagged with the Prefect flow-run id and nested under one parent run; the gate's
decision with both sets of numbers is published as the markdown artifact ``train-gate``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.data.versioning import data_version
from components.model import registry
from components.monitoring import alerts
from flows.console import decision
from flows.policy import DECLARED, HOOKS, bound, checkpoint, run_config
from flows.prepare import prepare_flow, run_stage, stage_config, uses_dvc
from infra.config import Config


@task(name="train-classifier", **DECLARED)
def train_classifier_task(manifest: str, dataset: str, out: str, cfg: Config) -> str:
    from components.model.train_classifier import train_classifier

    train_classifier(manifest, dataset, out, cfg)
    return out


@task(name="train-detector", **DECLARED)
def train_detector_task(manifest: str, dataset: str, out: str, cfg: Config) -> str:
    from components.model.train_detector import train_detector

    train_detector(manifest, dataset, out, cfg)
    return out


@task(name="evaluate", **DECLARED)
def evaluate_task(model: str, manifest: str, dataset: str, out: str, detector: str, cfg: Config, version: str | None):
    from components.model.evaluate import evaluate

    return evaluate(model, manifest, dataset, out, cfg, detector_dir=detector, data_version=version)["metrics"]


@task(name="register-and-gate", **DECLARED)
def register_and_gate(
    kind: str,
    model_dir: str,
    metrics: dict,
    tags: dict,
    report: str | None,
    parent: str,
    cfg: Config,
    manifest: str,
    dataset: str,
):
    weights = Path(model_dir) / ("model.pt" if kind == "classifier" else "detector.pt")
    name = registry.model_name(kind)
    existing = registry.find_version(name, registry.file_hash(weights))
    if existing is not None and existing != registry.champion(name):
        # the same weights, rejected before: the gate runs again (its parameters may have changed)
        result = _gate(kind, existing, cfg, manifest, dataset)
        reason = f"nothing trained: these weights are already {name} v{existing}; gate: {result['reason']}"
        return {**result, "registered": False, "reason": reason}
    if existing is not None:
        return {
            "kind": kind,
            "version": existing,
            "registered": False,
            "promote": None,
            "reason": f"nothing trained: these weights are already {name} v{existing}",
            "champion": registry.champion(name),
        }
    version = registry.register(kind, model_dir, metrics, tags, report, parent_run_id=parent)
    return _gate(kind, version, cfg, manifest, dataset)


def _gate(kind: str, version: str, cfg, manifest: str | None, dataset: str | None) -> dict[str, Any]:
    """Run the gate on ``version`` and say what happened (the train and promote flows alike)."""
    name = registry.model_name(kind)
    before = registry.champion(name)
    d = registry.gate_and_promote(kind, version, cfg, manifest, dataset, move=False)
    return {
        "kind": kind,
        "version": version,
        "registered": True,
        "promote": d.promote,
        "reason": d.reason,
        "challenger": d.challenger,
        "champion_metrics": d.champion,
        "champion_before": before,
        "champion": registry.champion(name),
    }


def promote_passing(
    results: list[dict[str, Any]], cfg: Config, manifest: str | None, dataset: str | None
) -> dict[str, Any] | None:
    """Move ``champion`` to the versions the gate passed, once the pair they would serve in has passed the serving
    check (:mod:`serving.canary`; ``gate.serving_check``). A failed check moves nothing: the champions, and so
    the endpoint, stay as they were, and the reason goes on the versions and into the gate's artifact."""
    passing = [r for r in results if r["promote"]]
    if not passing:
        return None
    check = None
    if cfg.gate.serving_check.enabled:
        from serving import canary

        champions = {k: registry.champion(registry.model_name(k)) for k in ("classifier", "detector")}
        pair = {**champions, **{r["kind"]: r["version"] for r in passing}}
        missing = [k for k, v in pair.items() if v is None]
        if missing:
            check = {
                "passed": False,
                "reason": f"no {' or '.join(missing)} has passed the gate to serve beside it: nothing to serve it with",
            }
        elif not (manifest and dataset and Path(manifest).is_file()):
            check = {"passed": False, "reason": f"the serving check needs the frozen test split's photos ({manifest})"}
        else:
            print(f"serving check: building and starting {pair} on a free loopback port ...")
            check = canary.check_pair(pair, champions, cfg, manifest, dataset)
        print(f"serving check: {'PASSED' if check['passed'] else 'FAILED'}: {check['reason']}")
        for r in passing:
            registry.record_serving_check(r["kind"], r["version"], check)
    for r in passing:
        if (check is None or check["passed"]) and cfg.gate.approval.required:
            # a person decides (drspot approve / reject); the champion stays until then
            from components.model import approval

            r["approval"] = approval.request(cfg, r["kind"], r["version"], r["reason"])
            r["promote"] = False
            r["reason"] = (
                f"the gate passed it ({r['reason']}); waiting for approval until {r['approval']['deadline']} "
                f"(drspot approve {r['kind']} {r['version']} --by NAME)"
            )
        elif check is None or check["passed"]:
            registry.set_champion(registry.model_name(r["kind"]), r["version"])
        else:
            r["promote"] = False
            r["reason"] = f"the gate passed it ({r['reason']}) but the serving check failed: {check['reason']}"
        r["champion"] = registry.champion(registry.model_name(r["kind"]))
        r["serving_check"] = check
    return check


def alert_decisions(results: list[dict[str, Any]], cfg: Config) -> None:
    """A ``gate`` alert per decision on a newly registered version (a waiting one was alerted when it was asked)."""
    for r in results:
        if r.get("registered") and r["promote"] is not None and not r.get("approval"):
            alerts.send(
                cfg,
                "gate",
                f"{registry.model_name(r['kind'])} v{r['version']} {decision(r)}: {r['reason']}",
                {k: r.get(k) for k in ("kind", "version", "promote", "reason", "champion", "champion_before")},
                severity="info" if r["promote"] else "warning",
            )


def _markdown(results: list[dict[str, Any]], title: str = "Train: gate decisions") -> str:
    lines = [
        f"# {title}",
        "",
        "| model | version | decision | reason | champion now |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['kind']} | v{r['version']} | {decision(r)} | {r['reason']} | v{r['champion']} |")
    checks = {json.dumps(r["serving_check"], sort_keys=True) for r in results if r.get("serving_check")}
    for c in checks:
        c = json.loads(c)
        lines += ["", f"**serving check**: {'passed' if c['passed'] else 'FAILED'}: {c['reason']}"]
        if "latency_ms" in c:
            lines += [f"latency (ms per photo, in process): `{json.dumps(c['latency_ms'], sort_keys=True)}`"]
    for r in results:
        if r.get("challenger"):
            lines += ["", f"**{r['kind']} challenger**: `{json.dumps(r['challenger'], sort_keys=True)}`"]
            lines += [f"**{r['kind']} champion before**: `{json.dumps(r.get('champion_metrics'), sort_keys=True)}`"]
    return "\n".join(lines)


@flow(name="train", log_prints=True, **HOOKS)
def train_flow(
    dataset: str | None = None, profile: str | None = None, root: str | None = None, cfg: Config | None = None
) -> dict[str, Any]:
    """Prepare, train both models, evaluate, register and gate. Returns what happened.

    ``cfg`` is the run's resolved configuration (resolved here from ``profile`` when not given), handed to every
    task and, for the project dataset, written where the DVC stages read it; ``root`` moves the state home.
    """
    import mlflow

    cfg = run_config(cfg, profile, root)
    dataset = dataset or str(cfg.resolve(cfg.paths.data))
    prepared = prepare_flow(dataset, cfg=cfg)
    manifest = str(Path(prepared["prepared"]) / "split" / "split.parquet")
    models, reports = cfg.resolve(cfg.paths.models), cfg.resolve(cfg.paths.reports) / "evaluation"
    clf, det = str(models / "classifier"), str(models / "detector")
    version = data_version(cfg.home / "data.dvc")
    logger = get_run_logger()
    if uses_dvc(dataset, cfg):
        stage_config(cfg)
        steps = {s: run_stage(s, cfg) for s in ("train_classifier", "train_detector", "evaluate")}
        metrics = json.loads((reports / "evaluation.json").read_text())["metrics"]
    else:
        # submitted tasks run in threads, where a timeout takes effect only once the task returns (Prefect)
        a = bound(train_classifier_task, cfg, "train").submit(manifest, dataset, clf, cfg)
        b = bound(train_detector_task, cfg, "train").submit(manifest, dataset, det, cfg)
        a.result(), b.result()
        metrics = bound(evaluate_task, cfg, "evaluate")(clf, manifest, dataset, str(reports), det, cfg, version)
        steps = dict.fromkeys(("train_classifier", "train_detector", "evaluate"), "ran")
    if all(v in ("cached", "restored") for v in steps.values()):
        logger.info("data, params and code unchanged since a run DVC remembers: nothing trained")
    registry.client()
    tags = registry.lineage(cfg, manifest, version)
    with mlflow.start_run(run_name="train-flow", tags=tags) as parent:
        mlflow.log_dict(cfg.as_dict(), "config/resolved.yaml")  # the configuration this run used, as resolved
        mlflow.log_metrics({f"gate_input.{k}": float(v) for k, v in metrics.items() if v == v})
        det_metrics = json.loads((Path(det) / "detector_config.json").read_text())["metrics"]
        checkpoint("register")
        register = bound(register_and_gate, cfg, "registration")
        results = [
            register("classifier", clf, metrics, tags, str(reports), parent.info.run_id, cfg, manifest, dataset),
            register("detector", det, det_metrics, tags, None, parent.info.run_id, cfg, manifest, dataset),
        ]
        checkpoint("promote")
        promote_passing(results, cfg, manifest, dataset)
    alert_decisions(results, cfg)
    create_markdown_artifact(markdown=_markdown(results), key="train-gate", description="champion/challenger decisions")
    for r in results:
        print(f"{r['kind']}: v{r['version']} {r['reason']}; champion v{r['champion']}")
    return {
        "steps": steps,
        "results": results,
        "prepare": prepared["steps"],
        "prepared_dir": prepared["prepared"],
        "metrics": metrics,
    }


@flow(name="promote", log_prints=True, **HOOKS)
def promote_flow(
    kind: str = "classifier",
    version: str | None = None,
    profile: str | None = None,
    dataset: str | None = None,
    manifest: str | None = None,
    cfg: Config | None = None,
) -> dict[str, Any]:
    """The gate run by hand (``drspot promote``): the same decision and artifact as in ``train``."""
    cfg = run_config(cfg, profile)
    name = registry.model_name(kind)
    version = version or str(registry.client().get_model_version_by_alias(name, "challenger").version)
    result = _gate(kind, version, cfg, manifest, dataset)
    promote_passing([result], cfg, manifest, dataset)
    alert_decisions([result], cfg)
    create_markdown_artifact(
        markdown=_markdown([result], "Promote: gate decision"), key="promote-gate", description="gate decision"
    )
    return result
