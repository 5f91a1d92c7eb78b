"""The ``monitor`` flow: drift of a prediction-log window against the serving model's training reference.

Writes the Evidently report (HTML + JSON) under ``monitor.reports``, logs the run to the MLflow
experiment ``monitoring``, publishes the markdown artifact ``drift-report``, and when drift is found
emits the Prefect event ``drspot.drift.detected`` (report location and scores in the payload), which
the retrain deployment is triggered by.
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from components.model import registry
from components.monitoring import alerts, quality, reference
from components.monitoring.monitor import monitor, save_summary, window_rows
from flows.policy import HOOKS, run_config
from infra.config import Config

DRIFT_EVENT = "drspot.drift.detected"


@lru_cache(maxsize=8)
def _model_files(version: str) -> dict[str, Any]:
    """What the monitor reads from a registered classifier version ("drspot-classifier/N"), downloaded once:
    its training reference (drift) and its performance reference (the label-free estimate; None if absent)."""
    import shutil

    name, _, number = version.rpartition("/")
    if name != registry.CLASSIFIER or not number.isdigit():
        raise ValueError(f"logged classifier version {version!r} is not a registry version (drspot-classifier/N)")
    folder = registry.download(name, number)
    try:
        return {
            "reference": reference.load(folder) if (folder / reference.REFERENCE).is_file() else None,
            "performance": quality.load_reference(folder),
        }
    finally:
        shutil.rmtree(folder.parent.parent, ignore_errors=True)


def _reference(version: str):
    """The training reference saved with a registered classifier version."""
    ref = _model_files(version)["reference"]
    if ref is None:
        raise FileNotFoundError(
            f"{version} has no monitoring reference (trained before references were saved); retrain it"
        )
    return ref


def _performance(version: str) -> dict[str, Any] | None:
    return _model_files(version)["performance"]


def emit_quality(q: dict[str, Any]) -> None:
    """``drspot.quality.degraded``: the label rule fired (it triggers the ``retrain/on-drift`` deployment too)."""
    r = q["rule"]
    emit_event(
        event=quality.QUALITY_EVENT,
        resource={"prefect.resource.id": "drspot.monitor", "prefect.resource.name": "drspot monitor"},
        payload={
            "report": q["report"],
            "classifier_version": r["version"],
            "reasons": [r["reason"]],
            **{k: r[k] for k in ("malignant_sensitivity", "malignant_sensitivity_95", "malignant_cases", "cases")},
        },
    )


def emit_drift(summary: dict[str, Any]) -> None:
    """The ``drspot.drift.detected`` event (the ``retrain/on-drift`` deployment is triggered by it)."""
    keys = ("report", "classifier_version", "reasons", "drifted")
    keys += ("share_image_features_drifted", "share_embedding_components_drifted")
    emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": "drspot.monitor", "prefect.resource.name": "drspot monitor"},
        payload={k: summary.get(k) for k in keys},
    )


def _markdown(s: dict[str, Any]) -> str:
    lines = [f"# Drift: {s['status']}", "", *[f"- {r}" for r in s.get("reasons", [])], ""]
    if "quality" in s:
        q, est = s["quality"], s["quality"]["estimate"]
        lines += [f"# Quality: {q['rule']['status']}", "", f"- {q['rule']['reason']}"]
        lines += [
            "- estimated without labels (CBPE): "
            + (", ".join(f"{k} {est[k]:.3f}" for k in quality.ESTIMATED if k in est) or est.get("note", "")),
            f"- report: `{q['report']}`",
            "",
        ]
    if "scores" in s:
        lines += [
            f"Window: {s['rows']['current']} predictions of {s['classifier_version']} vs the reference's "
            + " + ".join(f"{n} {part}" for part, n in s["rows"].get("reference_parts", {}).items())
            + f" images. Report: `{s['report']}`",
            "",
            "| feature | method | score | threshold | drifted |",
            "|---|---|---|---|---|",
        ]
        for col, v in sorted(s["scores"].items()):
            lines.append(
                f"| {col} | {v['method']} | {v['score']:.4g} | {v['threshold']} | {'yes' if v['drifted'] else ''} |"
            )
    return "\n".join(lines)


@flow(name="monitor", log_prints=True, **HOOKS)
def monitor_flow(
    since: str | None = None, last: int | None = None, profile: str | None = None, cfg: Config | None = None
) -> dict[str, Any]:
    """Compare the newest ``last`` predictions (or those ``since`` an ISO time) with the served model's reference.

    ``cfg`` is the run's resolved configuration (resolved here from ``profile`` when not given).
    """
    import mlflow
    from serving.store import PredictionLog

    cfg = run_config(cfg, profile)
    log = PredictionLog.from_config(cfg)
    when = dt.datetime.now(dt.UTC)
    out = cfg.resolve(cfg.monitor.reports) / when.strftime("%Y%m%dT%H%M%SZ")
    start = dt.datetime.fromisoformat(since) if since else None
    summary = monitor(cfg, log, _reference, out, since=start, last=last)
    q = quality.assess(cfg, log, _performance, out, window_rows(cfg, log, start, last))
    summary["quality"] = {k: q[k] for k in ("rule", "report", "confirmed_cases", "served_version")}
    summary["quality"]["estimate"] = q.get("estimate") or {"note": q.get("estimate_note")}
    save_summary(out, summary)
    cfg.write(out / "config.yaml")
    logger = get_run_logger()
    registry.use_experiment("monitoring")
    tags = {"status": summary["status"], "config_digest": cfg.digest(), "profile": cfg.profile}
    with mlflow.start_run(run_name=f"monitor-{when:%Y%m%dT%H%M%S}", tags=tags):
        mlflow.log_dict(cfg.as_dict(), "config/resolved.yaml")
        mlflow.log_metrics(
            {
                **quality.metrics(q),
                "rows": summary["rows"]["current"],
                "drift": float(summary["drift"]),
                **{
                    k: summary[k]
                    for k in ("share_image_features_drifted", "share_embedding_components_drifted")
                    if k in summary
                },
            }
        )
        mlflow.log_artifacts(str(out), artifact_path="drift")
    create_markdown_artifact(markdown=_markdown(summary), key="drift-report", description="drift monitoring")
    if q["rule"]["fired"]:
        emit_quality(q)
        alerts.send(cfg, "quality", q["rule"]["reason"], {"report": q["report"], **q["rule"]}, severity="error")
        logger.warning("QUALITY DROP: %s (event %s emitted)", q["rule"]["reason"], quality.QUALITY_EVENT)
    if summary["drift"]:
        emit_drift(summary)
        alerts.send(
            cfg,
            "drift",
            f"drift in the newest {summary['rows']['current']} predictions of {summary['classifier_version']}: "
            + "; ".join(summary["reasons"]),
            {k: summary.get(k) for k in ("report", "classifier_version", "drifted", "window")},
        )
        logger.warning("DRIFT: %s (event %s emitted)", "; ".join(summary["reasons"]), DRIFT_EVENT)
    else:
        logger.info("%s: %s", summary["status"], "; ".join(summary.get("reasons", [])) or "within the reference")
    return summary
