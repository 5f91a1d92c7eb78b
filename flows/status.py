"""``drspot status``: one screen that says where everything is and how it stands.

Everything is read, nothing is created: a store that does not exist yet is reported as such (asking MLflow about
a missing SQLite store, or the prediction log about a missing file, would create an empty one). Each part is
collected on its own, so one part that cannot be read (a server that does not answer) is reported in its line and
the others still show.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.config import Config

KEY_METRICS = {
    "classifier": ("macro_auc", "balanced_accuracy", "malignant_sensitivity", "malignant_specificity"),
    "detector": ("map50", "map50_95"),
}
PROBE_TIMEOUT_S = 2.0  # a server that does not answer within this is reported as not answering


def _part(fn, *args) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one unreadable part must not hide the others
        return {"error": f"{type(e).__name__}: {e}"[:400]}


def data_status(cfg: Config) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from components.data.manifest import MANIFEST
    from components.data.versioning import data_version

    data = cfg.resolve(cfg.paths.data)
    out: dict[str, Any] = {"path": str(data), "version": data_version(cfg.home / "data.dvc")}
    # pq.ParquetFile, not pq.read_table: the dataset API imports pandas (0.5 s of a 1-2 s status)
    if (data / MANIFEST).is_file():
        table = pq.ParquetFile(data / MANIFEST).read(columns=["label", "source"])
        out["images"] = table.num_rows
        out["by_source"] = dict(Counter(table.column("source").to_pylist()))
    split = cfg.resolve(cfg.paths.prepared) / data.name / "split" / "split.parquet"
    if split.is_file():
        splits = pq.ParquetFile(split).read(columns=["split"]).column("split").to_pylist()
        out["splits"] = {k or "held out": v for k, v in sorted(Counter(splits).items(), key=lambda kv: str(kv[0]))}
    return out


def models_status(cfg: Config) -> dict[str, Any]:
    from components.model import registry

    uri = registry.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return {"tracking_uri": uri, "note": "no registry yet (run `drspot train`)"}
    aliased = _sqlite_aliases(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    if aliased is None:
        aliased = _client_aliases(uri, [registry.model_name(k) for k in ("classifier", "detector")])
    out: dict[str, Any] = {"tracking_uri": uri}
    for kind in ("classifier", "detector"):
        name = registry.model_name(kind)
        entry: dict[str, Any] = {}
        for alias in ("champion", "challenger"):
            found = aliased.get((name, alias))
            if found is None:
                entry[alias] = None
                continue
            version, tags = found
            metrics = {k: float(tags[f"metric.{k}"]) for k in KEY_METRICS[kind] if f"metric.{k}" in tags}
            entry[alias] = {
                "version": str(version),
                "metrics": metrics,
                "profile": tags.get("profile"),  # the profile it was trained with
                "data_version": tags.get("data_version"),
                "gate": tags.get("gate.decision"),
                "gate_reason": tags.get("gate.reason"),
            }
        out[kind] = entry
    return out


Aliases = dict[tuple[str, str], tuple[str, dict[str, str]]]  # (model, alias) -> (version, its tags)


def _sqlite_aliases(path: str) -> Aliases | None:
    """Every alias of a SQLite registry with its version's tags, read-only with sqlite3: importing mlflow alone
    takes ~2 s, which would be most of `drspot status`. None when the tables are not MLflow 3's (the client
    then reads them)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            out: Aliases = {}
            for name, alias, version in con.execute("SELECT name, alias, version FROM registered_model_aliases"):
                rows = con.execute(
                    "SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?", (name, version)
                )
                out[(name, alias)] = (str(version), dict(rows.fetchall()))
            return out
        finally:
            con.close()
    except sqlite3.Error:
        return None


def _client_aliases(uri: str, names: list[str]) -> Aliases:
    """The champion and challenger of each model through the MLflow client (a tracking server, another store)."""
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    out: Aliases = {}
    for name in names:
        for alias in ("champion", "challenger"):
            try:
                mv = client.get_model_version_by_alias(name, alias)
            except MlflowException:
                continue
            out[(name, alias)] = (str(mv.version), dict(mv.tags))
    return out


