"""A person's approval between the gate and the champion (``gate.approval.required``).

A challenger that passed the gate and the serving check is not promoted: its model version is tagged
``approval=waiting`` with the champion it would replace, when it was asked and its deadline
(``gate.approval.timeout_h``), and a ``gate`` alert says so. Then exactly one of:

* ``drspot approve KIND VERSION --by NAME``: the version must be the one waiting (a version that is not, or
  whose deadline passed, or whose champion changed meanwhile, is refused and nothing changes); ``champion``
  moves to it, ``approval=approved`` with who and when, and the Bento is rebuilt (``retrain.deploy``) so a
  running ``drspot serve`` switches to it;
* ``drspot reject KIND VERSION --by NAME [--reason …]``: ``approval=rejected``;
* the deadline passes: the next ``drspot approve`` / ``reject`` / ``approvals`` / ``status`` or the
  ``drspot schedule`` watchdog tags it ``approval=expired`` (a rejection) and alerts.

State lives only in the registry's tags, so any machine with the tracking URI sees the same queue.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from components.model import registry
from components.monitoring import alerts

TAG = "approval"


class ApprovalError(ValueError):
    """An approval or rejection that cannot be done (nothing was changed)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def request(cfg, kind: str, version: str, reason: str) -> dict[str, Any]:
    """Hold ``version`` for a person's decision (tags, and a ``gate`` alert); returns the request."""
    name = registry.model_name(kind)
    asked = _now()
    deadline = asked + dt.timedelta(hours=cfg.gate.approval.timeout_h)
    champion = registry.champion(name)
    # a newer request replaces an older one still waiting: only the newest challenger can be approved
    for old in waiting(kind):
        if old["version"] != version:
            _tag(name, old["version"], {TAG: "superseded", f"{TAG}.superseded_by": version})
    _tag(
        name,
        version,
        {
            TAG: "waiting",
            f"{TAG}.requested_at": asked.isoformat(),
            f"{TAG}.deadline": deadline.isoformat(),
            f"{TAG}.champion_at_request": champion or "",
        },
    )
    alerts.send(
        cfg,
        "gate",
        f"{name} v{version} passed the gate and waits for approval until {deadline:%Y-%m-%d %H:%M} UTC "
        f"(drspot approve {kind} {version} --by NAME)",
        {"kind": kind, "version": version, "champion": champion, "reason": reason, "deadline": deadline.isoformat()},
        severity="info",
    )
    return {"kind": kind, "version": version, "deadline": deadline.isoformat(), "champion": champion}


def _tag(name: str, version: str, tags: dict[str, str]) -> None:
    c = registry.client()
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)


def waiting(kind: str) -> list[dict[str, Any]]:
    """Versions of ``kind`` tagged ``approval=waiting`` (newest first)."""
    name = registry.model_name(kind)
    out = []
    for mv in registry.client().search_model_versions(f"name='{name}' and tag.{TAG}='waiting'"):
        t = mv.tags
        out.append(
            {
                "kind": kind,
                "version": str(mv.version),
                "requested_at": t.get(f"{TAG}.requested_at"),
                "deadline": t.get(f"{TAG}.deadline"),
                "champion_at_request": t.get(f"{TAG}.champion_at_request") or None,
            }
        )
    return sorted(out, key=lambda w: int(w["version"]), reverse=True)


def expire(cfg, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Tag every waiting version past its deadline ``approval=expired`` (a rejection) and alert; returns them."""
    now = now or _now()
    gone = []
    for kind in ("classifier", "detector"):
        for w in waiting(kind):
            if w["deadline"] and dt.datetime.fromisoformat(w["deadline"]) <= now:
                name = registry.model_name(kind)
                _tag(name, w["version"], {TAG: "expired", f"{TAG}.decided_at": now.isoformat()})
                alerts.send(
                    cfg,
                    "gate",
                    f"{name} v{w['version']} was not approved by {w['deadline']}: rejected (approval timed out)",
                    w,
                )
                gone.append(w)
    return gone


def _the_waiting(cfg, kind: str, version: str | None) -> dict[str, Any]:
    expire(cfg)
    name = registry.model_name(kind)
    queue = waiting(kind)
    if not queue:
        raise ApprovalError(f"no {name} version waits for approval" + (f" (v{version} does not)" if version else ""))
    w = queue[0]
    if version is not None and str(version) != w["version"]:
        raise ApprovalError(f"{name} v{version} is not the challenger waiting for approval (v{w['version']} is)")
    return w


def approve(cfg, kind: str, version: str | None, by: str) -> dict[str, Any]:
    """Promote the waiting challenger (see the module's doc). Raises :class:`ApprovalError`, changing nothing."""
    if not by.strip():
        raise ApprovalError("say who approves (--by NAME)")
    w = _the_waiting(cfg, kind, version)
    name = registry.model_name(kind)
    now_champion = registry.champion(name)
    if now_champion != w["champion_at_request"]:
        raise ApprovalError(
            f"the champion of {name} changed since v{w['version']} was gated (v{w['champion_at_request']} -> "
            f"v{now_champion}): run the gate again (drspot promote {kind} --version {w['version']})"
        )
    registry.set_champion(name, w["version"])
    _tag(name, w["version"], {TAG: "approved", f"{TAG}.by": by.strip()[:200], f"{TAG}.decided_at": _now().isoformat()})
    alerts.send(cfg, "gate", f"{name} v{w['version']} approved by {by} and promoted to champion", w, severity="info")
    return {**w, "approved_by": by, "champion": w["version"]}


def reject(cfg, kind: str, version: str | None, by: str, reason: str = "") -> dict[str, Any]:
    if not by.strip():
        raise ApprovalError("say who rejects (--by NAME)")
    w = _the_waiting(cfg, kind, version)
    name = registry.model_name(kind)
    tags = {TAG: "rejected", f"{TAG}.by": by.strip()[:200], f"{TAG}.decided_at": _now().isoformat()}
    if reason:
        tags[f"{TAG}.reason"] = reason[:500]
    _tag(name, w["version"], tags)
    alerts.send(cfg, "gate", f"{name} v{w['version']} rejected by {by}" + (f": {reason}" if reason else ""), w)
    return {**w, "rejected_by": by}
