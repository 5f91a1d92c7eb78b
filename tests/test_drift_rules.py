"""The drift verdict's statistics, on tables whose truth is known: the predicted-class test with a rare
class, the per-family (Bonferroni) thresholds, one drifted feature naming itself, and the JPEG
blockiness feature that lets the monitor see a change of compression."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.data.images import blockiness, quality
from components.monitoring.monitor import IMAGE_FEATURES, column_thresholds, compare
from infra.config import load_config

CLASSES = ["nv", "bkl", "mel", "bcc", "vasc", "akiec", "df"]
# the predicted-class shares of bench/drift.py's DermaMNIST classifier on its training images: "df" twice in 7,007
SHARES = [0.681, 0.097, 0.095, 0.062, 0.034, 0.031, 2 / 7007]


@pytest.fixture(scope="module")
def cfg():
    return load_config("test")


def _labels(n: int, shares, rng) -> list[str]:
    p = np.asarray(shares, float) / np.sum(shares)
    return list(rng.choice(CLASSES[: len(p)], size=n, p=p))


def _table(n: int, rng, labels=None, blur_scale: float = 1.0) -> pd.DataFrame:
    df = pd.DataFrame({c: rng.normal(0.5, 0.1, n) for c in IMAGE_FEATURES})
    df["blur"] *= blur_scale
    for k in range(8):
        df[f"pc_{k}"] = rng.normal(0, 1, n)
    df["label"] = labels if labels is not None else _labels(n, SHARES, rng)
    return df


def test_one_prediction_of_a_rare_class_is_not_drift(cfg):
    """A window of 200 with the training shares and a single "df" (expected 0.06 times): Evidently's
    cell-wise chi-square calls it drift; the pooled test of homogeneity does not."""
    rng = np.random.default_rng(0)
    ref = _table(7007, rng, labels=_labels(7005, SHARES[:-1], rng) + ["df", "df"])
    window = _table(200, rng, labels=_labels(199, SHARES[:-1], rng) + ["df"])
    plain = cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update={"cat_method": "chisquare"})})
    s_plain, _ = compare(ref, window, plain, report=False)
    assert s_plain["scores"]["label"]["score"] < 0.01 and s_plain["prediction_drift"]
    s, _ = compare(ref, window, cfg, report=False)
    assert cfg.monitor.cat_method == "chisquare_pooled"
    assert s["scores"]["label"]["method"] == "chisquare_pooled" and s["scores"]["label"]["score"] > 0.05
    assert s["status"] == "no drift", s["reasons"]


def test_a_real_change_of_predicted_classes_is_drift(cfg):
    rng = np.random.default_rng(1)
    ref = _table(7007, rng)
    window = _table(200, rng, labels=_labels(200, [0.45, 0.1, 0.3, 0.06, 0.04, 0.05, 0.0], rng))  # more melanoma
    s, _ = compare(ref, window, cfg, report=False)
    assert s["prediction_drift"] and s["scores"]["label"]["score"] < 1e-6
    assert s["reasons"] == [
        f"the predicted-class distribution drifted (label p={s['scores']['label']['score']:.1e} < 1.0e-02)"
    ]


def test_each_family_shares_one_false_alarm_budget(cfg):
    cols = [*IMAGE_FEATURES, *(f"pc_{k}" for k in range(8)), "label", "confidence"]
    t = column_thresholds(cols, cfg.monitor)
    assert len(IMAGE_FEATURES) == 10
    assert t["blur"] == pytest.approx(0.001) and t["width"] == pytest.approx(0.001)
    assert t["pc_3"] == pytest.approx(0.01 / 8) and t["label"] == t["confidence"] == pytest.approx(0.01)
    none = cfg.monitor.model_copy(update={"correction": "none"})
    assert set(column_thresholds(cols, none).values()) == {0.01}


def test_one_drifted_feature_is_drift_and_is_named(cfg):
    """A new camera that only softens the photos moves one feature of ten: drift, and the reason
    says which feature at which p-value; the same window unsoftened is not drift."""
    rng = np.random.default_rng(2)
    ref = _table(3000, rng)
    s, _ = compare(ref, _table(200, rng, blur_scale=0.8), cfg, report=False)
    assert s["drift"] and s["drifted"] == ["blur"]
    assert s["reasons"][0].startswith("1 of 10 image features drifted (blur p=")
    assert "< 1.0e-03; policy: >= 10% of them)" in s["reasons"][0]
    calm, _ = compare(ref, _table(200, rng), cfg, report=False)
    assert calm["status"] == "no drift", calm["reasons"]


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, textured image (low-frequency colour blobs plus fine noise), never JPEG-compressed."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC
    )
    a = np.asarray(base, np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("size", [(96, 72), (1203, 901)])
def test_blockiness_grows_as_jpeg_quality_falls(size):
    """Also on a photo larger than the 512 px measuring window, whose centred window must keep the
    codec's 8-pixel grid (an odd size, so a naive centre crop would not)."""
    img = _photo(*size)
    raw, q90, q25 = blockiness(img), blockiness(_jpeg(img, 90)), blockiness(_jpeg(img, 25))
    assert 0.9 < raw < 1.1
    assert raw < q90 < q25 and q25 > 1.3
    assert quality(_jpeg(img, 25))["blockiness"] == pytest.approx(q25)


def test_model_outputs_are_compared_with_the_validation_images(cfg):
    """A model fitted to its training images embeds them elsewhere than any new photo;
    the stored reference's validation rows stand for the model outputs, its training rows for the
    image features."""
    rng = np.random.default_rng(4)
    train, val = _table(3000, rng), _table(500, rng)
    train["pc_0"] += 0.6  # over-fitted: the training images' first component sits apart
    train["part"], val["part"] = "train", "val"
    window = _table(200, rng)  # new photos from the usual camera, as the validation images
    stored = pd.concat([train, val], ignore_index=True)
    s, _ = compare(stored, window, cfg, report=False)
    assert s["status"] == "no drift", s["reasons"]
    assert s["rows"]["reference_parts"] == {"train": 3000, "val": 500}
    old, _ = compare(train.drop(columns="part"), window, cfg, report=False)  # everything from training images
    assert "pc_0" in old["drifted"] and old["drift"]
    blurred = window.assign(blur=window["blur"] * 0.8)  # the image features still meet the training images
    assert compare(stored, blurred, cfg, report=False)[0]["drifted"] == ["blur"]