def serving_status(cfg: Config) -> dict[str, Any]:
    import httpx

    state = cfg.runtime.deployed
    out: dict[str, Any] = {"deployed": json.loads(state.read_text()) if state.is_file() else None}
    if cfg.runtime.deployed_config.is_file():  # the configuration the Bento was deployed with (its first line)
        head = cfg.runtime.deployed_config.read_text().split("\n", 1)[0]
        out["deployed_profile"] = head.split("profile ", 1)[1].split(",")[0] if "profile " in head else None
    url = f"http://{cfg.serving.host}:{cfg.serving.port}"
    out["url"] = url
    try:
        r = httpx.get(f"{url}/readyz", timeout=PROBE_TIMEOUT_S)
        out["answering"] = True
        out["ready"] = r.status_code == 200
        out["readyz"] = r.json()
    except (httpx.HTTPError, ValueError):
        out["answering"] = False
    return out


def _latest(folder: Path) -> tuple[str, dict[str, Any]] | None:
    """The newest ``<time>/summary.json`` under ``folder`` (time-named folders sort by time)."""
    runs = sorted(p for p in folder.glob("*/summary.json")) if folder.is_dir() else []
    return (runs[-1].parent.name, json.loads(runs[-1].read_text())) if runs else None


def _when(stamp: str) -> dt.datetime:
    """A run folder's name (``20261130T063000Z`` or with microseconds) as a UTC time."""
    for fmt in ("%Y%m%dT%H%M%SZ", "%Y%m%dT%H%M%S%fZ"):  # seconds first: %S%f would split "43" into 4 s + 0.3 s
        try:
            return dt.datetime.strptime(stamp, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
    raise ValueError(f"not a run time: {stamp}")


def monitor_status(cfg: Config) -> dict[str, Any]:
    last = _latest(cfg.resolve(cfg.monitor.reports))
    if last is None:
        return {"last": None}
    stamp, s = last
    return {
        "last": {
            "at": _when(stamp).isoformat(),
            "newest_seen": (s.get("window") or {}).get("newest"),  # the newest prediction that run looked at
            "status": s["status"],
            "rows": s.get("rows", {}).get("current"),
            "reasons": s.get("reasons", []),
            "report": s.get("report"),
            "quality": (s.get("quality") or {}).get("rule", {}).get("status"),
        }
    }


def alerts_status(cfg: Config) -> dict[str, Any]:
    """The newest alerts about the registry in force: how many in the last 24 h, and the newest one; alerts about
    another registry (an earlier store, another tracking server) are only counted."""
    from components.monitoring import alerts
    from infra.env import tracking_uri

    uri = tracking_uri()
    recent = alerts.recent(cfg, 500)
    # an alert written before alerts named their registry counts as this project's
    ours = [a for a in recent if a.get("registry", uri) == uri and a.get("project", str(cfg.home)) == str(cfg.home)]
    day = dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)
    return {
        "file": str(alerts.alert_file(cfg)),
        "registry": uri,
        "last_24h": sum(dt.datetime.fromisoformat(a["at"]) >= day for a in ours),
        "newest": ours[-1] if ours else None,
        "other_registries": len(recent) - len(ours),
    }


def approvals_status(cfg: Config) -> dict[str, Any]:
    from components.model import approval

    if not cfg.gate.approval.required:
        return {"required": False, "waiting": []}
    approval.expire(cfg)
    return {"required": True, "waiting": approval.waiting("classifier") + approval.waiting("detector")}


def retrain_status(cfg: Config) -> dict[str, Any]:
    last = _latest(cfg.resolve(cfg.paths.reports) / "retrain")
    if last is None:
        return {"last": None}
    _, s = last
    keep = ("at", "trigger", "status", "reason", "new_cases", "data_version_before", "data_version", "deployed")
    gate = [
        {"kind": r["kind"], "version": r["version"], "promote": r["promote"], "reason": r["reason"]}
        for r in s.get("gate", [])
    ]
    return {"last": {**{k: s.get(k) for k in keep}, "gate": gate}}


def log_status(cfg: Config, since: str | None) -> dict[str, Any]:
    """The log's location and counts; ``since``: the newest prediction the last monitor run saw (ISO time)."""
    from components.monitoring import feedback
    from serving.store import PredictionLog, database_url, describe

    url = database_url(cfg)
    out: dict[str, Any] = {"location": describe(cfg)}
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        return {**out, "predictions": 0, "note": "nothing logged yet"}
    log = PredictionLog.from_config(cfg)
    try:
        out["predictions"] = log.count()
        if since:  # logged after the newest prediction the last monitor run looked at: not monitored yet
            out["since_last_monitor"] = log.count(dt.datetime.fromisoformat(since), after=True)
        cases, unusable = feedback.pending(log, cfg.resolve(cfg.paths.data))
        out["confirmed_waiting"] = len(cases)
        out["confirmed_unusable"] = len(unusable)
    finally:
        log.engine.dispose()
    return out


