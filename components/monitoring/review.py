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
photos are alike (one or two confusions of one kind), and dealing them over the predicted classes (``spread:
classes``) still taught less than random (0.36 vs 0.45 with 25% random, bench/clinic.py): under a new camera every
photo is unusual and the most unusual are its outliers. So by default (``spread: clusters``) the scored part is one
photo per cluster of the photos' embeddings, the best of the half of the cluster nearest its centre
(:func:`_clustered`): the clusters follow the traffic, the pick is of its cluster's kind and, of those, the most
informative (0.41 with HAM10000 unchanged, vs 0.39 taking each cluster's best outright). A ``random_share`` of the
queue is drawn uniformly from the unconfirmed photos considered (seeded by their ids: the same log gives the same
queue), marked ``random: true`` and "random sample" as their reason, which keeps the labels the flywheel collects a
picture of the traffic.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np

from components.monitoring.quality import reported

CLUSTER_DIMS = 32  # principal components of the embeddings the queue's clusters are found in
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


def _clustered(items: list[dict[str, Any]], embeddings: np.ndarray, k: int, seed: int) -> list[dict[str, Any]]:
    """``items`` (best first) as one per cluster of the photos' embeddings (k-means, ``k`` clusters, on the leading
    principal components): each cluster's best item among the half of it nearest its centre, the clusters' picks best
    first, then the rest in order. k-means puts its clusters where the photos are dense, so the picks cover the
    traffic in proportion; the typical half keeps a cluster's outliers out (a new camera's strangest photos teach
    little about its ordinary ones), and of the typical ones the pick is the one a confirmation teaches most
    (cluster-then-select as in Cluster-Margin, Citovsky et al. 2021, and TypiClust, Hacohen et al. 2022)."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA

    if k < 2 or k >= len(items):  # room for every photo: each is its own cluster
        return items
    x = PCA(n_components=min(CLUSTER_DIMS, *embeddings.shape), random_state=seed).fit_transform(embeddings)
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=2048).fit(x)
    labels = km.labels_
    dist = np.linalg.norm(x - km.cluster_centers_[labels], axis=1)
    typical = np.zeros(len(items), bool)  # the half of each cluster nearest its centre (outliers are not its kind)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        typical[members] = dist[members] <= np.median(dist[members])
    first: dict[int, int] = {}
    for i, c in enumerate(labels):  # items are best first: the first typical one of a cluster is its best
        if typical[i]:
            first.setdefault(int(c), i)
    picked = sorted(first.values())
    taken = set(picked)
    return [items[i] for i in picked] + [it for i, it in enumerate(items) if i not in taken]


def rank(
    rows: list[dict[str, Any]],
    threshold: float,
    ood_threshold: float | None,
    limit: int,
    random_share: float = 0.0,
    spread: str = "none",
) -> list[dict]:
    """The queue of ``limit`` items from ``rows``: ``random_share`` of them drawn at random, the rest by score (best
    first), spread over the predicted classes (``spread="classes"``) or over clusters of the photos' embeddings
    (``"clusters"``; rows without an embedding are ranked by score alone)."""
    items = [_item(r, threshold, ood_threshold) for r in rows]
    embedding = {r["request_id"]: r.get("embedding") for r in rows}
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
    if spread == "classes":
        scored = _balanced(scored)
    elif spread == "clusters" and scored and all(embedding[it["request_id"]] for it in scored):
        seed_int = int(hashlib.sha256(",".join(it["request_id"] for it in scored).encode()).hexdigest()[:8], 16)
        emb = np.asarray([embedding[it["request_id"]] for it in scored], dtype=np.float32)
        scored = _clustered(scored, emb, limit - len(picked), seed_int)
    queue = scored[: limit - len(picked)]
    # the random picks sit spread through the queue, so that a reviewer who stops early still confirmed some
    step = max(1, (len(queue) + len(picked)) // max(1, len(picked)))
    for i, it in enumerate(picked):
        queue.insert(min(len(queue), i * step), it)
    return queue[:limit]
