"""Alerts: what needs a person's attention, delivered to sinks that work offline.

Kinds: ``drift`` (the monitor's verdict), ``quality`` (the label rule), ``gate`` (a promotion, a rejection, a
challenger waiting for approval, an approval or a rejection by a person, an approval that timed out),
``flow_failed`` (a DrSpot flow run failed or crashed: Prefect flow hooks), ``nightly_missed`` (the nightly retrain
did not run within ``alerts.nightly_grace_h`` of its cron time: the watchdog of ``drspot schedule``).

Every alert is (1) appended as one JSON line to ``alerts.file`` (default ``<home>/.drspot/alerts.jsonl``: always,
so nothing is lost when a network sink is down), (2) POSTed as JSON to ``alerts.webhook_url`` when one is set
(Slack's incoming webhooks take ``{"text": ...}``, which is included), (3) sent through each Prefect notification
block named in ``alerts.prefect_blocks`` (``slack-webhook/ops``, ``email-server-credentials/…``: anything with
``notify``; e-mail and Slack by configuration), and (4) emitted as the Prefect event ``drspot.alert.<kind>``, so
Prefect automations can act on it too. A sink that fails is recorded in the file line (``delivery``) and never
fails the flow that raised the alert.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
from pathlib import Path
from typing import Any

KINDS = ("drift", "quality", "gate", "flow_failed", "nightly_missed", "serving")
EVENT_PREFIX = "drspot.alert."


def alert_file(cfg) -> Path:
    return cfg.resolve(cfg.alerts.file)


def send(cfg, kind: str, title: str, detail: dict[str, Any] | None = None, severity: str = "warning") -> dict:
    """Raise one alert through every configured sink; returns the record as written (with ``delivery``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown alert kind {kind!r}; one of {', '.join(KINDS)}")
    a = cfg.alerts
    record: dict[str, Any] = {
        "at": dt.datetime.now(dt.UTC).isoformat(),
        "kind": kind,
        "severity": severity,
        "title": title,
        "detail": detail or {},
        "project": str(cfg.home),
        "registry": _registry(),  # the model registry it speaks of (`drspot status` counts this registry's only)
        "delivery": {},
    }
    if kind not in a.kinds:
        record["delivery"]["all"] = f"kind {kind!r} not in alerts.kinds: recorded only"
    else:
        if a.webhook_url:
            record["delivery"]["webhook"] = _webhook(a.webhook_url, record, a.timeout_s)
        for name in a.prefect_blocks:
            record["delivery"][f"block {name}"] = _block(name, record)
        record["delivery"]["event"] = _event(record)
    _append(alert_file(cfg), record)
    return record


def _registry() -> str:
    from infra.env import tracking_uri

    return tracking_uri()


def _text(record: dict[str, Any]) -> str:
    return f"[DrSpot {record['kind']}] {record['title']}"


def _webhook(url: str, record: dict[str, Any], timeout: float) -> str:
    import httpx

    try:
        r = httpx.post(url, json={**record, "text": _text(record)}, timeout=timeout)
        return "sent" if r.status_code < 300 else f"failed: HTTP {r.status_code} from {url}"
    except httpx.HTTPError as e:
        return f"failed: {type(e).__name__}: {e} ({url})"


def _block(name: str, record: dict[str, Any]) -> str:
    """A Prefect notification block by its ``type-slug/name`` (e.g. ``slack-webhook/ops``)."""
    try:
        from prefect.blocks.core import Block

        block = Block.load(name)
        block.notify(body=json.dumps(record["detail"], default=str)[:3000], subject=_text(record))
        return "sent"
    except Exception as e:  # noqa: BLE001 - any failure of a sink is recorded, never raised
        return f"failed: {type(e).__name__}: {str(e)[:300]}"


def _event(record: dict[str, Any]) -> str:
    try:
        from prefect.events import emit_event

        emit_event(
            event=EVENT_PREFIX + record["kind"],
            resource={"prefect.resource.id": "drspot.alerts", "prefect.resource.name": "drspot alerts"},
            payload={k: record[k] for k in ("title", "severity", "detail")},
        )
        return "emitted"
    except Exception as e:  # noqa: BLE001
        return f"failed: {type(e).__name__}: {str(e)[:300]}"


def _append(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, appended under an exclusive lock and flushed to disk (concurrent flows never interleave)."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def recent(cfg, n: int = 20) -> list[dict[str, Any]]:
    """The newest ``n`` alerts of the file sink, oldest first (a torn last line is skipped)."""
    path = alert_file(cfg)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[-n:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------- the nightly retrain that did not happen


def last_nightly(cfg) -> dt.datetime | None:
    """When the newest retrain started by the nightly schedule started (from its recorded summary)."""
    folder = cfg.resolve(cfg.paths.reports) / "retrain"
    newest = None
    for p in folder.glob("*/summary.json") if folder.is_dir() else []:
        try:
            s = json.loads(p.read_text())
        except ValueError:
            continue
        if s.get("trigger") == "nightly schedule" and s.get("at"):
            t = dt.datetime.fromisoformat(s["at"])
            newest = t if newest is None or t > newest else newest
    return newest


def nightly_missed(cfg, since: dt.datetime, now: dt.datetime | None = None) -> dt.datetime | None:
    """The nightly cron time (after ``since``, older than the grace) that has no retrain started after it, or None."""
    from zoneinfo import ZoneInfo

    from cronsim import CronSim

    now = now or dt.datetime.now(dt.UTC)
    tz = ZoneInfo(cfg.retrain.timezone)
    latest = (now - dt.timedelta(hours=cfg.alerts.nightly_grace_h)).astimezone(tz)
    due = next(iter(CronSim(cfg.retrain.cron, latest, reverse=True)))
    if due < since:
        return None
    ran = last_nightly(cfg)
    return None if ran is not None and ran >= due else due
