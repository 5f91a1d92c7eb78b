"""``drspot train-detector``: an ultralytics YOLO lesion detector from the split manifest's boxes.

The model is built from its yaml (``detector.arch``, e.g. ``yolov8n``): no weights download. The
boxes are exported to YOLO format from DrSpot's own split (never a split the source shipped), one
class ``lesion`` by default. Ultralytics runs with the project's offline settings (fonts, no hub,
its MLflow callback off: :func:`infra.env.ultralytics`) and ``amp=False`` (the AMP check
downloads a model). Outputs in ``out_dir``: ``detector.pt``, ``detector_config.json`` (arch, image
size, thresholds, class names, test metrics: mAP50, mAP50-95, precision, recall).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.data.manifest import SPLITS, DataError
from components.model.classifier import TrainingError
from components.step_report import say
from infra.config import Config

WEIGHTS = "detector.pt"
DETECTOR_CONFIG = "detector_config.json"


def export_yolo(split_manifest: Path, dataset_dir: Path, out_dir: Path, single_class: bool, classes: list[str]) -> Path:
    """Write ``out_dir/{images,labels}/{train,val,test}`` (images linked) and ``data.yaml``."""
    import pyarrow.parquet as pq
    import yaml

    rows = pq.read_table(split_manifest, columns=["image_id", "path", "label", "boxes", "split"]).to_pylist()
    shutil.rmtree(out_dir, ignore_errors=True)
    counts = {s: 0 for s in SPLITS}
    for r in rows:
        # a row without boxes is unannotated (e.g. confirmed feedback), not an image without a lesion:
        # as a YOLO background image it would teach the detector to miss lesions
        if r["split"] not in SPLITS or not r["boxes"]:
            continue
        src = (dataset_dir / r["path"]).resolve()
        img = out_dir / "images" / r["split"] / f"{r['image_id']}{src.suffix}"
        lbl = out_dir / "labels" / r["split"] / f"{r['image_id']}.txt"
        img.parent.mkdir(parents=True, exist_ok=True)
        lbl.parent.mkdir(parents=True, exist_ok=True)
        img.symlink_to(src)
        cls = 0 if single_class else classes.index(r["label"])
        lines = [
            f"{cls} {(b[0] + b[2]) / 2:.6f} {(b[1] + b[3]) / 2:.6f} {b[2] - b[0]:.6f} {b[3] - b[1]:.6f}"
            for b in r["boxes"] or []
        ]
        lbl.write_text("\n".join(lines) + ("\n" if lines else ""))
        counts[r["split"]] += 1
    empty = [s for s in ("train", "val") if counts[s] == 0]
    if empty:
        raise DataError(
            f"no images with boxes in the {' and '.join(empty)} split(s) of {split_manifest} for the detector"
        )
    names = {0: "lesion"} if single_class else dict(enumerate(classes))
    data = {"path": str(out_dir.resolve()), "train": "images/train", "val": "images/val", "names": names}
    if counts["test"]:
        data["test"] = "images/test"
    (out_dir / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out_dir / "data.yaml"


def _metrics(m) -> dict[str, float]:
    return {
        "map50": float(m.box.map50),
        "map50_95": float(m.box.map),
        "precision": float(m.box.mp),
        "recall": float(m.box.mr),
    }


def _common(imgsz: int, batch: int, dev: str, workers: int, project: Path) -> dict[str, Any]:
    """The ultralytics arguments training and testing share (quiet, no plots, our own run folder)."""
    return {
        "imgsz": imgsz,
        "batch": batch,
        "device": dev,
        "workers": workers,
        "plots": False,
        "verbose": False,
        "project": str(project),
        "exist_ok": True,
    }


def _val(weights: Path, data_yaml: Path, split: str, common: dict[str, Any]) -> dict[str, float]:
    from infra.env import ultralytics

    return _metrics(ultralytics().YOLO(str(weights)).val(data=str(data_yaml), split=split, name="test", **common))


def score(model_dir: str | Path, split_manifest: str | Path, dataset_dir: str | Path, cfg: Config) -> dict[str, float]:
    """A trained detector's mAP50 / mAP50-95 / precision / recall on a split manifest's test split.

    The gate uses it to re-judge a champion on a newer frozen test split.
    """
    import tempfile

    dc = json.loads((Path(model_dir) / DETECTOR_CONFIG).read_text())
    with tempfile.TemporaryDirectory(prefix="drspot-detector-score-") as tmp:
        tmp = Path(tmp)
        data_yaml = export_yolo(
            Path(split_manifest), Path(dataset_dir), tmp / "yolo_data", dc["single_class"], list(cfg.classes.names)
        )
        if not (tmp / "yolo_data" / "images" / "test").is_dir():
            raise DataError(f"the test split of {split_manifest} is empty")
        common = _common(dc["imgsz"], cfg.detector.batch, device(), 0, tmp / "ultralytics")
        return _val(Path(model_dir) / WEIGHTS, data_yaml, "test", common)


def device() -> str:
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def check_init(cfg: Config) -> str | None:
    """Why ``detector.init`` cannot start this training (None when it can, or when none is set): its folder holds
    the weights and the config of a detector of the configured architecture."""
    d = cfg.detector
    if not d.init.path:
        return None
    folder = cfg.resolve(d.init.path)
    if not (folder / WEIGHTS).is_file() or not (folder / DETECTOR_CONFIG).is_file():
        return f"detector.init.path {folder} holds no {WEIGHTS} and {DETECTOR_CONFIG}"
    arch = json.loads((folder / DETECTOR_CONFIG).read_text()).get("arch")
    return None if arch == d.arch else f"the model in {folder} is a {arch}, the configuration trains {d.arch}"


def train_detector(
    split_manifest: str | Path,
    dataset_dir: str | Path,
    out_dir: str | Path,
    cfg: Config,
    progress: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Train and test the detector; returns its config with test metrics."""
    from infra.env import ultralytics

    d = cfg.detector
    split_manifest, dataset_dir, out_dir = Path(split_manifest), Path(dataset_dir), Path(out_dir)
    if not split_manifest.is_file():
        raise DataError(f"no split manifest at {split_manifest}; run `drspot prepare` first")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    data_yaml = export_yolo(split_manifest, dataset_dir, out_dir / "yolo_data", d.single_class, list(cfg.classes.names))
    ul = ultralytics()
    problem = check_init(cfg)
    if problem:
        raise TrainingError(f"cannot start from detector.init: {problem}")
    start = cfg.resolve(d.init.path) / WEIGHTS if d.init.path else None
    model = ul.YOLO(str(start) if start else f"{d.arch}.yaml")
    origin = d.init.origin() if start else {"from": "scratch"}
    dev = device()
    workdir = out_dir.resolve() / "ultralytics"  # ultralytics puts a relative project under its own runs dir
    shutil.rmtree(workdir, ignore_errors=True)
    share = f" on {d.fraction:.0%} of the training images" if d.fraction < 1 else ""
    how = f"fine-tuning detector v{d.init.version or '?'}" if start else "from scratch"
    progress(f"detector: training {d.arch} {how} at {d.imgsz}px for {d.epochs} epochs{share} on {dev}")
    common = _common(d.imgsz, d.batch, dev, d.workers, workdir)

    trained: set[int] = set()  # epochs trained (ultralytics' final evaluation re-sends the last one as epoch + 1)

    def epoch_trained(trainer) -> None:
        trained.add(trainer.epoch + 1)

    def epoch_done(trainer) -> None:
        if trainer.epoch + 1 not in trained:
            return
        map50 = (trainer.metrics or {}).get("metrics/mAP50(B)", float("nan"))
        took = time.monotonic() - t0
        progress(f"detector: epoch {trainer.epoch + 1}/{trainer.epochs} val mAP50 {map50:.3f} ({took:.0f}s)")

    model.add_callback("on_train_epoch_end", epoch_trained)
    model.add_callback("on_fit_epoch_end", epoch_done)
    model.train(
        data=str(data_yaml),
        epochs=d.epochs,
        name="run",
        seed=cfg.seed,
        deterministic=True,
        amp=False,
        patience=d.patience,
        mosaic=d.mosaic,
        fraction=d.fraction,
        val=True,
        pretrained=start is not None,
        lr0=d.lr0,
        warmup_epochs=d.warmup_epochs,
        **common,
    )
    best = workdir / "run" / "weights" / "best.pt"
    if not best.is_file():
        best = workdir / "run" / "weights" / "last.pt"
    shutil.copyfile(best, out_dir / WEIGHTS)
    split = "test" if (out_dir / "yolo_data" / "images" / "test").is_dir() else "val"
    metrics = _val(out_dir / WEIGHTS, data_yaml, split, common)
    config = {
        "arch": d.arch,
        "imgsz": d.imgsz,
        "conf": d.conf,
        "iou": d.iou,
        "single_class": d.single_class,
        "names": ["lesion"] if d.single_class else list(cfg.classes.names),
        "metrics": metrics,
        "metrics_split": split,
        "epochs": d.epochs,
        "epochs_run": len(trained),
        "init": origin,
        "seed": cfg.seed,
        "config_digest": cfg.digest(),
        "seconds": round(time.monotonic() - t0, 1),
        "params": d.model_dump(),
    }
    (out_dir / DETECTOR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    shutil.rmtree(out_dir / "yolo_data", ignore_errors=True)  # links only; the manifest can rebuild it
    progress(
        f"detector: {split} mAP50 {metrics['map50']:.3f} mAP50-95 {metrics['map50_95']:.3f} "
        f"P {metrics['precision']:.3f} R {metrics['recall']:.3f} ({config['seconds']}s)"
    )
    return config
