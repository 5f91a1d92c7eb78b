"""How a trained classifier answers, chosen on validation after training: its test-time views
(``classifier.tta`` / ``classifier.tta_choices``) and its logit adjustment (``classifier.logit_adjustment``),
stored in ``model_config.json``; the service, the evaluation and the monitoring reference answer with them."""

from __future__ import annotations

from typing import Any

import numpy as np

from components.model.classifier import tta_views, view_logits
from components.model.metrics import fit_logit_adjustment


def choose_answer(
    model, val, sources: list[str], y_train: np.ndarray, k: int, mean, std, c, progress
) -> tuple[bool | str, dict[str, Any]]:
    """The chosen model's test-time views and logit adjustment, which the service, the evaluation and the monitoring
    reference answer with. The adjustment (``classifier.logit_adjustment``): the tau with the best validation
    balanced accuracy, the mean over the validation rows' ``sources`` when there are several
    (metrics.fit_logit_adjustment). The views: ``classifier.tta``, or with ``classifier.tta_choices`` the one of them
    whose best tau reaches the best validation balanced accuracy (a tie goes to fewer views: each costs a forward
    pass of the classifier per crop, in the evaluation and in the service)."""
    choices = list(dict.fromkeys(c.tta_choices)) or [c.tta]
    if len(val.y) == 0 or (c.logit_adjustment == [0.0] and len(choices) == 1):
        return choices[0], {"tau": 0.0, "offsets": [0.0] * k, "val_balanced_accuracy": {}}
    model.eval()
    per_view = view_logits(model, val.x, mean, std, max(tta_views(t) for t in choices))
    counts = np.bincount(y_train, minlength=k)
    fits = {
        t: fit_logit_adjustment(
            per_view[: tta_views(t)].mean(0),
            val.y,
            counts,
            c.logit_adjustment,
            sources,
            c.logit_adjustment_source_min_rows,
        )
        for t in choices
    }
    reached = {t: fits[t]["val_balanced_accuracy"][f"{fits[t]['tau']:g}"] for t in choices}
    tta = max(choices, key=lambda t: (np.nan_to_num(reached[t], nan=-1.0), -tta_views(t)))
    fit = fits[tta]
    if len(choices) > 1:
        fit["tta_val_balanced_accuracy"] = by_views = {str(t): reached[t] for t in choices}
        progress(f"classifier: test-time views {tta} (validation balanced accuracy by views: {by_views})")
    progress(
        f"classifier: logit adjustment tau {fit['tau']:g} (validation balanced accuracy by tau"
        f"{', ' + fit['criterion'] if 'criterion' in fit else ''}: {fit['val_balanced_accuracy']})"
        + "".join(f"; {g}: {why}" for g, why in fit.get("pooled_sources", {}).items())
    )
    return tta, fit
