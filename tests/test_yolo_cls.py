"""The ultralytics YOLO classification network as the classifier (`classifier.backbone: yolov8n-cls`): trained,
evaluated, registered, downloaded from the registry and served by the service's pipeline, on PyTorch and on its
checked ONNX export, the same way as a timm backbone."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from components.model.classifier import TrainingError, check_backbone

# the tests that train or serve are marked slow one by one; the others run in `make test-fast`


@pytest.mark.slow
def test_a_yolo_classifier_goes_through_train_evaluate_register_and_serve(tmp_path, cfg, gated, monkeypatch):
    from components.model import registry
    from components.model.evaluate import evaluate
    from components.model.train_classifier import train_classifier
    from serving.onnx_export import export_classifier
    from serving.pipeline import Pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ds, split = gated
    yolo = cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"backbone": "yolov8n-cls"})})
    train_classifier(split, ds, tmp_path / "clf", yolo, progress=lambda m: None)
    mc = json.loads((tmp_path / "clf" / "model_config.json").read_text())
    assert mc["backbone"] == "yolov8n-cls"

    ev = evaluate(tmp_path / "clf", split, ds, tmp_path / "eval", yolo)
    assert ev["backbone"] == "yolov8n-cls" and 0 <= ev["metrics"]["accuracy"] <= 1
    # ultralytics' YOLOv8n-cls with a 7-class head: 1,447,255 parameters (ultralytics' own count)
    assert ev["complexity"]["classifier"]["parameters"] == 1_447_255
    assert len(ev["robustness"]) > 0 and (tmp_path / "eval" / "model_card.md").is_file()

    version = registry.register("classifier", tmp_path / "clf", ev["metrics"], {"data_version": "t"}, tmp_path / "eval")
    registry.set_champion(registry.CLASSIFIER, version)
    served = registry.download(registry.CLASSIFIER, version, dst=tmp_path / "served")

    photo = next(p for p in sorted((ds / "images").glob("*.jpg")) if Image.open(p).size[0] >= 64)
    rgb = Image.open(photo).convert("RGB")
    torch_answer = Pipeline(served, None, yolo).analyse(rgb)
    assert torch_answer["fallback"] and "no detector deployed" in torch_answer["fallback_reason"]
    lesion = torch_answer["lesions"][0]
    assert abs(sum(lesion["probabilities"].values()) - 1) < 1e-3 and lesion["label"] in yolo.classes.names

    check = export_classifier(served, 1e-3)
    assert check["file"] == "classifier.onnx" and max(check["max_abs_diff"].values()) < 1e-3
    onnx = yolo.model_copy(update={"serving": yolo.serving.model_copy(update={"runtime": "onnx"})})
    onnx_answer = Pipeline(served, None, onnx).analyse(rgb)["lesions"][0]
    assert onnx_answer["label"] == lesion["label"]
    diff = max(abs(onnx_answer["probabilities"][k] - v) for k, v in lesion["probabilities"].items())
    assert diff < 1e-3


def test_an_unknown_yolo_classifier_is_refused_naming_it():
    with pytest.raises(TrainingError, match=r"unknown YOLO classification backbone 'yolov9z-cls': ultralytics has no"):
        check_backbone("yolov9z-cls")
    check_backbone("yolov8n-cls")  # no error
