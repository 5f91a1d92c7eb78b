"""Polyak averaging of a model's weights during training (``classifier.ema``)."""

from __future__ import annotations


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics (``classifier.ema``: the decay
    per step, warmed up as (1 + n) / (10 + n) so that the first steps do not hold the start). It starts with the
    fine-tune (the linear probe's head is not averaged into it); validation, early stopping and the saved model
    read the average (Polyak averaging; timm's ModelEmaV2 does the same)."""

    def __init__(self, model, decay: float, state: dict | None = None, steps: int = 0) -> None:
        self.decay, self.steps = decay, steps
        self.state = state if state is not None else {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model) -> None:
        import torch

        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    self.state[k].copy_(v)

    def swapped_in(self, model):
        """Context: ``model`` holds the average inside, its own weights again after."""
        from contextlib import contextmanager

        @contextmanager
        def swap():
            live = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.state)
            try:
                yield model
            finally:
                model.load_state_dict(live)

        return swap()
