"""The drift-monitoring reference: computed at training time and stored with the classifier.

For every image of the training run: the quality features the service logs (brightness, contrast,
saturation, blur, JPEG blockiness, colour means, size), the classifier's embedding of the crop the
service would classify (the first box plus the training margin, or the whole image), projected onto
a few principal components fitted on the training images' embeddings, and the predicted class and
confidence. Files in the model folder: ``reference.parquet`` (one row per image, its ``part``:
``train`` or ``val``) and ``projection.json`` (the PCA mean and components, plain numbers: loadable
without unpickling anything). Monitoring compares logged predictions with this table and never
recomputes it from images.

Which rows stand for which columns (:func:`for_comparison`): the image features of the *training*
images (what the model learned from), the model's outputs (embedding components, predicted class,
confidence) on the *validation* images of the same run. A model's outputs on the images it was fitted
to are more separated and more confident than on any image it has not seen; compared with those,
every unseen photo from the usual camera looks shifted (the demo's model, 15 epochs on 342 images:
the first embedding component of 120 new photos at p = 7e-6). The validation split is held out
from fitting, so it shows what the model's outputs on new photos from the same source look like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from components.data.images import QUALITY_FEATURES

REFERENCE = "reference.parquet"
PROJECTION = "projection.json"
FEATURES = QUALITY_FEATURES


def embed(model, x, tta: bool | str = False):
    """Penultimate-layer embeddings (of the crop as it is) and logits (averaged over ``tta``'s views,
    components/model/classifier.py::view) of a timm model for a normalised NCHW tensor."""
    from components.model.classifier import over_views

    emb = model.forward_head(model.forward_features(x), pre_logits=True)
    head = model.get_classifier()
    logits = over_views(
        head(emb), lambda v: head(model.forward_head(model.forward_features(v), pre_logits=True)), x, tta
    )
    return emb, logits


def fit_projection(emb: np.ndarray, n_components: int) -> dict[str, Any]:
    mean = emb.mean(0)
    k = max(1, min(n_components, emb.shape[0] - 1, emb.shape[1]))
    _, s, vt = np.linalg.svd(emb - mean, full_matrices=False)
    explained = (s**2 / max(float((s**2).sum()), 1e-12))[:k]
    return {
        "mean": mean.astype(float).round(6).tolist(),
        "components": vt[:k].astype(float).round(6).tolist(),
        "explained_variance_ratio": explained.astype(float).round(6).tolist(),
    }


def project(emb: np.ndarray, projection: dict[str, Any]) -> np.ndarray:
    return (np.asarray(emb, dtype=np.float64) - np.asarray(projection["mean"])) @ np.asarray(projection["components"]).T


def image_features(rgb, box, crop_margin: float, input_size: int) -> tuple[dict[str, float], np.ndarray]:
    """One image's photo-quality columns and its model-input crop (uint8): the per-image half of :func:`features`."""
    from components.data.images import quality
    from components.data.preprocess import to_uint8

    q = quality(rgb)
    feats = {**{k: q[k] for k in FEATURES}, "width": rgb.size[0], "height": rgb.size[1]}
    return feats, to_uint8(rgb, box, crop_margin, input_size)


def file_features(job: tuple[str, list | None, float, int]) -> tuple[dict[str, float], np.ndarray]:
    """:func:`image_features` of an image file ``(path, box, crop_margin, input_size)``: what a process or a Dask
    worker computes for the reference (infra/compute.py)."""
    from components.data.images import decode

    path, box, margin, size = job
    return image_features(decode(path).rgb, box, margin, size)


def features(
    items,
    model,
    mc: dict[str, Any],
    projection: dict[str, Any] | None = None,
    n_components: int = 8,
    embeddings: list | None = None,
):
    """(DataFrame of the monitor's columns, projection) for ``(rgb image, box or None)`` pairs, computed
    as the service computes them; the projection is fitted on these embeddings when none is given. The
    full embeddings are appended to ``embeddings`` when a list is given. ``items`` may instead hold what
    :func:`image_features` returned for each image (``(features dict, uint8 crop)`` pairs)."""
    per_image = [
        item if isinstance(item[0], dict) else image_features(item[0], item[1], mc["crop_margin"], mc["input_size"])
        for item in items  # one image at a time: only the small crops are kept
    ]
    feats, crops = [f for f, _ in per_image], [c for _, c in per_image]
    return from_crops(feats, crops, model, mc, projection, n_components, embeddings)


def from_crops(feats, crops, model, mc, projection=None, n_components: int = 8, embeddings: list | None = None):
    """:func:`features` from the per-image columns and crops: the model's half, batched in this process."""
    import pandas as pd
    import torch

    from components.data.preprocess import normalise
    from components.model.metrics import adjustment_offsets, decide, softmax

    embs, logits = [], []
    with torch.no_grad():
        for i in range(0, len(crops), 256):
            x = torch.from_numpy(normalise(np.stack(crops[i : i + 256]), mc["mean"], mc["std"]))
            e, lo = embed(model, x.contiguous(memory_format=torch.channels_last), mc.get("tta", False))
            embs.append(e.numpy())
            logits.append(lo.numpy())
    emb = np.concatenate(embs)
    if embeddings is not None:
        embeddings.append(emb)
    z = np.concatenate(logits)
    p, pred = softmax(z), decide(z, adjustment_offsets(mc))  # answered as the service answers
    projection = projection or fit_projection(emb, n_components)
    pcs = project(emb, projection)
    df = pd.DataFrame(feats)
    for k in range(pcs.shape[1]):
        df[f"pc_{k}"] = pcs[:, k]
    df["label"] = [mc["classes"][k] for k in pred]
    df["confidence"] = p[np.arange(len(p)), pred]
    return df, projection


