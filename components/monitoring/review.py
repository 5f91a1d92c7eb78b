"""The review queue: which logged predictions a reviewer's confirmation would teach the model most.

Every unconfirmed prediction whose photo was stored (a confirmation without the photo cannot reach training) gets a
score, the sum of four parts, each in [0, 1]:

* ``uncertainty``: how far the reported lesion's top probability is from certainty, 1 at a uniform answer
  ((1 - p_top) / (1 - 1/K));
* ``near_threshold``: how close its malignant probability is to the served model's malignant threshold, 1 on it
  and 0 at ``NEAR`` or further (the cases where a wrong call flips the referral);
* ``ood``: its OOD score as a share of the OOD threshold, capped at 1 (an unusual photo: new camera, new site);
* ``disagreement``: 1 when the photo was analysed with and without colour correction (``compare``) and the two
  answers named different classes.

Ties go to the newest. Each item lists the parts that weigh at least 0.5 as its reasons.

The queue is a mix, not the top scores alone (``monitor.review``): the 1,000 Barcelona photos the HAM10000 champion
was least sure of taught it less than 1,000 random ones (balanced accuracy 0.41 vs 0.46), because the least sure
photos are alike (one or two confusions of one kind). So the scored items are dealt round-robin over the predicted
classes (``balance_classes``: each class's best first), and a ``random_share`` of the queue is drawn uniformly from
the unconfirmed photos considered (seeded by their ids: the same log gives the same queue), marked ``random: true``
and "random sample" as their reason, which keeps the labels the flywheel collects a picture of the traffic.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from components.monitoring.quality import reported

NEAR = 0.2  # malignant probability this far from the threshold or further: no "near the threshold" weight
REASON_AT = 0.5


def parts(row: dict[str, Any], threshold: float, ood_threshold: float | None) -> dict[str, float]:
    les = reported(row)
    probs = les.get("probabilities") or {}
    k = max(2, len(probs))
    top = max(probs.values()) if probs else float(row.get("confidence") or 1.0)
    p_mal = float(les.get("malignant_probability", row.get("malignant_probability") or 0.0))
    ood_score = les.get("ood_score")
    variants = row.get("variants") or {}
    return {
        "uncertainty": round(min(1.0, max(0.0, (1 - top) / (1 - 1 / k))), 4),
        "near_threshold": round(max(0.0, 1 - abs(p_mal - threshold) / NEAR), 4),
        "ood": round(min(1.0, float(ood_score) / ood_threshold), 4) if ood_score is not None and ood_threshold else 0.0,
        "disagreement": 1.0 if len(set(variants.values())) > 1 else 0.0,
    }


def why(p: dict[str, float], row: dict[str, Any], threshold: float) -> list[str]:
    les = reported(row)
    text = {
        "uncertainty": lambda: f"uncertain: top probability {max((les.get('probabilities') or {'': 1}).values()):.2f}",
        "near_threshold": lambda: (
            f"malignant probability {les.get('malignant_probability', 0):.2f} near the threshold {threshold:.2f}"
        ),
        "ood": lambda: f"unusual photo: OOD score {les.get('ood_score', 0):.2f}",
        "disagreement": lambda: (
            "colour correction changed the answer ("
            + ", ".join(f"{k}: {v}" for k, v in (row.get("variants") or {}).items())
            + ")"
        ),
    }
    return [text[k]() for k, v in p.items() if v >= REASON_AT]


def _item(r: dict[str, Any], threshold: float, ood_threshold: float | None) -> dict[str, Any]:
    p = parts(r, threshold, ood_threshold)
    les = reported(r)
    return {
        "request_id": r["request_id"],
        "created_at": r["created_at"].isoformat() if r.get("created_at") else None,
        "score": round(sum(p.values()), 4),
        "parts": p,
        "reasons": why(p, r, threshold) or ["nothing stands out"],
        "label": r.get("label"),
        "confidence": float(r.get("confidence") or 0.0),
        "malignant_probability": float(r.get("malignant_probability") or 0.0),
        "box": les.get("box"),
        "classifier_version": r.get("classifier_version"),
        "random": False,
    }


def _balanced(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` (best first) dealt round-robin over their predicted classes, each class's best first."""
    by: dict[str, list[dict[str, Any]]] = {}
    for it in items:
        by.setdefault(str(it["label"]), []).append(it)
    queues = list(by.values())  # in the order of each class's best item
    out: list[dict[str, Any]] = []
    while queues:
        out += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    return out


def rank(
    rows: list[dict[str, Any]],
    threshold: float,
    ood_threshold: float | None,
    limit: int,
    random_share: float = 0.0,
    balance_classes: bool = False,
) -> list[dict]:
    """The queue of ``limit`` items from ``rows``: ``random_share`` of them drawn at random, the rest by score (best
    first; dealt over the predicted classes with ``balance_classes``)."""
    items = [_item(r, threshold, ood_threshold) for r in rows]
    items.sort(key=lambda it: (it["score"], it["created_at"] or ""), reverse=True)
    n_random = round(min(limit, len(items)) * random_share)
    picked: list[dict[str, Any]] = []
    if n_random:
        seed = hashlib.sha256("".join(sorted(it["request_id"] for it in items)).encode()).hexdigest()
        picked = random.Random(seed).sample(items, n_random)
        for it in picked:
            it["random"] = True
            it["reasons"] = ["random sample (keeps the confirmed cases a picture of the traffic)", *it["reasons"]]
    chosen = {it["request_id"] for it in picked}
    scored = [it for it in items if it["request_id"] not in chosen]
    if balance_classes:
        scored = _balanced(scored)
    queue = scored[: limit - len(picked)]
    # the random picks sit spread through the queue, so that a reviewer who stops early still confirmed some
    step = max(1, (len(queue) + len(picked)) // max(1, len(picked)))
    for i, it in enumerate(picked):
        queue.insert(min(len(queue), i * step), it)
    return queue[:limit]
