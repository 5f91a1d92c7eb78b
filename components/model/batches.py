"""A classifier's training epoch (:mod:`components.model.train_classifier`): what it draws, how each batch is
augmented, and the pass itself.

Sources can be given shares of the draws (a new clinic's few confirmed cases are not drowned by the old clinic's
many) and classes evened within each source's share; batches are augmented as tensors (flips, quarter turns, zoom,
colour jitter), on the generator the training seeds; :class:`EpochPass` trains on one draw (mixup/cutmix or label
smoothing, class weights, distillation, the weight average).
"""

from __future__ import annotations

import numpy as np

from components.model.ema import WeightAverage


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


def augment(x, aug, gen):
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


class EpochPass:
    """One epoch's pass over the drawn training crops: augmentation, mixup/cutmix or label smoothing, the class
    weights, distillation from the teachers, the optimiser step and the weight average."""

    def __init__(self, c, k: int, weights, teachers: list, mean: list, std: list) -> None:
        import torch

        self.c, self.k, self.weights, self.teachers = c, k, weights, teachers
        self.mean_t = torch.tensor(mean).view(1, 3, 1, 1)
        self.std_t = torch.tensor(std).view(1, 3, 1, 1)
        self.mixup = None
        if c.augment.mixup > 0 or c.augment.cutmix > 0:
            from timm.data import Mixup

            a, smooth = c.augment, c.label_smoothing
            self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=smooth, num_classes=k)

    def loss(self, model, xb, yb):
        import torch
        import torch.nn.functional as F

        c = self.c
        if self.mixup is not None and len(yb) % 2 == 0:
            xb, target = self.mixup(xb, yb)
        else:
            target = F.one_hot(yb, self.k).float() * (1 - c.label_smoothing) + c.label_smoothing / self.k
        logits = model(xb)
        loss = -(target * F.log_softmax(logits, 1) * self.weights).sum(1).mean()
        if self.teachers:
            T = c.distillation.temperature
            with torch.no_grad():
                soft = torch.stack([F.softmax(tm(xb) / T, 1) for tm, _ in self.teachers]).mean(0)
            kd = F.kl_div(F.log_softmax(logits / T, 1), soft, reduction="batchmean") * T * T
            loss = c.distillation.alpha * kd + (1 - c.distillation.alpha) * loss
        return loss

    def run(self, model, train, draw, step_opt, sched, ema, gen, head_only: bool):
        """Train on an epoch's draw of the crops (``draw``: each crop's chance, None for a shuffle); the head alone
        during the linear probe (``head_only``). Returns the batch losses and the weight average (started on the
        first step after the probe when ``classifier.ema`` asks for one)."""
        import torch

        c = self.c
        head = {id(q) for q in model.get_classifier().parameters()}
        for p in model.parameters():
            p.requires_grad = (not head_only) or id(p) in head
        # during the probe the backbone is frozen as a whole: eval mode keeps its batch-norm statistics as trained
        model.train(not head_only)
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
            xb = augment(xb, c.augment, gen)
            xb = ((xb - self.mean_t) / self.std_t).contiguous(memory_format=torch.channels_last)
            loss = self.loss(model, xb, torch.from_numpy(train.y[idx]))
            step_opt.zero_grad(set_to_none=True)
            loss.backward()
            step_opt.step()
            if not head_only:
                sched.step()
                if c.ema:
                    ema = ema or WeightAverage(model, c.ema)
                    ema.update(model)
            losses.append(loss.item())
        return losses, ema
