"""How far a crop's embedding lies from what the classifier was trained on: the out-of-distribution score.

Fitted at training time on the classifier's penultimate-layer embeddings of its training crops and stored
with the model (``ood.npz``, plain arrays: loadable without unpickling anything):

- a principal subspace of the training embeddings (``k`` components, 32 by default); the score of an
  embedding is its Mahalanobis distance inside that subspace plus its residual outside it, each scaled by
  what held-out validation crops show (the "principal subspace + residual" novelty score; Lee et al. 2018
  use the Mahalanobis part on class-conditional means, Ndiour et al. 2020 the residual), divided by
  ``k + 1`` so that a typical photo of the training source scores about 1;
- the scores of the *validation* crops (held out from fitting), so that the service sets its threshold as
  a quantile of photos from the training source the model never saw (``serving.ood_quantile``: at 0.99
  about 1% of such photos are called out of distribution), and can change it without retraining.

The service reports the score with every lesion and abstains ("not_dermoscopic_lesion") above the
threshold; the probabilities stay in the answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

OOD = "ood.npz"


def fit(train_emb: np.ndarray, val_emb: np.ndarray, n_components: int = 32) -> dict[str, np.ndarray]:
    """The subspace of ``train_emb`` (N, D), scaled on ``val_emb``, and the validation crops' scores under it.

    At most one component per 10 training crops (a subspace as wide as the training set fits it exactly and
    leaves no residual to compare with). The per-component variances and the residual scale come from the
    held-out validation crops when there are at least 20 (the training crops' own residuals, after a fit to
    them, are biased low: a one-epoch model on 60 synthetic photos scored its validation photos ~100 times its
    training ones); from the training crops otherwise.
    """
    x = np.asarray(train_emb, dtype=np.float64)
    v = np.asarray(val_emb, dtype=np.float64)
    mean = x.mean(0)
    k = max(1, min(n_components, x.shape[0] // 10, x.shape[1] - 1))
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    model = {"mean": mean, "components": vt[:k]}
    scale_on = v if len(v) >= 20 else x
    centred = scale_on - mean
    z = centred @ vt[:k].T
    model["variance"] = np.maximum((z**2).mean(0), 1e-12)
    model["residual"] = np.array(max(float(((centred - z @ vt[:k]) ** 2).sum(1).mean()), 1e-12))
    model["val_scores"] = np.sort(score(v, model)) if len(v) else np.zeros(0)
    return {k_: np.asarray(val, dtype=np.float32) for k_, val in model.items()}


def _parts(emb: np.ndarray, model: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    centred = np.asarray(emb, dtype=np.float64) - model["mean"]
    z = centred @ np.asarray(model["components"], dtype=np.float64).T
    inside = (z**2 / model["variance"]).sum(1)
    outside = ((centred - z @ model["components"]) ** 2).sum(1)
    return inside, outside


def score(emb: np.ndarray, model: dict[str, np.ndarray]) -> np.ndarray:
    """One score per embedding row: about 1 for a photo of the training source, larger the further out."""
    emb = np.atleast_2d(emb)
    inside, outside = _parts(emb, model)
    return (inside + outside / float(model["residual"])) / (len(model["variance"]) + 1)


def threshold(model: dict[str, np.ndarray], quantile: float) -> float:
    """The ``quantile`` of the validation crops' scores (the service abstains above it)."""
    val = model["val_scores"]
    if not len(val):
        raise ValueError("the OOD model holds no validation scores to set a threshold from")
    return float(np.quantile(val.astype(np.float64), quantile))


def write(out_dir: Path, model: dict[str, np.ndarray]) -> None:
    np.savez(Path(out_dir) / OOD, **model)


def load(model_dir: Path) -> dict[str, Any] | None:
    """The stored OOD model of a classifier folder, or None for a model trained before it was stored."""
    path = Path(model_dir) / OOD
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
