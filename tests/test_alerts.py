"""Alerts (file, webhook to a real local receiver, failed sinks recorded, failed flows, the missed nightly run) and a
person's approval between the gate and the champion, on a real (throwaway) MLflow registry."""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from components.model import approval, registry
from components.monitoring import alerts
from flows.policy import HOOKS
from infra.config import load_config


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("DRSPOT_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return load_config("test").at(tmp_path)


@pytest.fixture
def receiver():
    """A real HTTP server on a free loopback port that keeps what it is sent."""
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/hook", got
    srv.shutdown()


def _with(cfg, **alert_keys):
    return cfg.model_copy(update={"alerts": cfg.alerts.model_copy(update=alert_keys)})


def test_an_alert_goes_to_the_file_and_the_webhook(cfg, receiver):
    url, got = receiver
    rec = alerts.send(_with(cfg, webhook_url=url), "drift", "drift in 200 predictions", {"drifted": ["blur"]})
    assert rec["delivery"]["webhook"] == "sent"
    assert got and got[0]["kind"] == "drift" and got[0]["text"] == "[DrSpot drift] drift in 200 predictions"
    assert got[0]["detail"] == {"drifted": ["blur"]}
    lines = (cfg.home / ".drspot" / "alerts.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["title"] == "drift in 200 predictions"
    assert alerts.recent(cfg)[-1]["kind"] == "drift"


def test_a_sink_that_fails_is_recorded_and_never_raises(cfg):
    from tests.serving_fixtures import free_port

    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    rec = alerts.send(
        _with(cfg, webhook_url=dead, prefect_blocks=["slack-webhook/missing"]), "gate", "v2 PROMOTED", severity="info"
    )
    assert rec["delivery"]["webhook"].startswith("failed: ConnectError") and dead in rec["delivery"]["webhook"]
    assert rec["delivery"]["block slack-webhook/missing"].startswith("failed:")
    assert alerts.recent(cfg)[-1]["delivery"]["webhook"].startswith("failed")
    # a kind left out of alerts.kinds is still recorded in the file, and nowhere else
    quiet = alerts.send(_with(cfg, kinds=["drift"], webhook_url=dead), "gate", "v3 rejected")
    assert "webhook" not in quiet["delivery"] and "recorded only" in quiet["delivery"]["all"]
    with pytest.raises(ValueError, match="unknown alert kind 'oops'"):
        alerts.send(cfg, "oops", "x")


def test_a_failed_flow_is_alerted_once_by_the_outermost_flow(cfg):
    from prefect import flow

    @flow(name="inner-that-fails", **HOOKS)
    def inner():
        raise RuntimeError("the disk is full")

    @flow(name="outer", **HOOKS)
    def outer():
        inner()

    with pytest.raises(RuntimeError):
        outer()
    failed = [a for a in alerts.recent(cfg) if a["kind"] == "flow_failed"]
    assert len(failed) == 1 and failed[0]["detail"]["flow"] == "outer" and failed[0]["severity"] == "error"
    assert "failed" in failed[0]["title"]


def test_the_nightly_run_that_did_not_happen(cfg):
    since = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)  # `drspot schedule` started then
    now = dt.datetime(2026, 11, 30, 6, 0, tzinfo=dt.UTC)  # 02:00 + 3 h grace has passed
    assert alerts.nightly_missed(cfg, since, now) == dt.datetime(2026, 11, 30, 2, 0, tzinfo=dt.UTC)
    # within the grace it is not missed yet: the one due is the day before, before the schedule started
    assert alerts.nightly_missed(cfg, since, dt.datetime(2026, 11, 30, 4, 0, tzinfo=dt.UTC)) is None
    out = cfg.home / "reports" / "retrain" / "20261130T020004Z"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"trigger": "nightly schedule", "at": "2026-11-30T02:00:04+00:00"}))
    assert alerts.nightly_missed(cfg, since, now) is None
    # a retrain by hand is not the nightly one
    assert alerts.nightly_missed(cfg, since, now + dt.timedelta(days=1)) is not None


def _versions(n: int) -> list[str]:
    c = registry.client()
    c.create_registered_model(registry.CLASSIFIER)
    return [str(c.create_model_version(registry.CLASSIFIER, f"file:///tmp/none/{i}").version) for i in range(n)]


def test_a_passing_challenger_waits_for_a_person_then_is_approved(cfg):
    from flows.console import decision
    from flows.train import promote_passing

    v1, v2, v3 = _versions(3)
    registry.set_champion(registry.CLASSIFIER, v1)
    required = cfg.model_copy(
        update={
            "gate": cfg.gate.model_copy(update={"approval": cfg.gate.approval.model_copy(update={"required": True})})
        }
    )
    r = {"kind": "classifier", "version": v2, "promote": True, "reason": "macro AUC 0.81 > 0.78"}
    promote_passing([r], required, None, None)
    assert (
        r["promote"] is False and decision(r) == "WAITING FOR APPROVAL" and registry.champion(registry.CLASSIFIER) == v1
    )
    assert f"drspot approve classifier {v2} --by NAME" in r["reason"]
    assert [w["version"] for w in approval.waiting("classifier")] == [v2]
    assert any(a["kind"] == "gate" and "waits for approval" in a["title"] for a in alerts.recent(cfg))
    # approving a version that is not the waiting challenger changes nothing
    with pytest.raises(
        approval.ApprovalError, match=f"v{v3} is not the challenger waiting for approval \\(v{v2} is\\)"
    ):
        approval.approve(cfg, "classifier", v3, "dr admin")
    with pytest.raises(approval.ApprovalError, match="say who approves"):
        approval.approve(cfg, "classifier", v2, " ")
    assert registry.champion(registry.CLASSIFIER) == v1
    approval.approve(cfg, "classifier", v2, "dr admin")
    assert registry.champion(registry.CLASSIFIER) == v2
    tags = registry.client().get_model_version(registry.CLASSIFIER, v2).tags
    assert tags["approval"] == "approved" and tags["approval.by"] == "dr admin"
    with pytest.raises(approval.ApprovalError, match="no drspot-classifier version waits for approval"):
        approval.approve(cfg, "classifier", v2, "dr admin")


def test_a_rejection_and_a_timeout_leave_the_champion(cfg):
    v1, v2, v3 = _versions(3)
    registry.set_champion(registry.CLASSIFIER, v1)
    approval.request(cfg, "classifier", v2, "better")
    approval.reject(cfg, "classifier", v2, "dr admin", "the new camera's cases look wrong")
    tags = registry.client().get_model_version(registry.CLASSIFIER, v2).tags
    assert tags["approval"] == "rejected" and tags["approval.reason"] == "the new camera's cases look wrong"
    req = approval.request(cfg, "classifier", v3, "better")
    later = dt.datetime.fromisoformat(req["deadline"]) + dt.timedelta(seconds=1)
    assert [w["version"] for w in approval.expire(cfg, now=later)] == [v3]
    assert registry.client().get_model_version(registry.CLASSIFIER, v3).tags["approval"] == "expired"
    assert registry.champion(registry.CLASSIFIER) == v1 and approval.waiting("classifier") == []
    assert any("was not approved by" in a["title"] and "timed out" in a["title"] for a in alerts.recent(cfg))