def schedule_status(cfg: Config) -> dict[str, Any]:
    """Deployments and their next runs, when a Prefect server answers (``PREFECT_API_URL`` or the local one)."""
    import httpx

    url = os.environ.get("PREFECT_API_URL") or "http://127.0.0.1:4200/api"
    try:
        httpx.get(f"{url}/health", timeout=PROBE_TIMEOUT_S).raise_for_status()
    except httpx.HTTPError:
        return {"server": url, "answering": False}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        deployments = {d.id: d for d in client.read_deployments()}
        flows = {f.id: f.name for f in client.read_flows()}
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    names = {i: f"{flows.get(d.flow_id, '?')}/{d.name}" for i, d in deployments.items()}
    nxt: dict[str, str] = {}  # the next run of each deployment (hourly runs would crowd out the nightly one)
    for r in runs:
        if r.expected_start_time:
            nxt.setdefault(names.get(r.deployment_id, "?"), r.expected_start_time.isoformat())
    return {
        "server": url,
        "answering": True,
        "deployments": sorted(names.values()),
        "next_runs": [{"deployment": k, "at": v} for k, v in sorted(nxt.items(), key=lambda kv: kv[1])],
    }


def collect(cfg: Config) -> dict[str, Any]:
    """Every part of the status, as plain data (``drspot status --json``)."""
    out: dict[str, Any] = {"home": str(cfg.home), "profile": cfg.profile, "config_digest": cfg.digest()}
    out["data"] = _part(data_status, cfg)
    out["models"] = _part(models_status, cfg)
    out["serving"] = _part(serving_status, cfg)
    out["monitor"] = _part(monitor_status, cfg)
    last = out["monitor"].get("last") or {}
    out["prediction_log"] = _part(log_status, cfg, last.get("newest_seen") or last.get("at"))
    out["retrain"] = _part(retrain_status, cfg)
    out["schedule"] = _part(schedule_status, cfg)
    out["alerts"] = _part(alerts_status, cfg)
    out["approvals"] = _part(approvals_status, cfg)
    return out


def _metrics(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in m.items()) or "no metrics"


def _model(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "none"
    trained = f"profile {entry['profile']}, " if entry.get("profile") else ""
    data = str(entry.get("data_version") or "unversioned")[:12]
    return f"v{entry['version']} ({trained}data {data}; {_metrics(entry['metrics'])})"


def when(stamp: str | None) -> str:
    """An ISO time as printed: to the second, in UTC (``2026-12-05 21:14:30 UTC``)."""
    if not stamp:
        return "-"
    t = dt.datetime.fromisoformat(stamp)
    t = t.astimezone(dt.UTC) if t.tzinfo else t
    return t.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if t.tzinfo else "")


Row = Callable[[str, str], None]


def _data(d: dict[str, Any], row: Row) -> None:
    """The dataset and its version."""
    counts = f"{d['images']} images" if "images" in d else "no dataset yet"
    splits = ", ".join(f"{k} {v}" for k, v in d.get("splits", {}).items())
    row("data", f"{d['path']}: version {d['version'] or 'unversioned'}; {counts}" + (f" ({splits})" if splits else ""))


def _models(m: dict[str, Any], row: Row) -> None:
    """Champions and challengers in the registry."""
    if "note" in m:
        row("models", f"{m['note']} ({m['tracking_uri']})")
        return
    for kind in ("classifier", "detector"):
        e = m[kind]
        text = f"champion {_model(e['champion'])}"
        ch = e["challenger"]
        if ch and (not e["champion"] or ch["version"] != e["champion"]["version"]):  # only a challenger that differs
            text += f"; challenger {_model(ch)}" + (f", gate {ch['gate']}" if ch.get("gate") else "")
        row(kind, text)
    row("registry", m["tracking_uri"])