MODEL_OUTPUTS = ("label", "confidence")  # with the ``pc_*`` columns: what the model computes


def is_model_output(column: str) -> bool:
    return column in MODEL_OUTPUTS or column.startswith("pc_")


def build(
    model,
    mc: dict[str, Any],
    rows: list[dict[str, Any]],
    dataset_dir: Path,
    n_components: int = 8,
    val_rows: list[dict[str, Any]] | None = None,
    embeddings: dict[str, np.ndarray] | None = None,
    cfg=None,
):
    """(reference DataFrame, projection): ``rows`` (the training split, ``part`` "train"; the projection
    is fitted on them) and ``val_rows`` (``part`` "val", the same projection). The full embeddings of each
    part are put in ``embeddings`` (``train``, ``val``) when a dict is given. With the run's ``cfg``, the per-image
    work (decode, quality columns, crop) runs on its compute target (local processes or Dask, infra/compute.py);
    the model runs here."""
    import pandas as pd

    def items(rs):
        margin, size = mc["crop_margin"], mc["input_size"]
        jobs = [(str(Path(dataset_dir) / r["path"]), (r.get("boxes") or [None])[0], margin, size) for r in rs]
        if cfg is None:
            return (file_features(j) for j in jobs)
        from infra.compute import map_chunks

        return map_chunks(file_features, jobs, cfg)

    train_emb, val_emb = [], []
    train, projection = features(items(rows), model, mc, n_components=n_components, embeddings=train_emb)
    train["part"] = "train"
    if embeddings is not None:
        embeddings["train"] = train_emb[0]
        embeddings["val"] = np.zeros((0, train_emb[0].shape[1]), dtype=train_emb[0].dtype)
    if not val_rows:
        return train, projection
    val = features(items(val_rows), model, mc, projection, embeddings=val_emb)[0]
    if embeddings is not None:
        embeddings["val"] = val_emb[0]
    val["part"] = "val"
    return pd.concat([train, val], ignore_index=True), projection


def quality_limits(values: dict[str, Any], percentile: float, low_resolution_side: int | None = None) -> dict[str, Any]:
    """The photo-quality warning limits of one training source, from its own distribution: sharpness and
    brightness below the ``percentile``-th percentile of the training images, brightness above the
    ``100 - percentile``-th. So about ``2 x percentile`` % of the source's own photos get a warning, whatever
    its camera, resolution or compression (constants set on synthetic images warned on a fifth of real ones).
    With ``width``/``height`` given, a photo is "low resolution" below ``low_resolution_side`` only where it is also
    smaller than the ``percentile``-th percentile of the training photos' shorter sides (a retrain on a clinic's
    84 px photos stops warning on them; a model that never saw such photos keeps warning).

    Args:
        values: ``{"blur": [...], "brightness": [...], "width": [...], "height": [...]}`` of the training images
            (a reference's columns).
    """
    blur, bright = np.asarray(values["blur"], float), np.asarray(values["brightness"], float)
    out: dict[str, Any] = {
        "blur_min": round(float(np.percentile(blur, percentile)), 4),
        "brightness_min": round(float(np.percentile(bright, percentile)), 4),
        "brightness_max": round(float(np.percentile(bright, 100 - percentile)), 4),
    }
    if low_resolution_side is not None and "width" in values and "height" in values:
        short = np.minimum(np.asarray(values["width"], float), np.asarray(values["height"], float))
        out["low_resolution_side"] = int(min(low_resolution_side, np.percentile(short, percentile)))
    return out


def for_comparison(df):
    """The reference the window is compared with: image features from the training rows, model
    outputs from the validation rows (a cell not used is empty, and Evidently tests each column on its
    non-empty cells). A reference without validation rows (or written before they were kept) is used
    whole."""
    if "part" not in df.columns:
        return df
    parts, out = df["part"], df.drop(columns="part")
    if not (parts == "val").any():
        return out
    out = out.astype({c: "object" if out[c].dtype == object else "float64" for c in out.columns})
    for c in out.columns:
        out.loc[parts != ("val" if is_model_output(c) else "train"), c] = None
    return out


def write(out_dir: Path, df, projection: dict[str, Any]) -> None:
    df.to_parquet(Path(out_dir) / REFERENCE, index=False)
    (Path(out_dir) / PROJECTION).write_text(json.dumps(projection))


def load(model_dir: Path):
    import pandas as pd

    return pd.read_parquet(Path(model_dir) / REFERENCE), json.loads((Path(model_dir) / PROJECTION).read_text())
