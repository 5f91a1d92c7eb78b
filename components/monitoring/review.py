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
"""

from __future__ import annotations

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


def rank(rows: list[dict[str, Any]], threshold: float, ood_threshold: float | None, limit: int) -> list[dict]:
    """The ``limit`` highest-scoring rows as queue items (best first)."""
    items = []
    for r in rows:
        p = parts(r, threshold, ood_threshold)
        les = reported(r)
        items.append(
            {
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
            }
        )
    items.sort(key=lambda it: (it["score"], it["created_at"] or ""), reverse=True)
    return items[:limit]