def _serving(v: dict[str, Any], row: Row) -> None:
    """The deployed Bento and the service answering."""
    bento = (v["deployed"] or {}).get("bento") or "nothing deployed yet"
    if v.get("answering"):
        r = v.get("readyz", {})
        served = " + ".join((r.get("models") or {}).values()) or r.get("detail", "not ready")
        where = f"{v['url']} answering: {served} (profile {r.get('profile')}, data {r.get('data_version')})"
    else:
        where = f"no service answering at {v['url']}"
    deployed = f" (deployed with profile {v['deployed_profile']})" if v.get("deployed_profile") else ""
    row("serving", f"Bento {bento}{deployed}; {where}")


def _log(log: dict[str, Any], row: Row) -> None:
    """The prediction log and the confirmations waiting."""
    since = f", {log['since_last_monitor']} since the last monitor run" if "since_last_monitor" in log else ""
    row("log", f"{log['location']}: {log['predictions']} predictions{since}")
    if "confirmed_waiting" in log:
        row(
            "feedback",
            f"{log['confirmed_waiting']} confirmed case(s) waiting for the flywheel"
            + (f" ({log['confirmed_unusable']} not usable)" if log["confirmed_unusable"] else ""),
        )


def _monitor(mon: dict[str, Any], row: Row) -> None:
    """The last monitor run."""
    last = mon.get("last")
    if not last:
        row("monitor", "never run")
        return
    why = f": {last['reasons'][0]}" if last.get("reasons") else ""
    row("monitor", f"last run {when(last['at'])}: {last['status'].upper()} ({last['rows']} predictions){why}"[:240])
    if last.get("quality"):
        row("quality", f"model quality at that run: {last['quality'].upper()}")


def _retrain(rt: dict[str, Any], row: Row) -> None:
    """The last retrain."""
    last = rt.get("last")
    if not last:
        row("retrain", "never run")
        return
    from flows.console import decision

    gates = "; ".join(f"{g['kind']} v{g['version']} {decision(g).lower()}" for g in last["gate"])
    versions = f"data {last['data_version_before']} -> {last['data_version']}"
    row(
        "retrain",
        f"last run {when(last['at'])} ({last['trigger']}): {last['status']}; {versions}"
        + (f"; {gates}" if gates else ""),
    )


def _schedule(sc: dict[str, Any], row: Row) -> None:
    """The Prefect server and the next runs."""
    if not sc["answering"]:
        row("schedule", f"no Prefect server answering at {sc['server']} (start one: drspot schedule / drspot ui)")
        return
    nxt = ", ".join(f"{r['deployment']} at {when(r['at'])}" for r in sc["next_runs"][:4]) or "no runs scheduled"
    row("schedule", f"{sc['server']}: {len(sc['deployments'])} deployment(s); next: {nxt}")


def _approvals(ap: dict[str, Any], row: Row) -> None:
    """Challengers waiting for a person."""
    for w in ap["waiting"]:
        row(
            "approval",
            f"{w['kind']} v{w['version']} waits until {when(w['deadline'])}: "
            f"drspot approve {w['kind']} {w['version']} --by NAME",
        )


def _alerts(al: dict[str, Any], row: Row) -> None:
    """The newest alert."""
    others = f" ({al['other_registries']} about other registries not shown)" if al.get("other_registries") else ""
    if al["newest"]:
        n = al["newest"]
        row(
            "alerts",
            f"{al['last_24h']} in the last 24 h; newest {when(n['at'])} {n['kind']}: {n['title']}"[:240] + others,
        )
    else:
        row("alerts", f"none about this registry ({al['file']}){others}")


# (part of collect()'s result, its row's name when it could not be read, what prints it)
SECTIONS = (
    ("data", "data", _data),
    ("models", "models", _models),
    ("serving", "serving", _serving),
    ("prediction_log", "log", _log),
    ("monitor", "monitor", _monitor),
    ("retrain", "retrain", _retrain),
    ("schedule", "schedule", _schedule),
    ("approvals", "approval", _approvals),
    ("alerts", "alerts", _alerts),
)


def render(s: dict[str, Any]) -> tuple[str, list[list[str]]]:
    """The one screen of :func:`collect`: its title and its rows (name, text)."""
    lines: list[list[str]] = []

    def row(name: str, text: str) -> None:
        lines.append([name, text])

    for key, name, show in SECTIONS:
        part = s[key]
        if "error" in part:  # the models' error is a whole sentence already (a server that did not answer)
            row(name, part["error"] if key == "models" else f"unreadable: {part['error']}")
        else:
            show(part, row)
    row("command", f"resolved profile {s['profile']} (configuration {s['config_digest']}) for this status")
    return f"DrSpot status: state home {s['home']}", lines
