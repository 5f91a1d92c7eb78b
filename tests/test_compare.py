"""`drspot compare`: backbones trained the same way on one split, their ensemble and its distilled student, one
table (markdown, HTML, JSON) whose figures are each model's own evaluation, logged as one MLflow parent run."""

from __future__ import annotations

import json

import pytest

from components.model.compare import CompareError, compare

pytestmark = pytest.mark.slow


def _cfg(cfg, **compare):
    return cfg.model_copy(update={"compare": cfg.compare.model_copy(update=compare)})


def test_compare_writes_the_table_from_each_models_evaluation_and_one_mlflow_parent_run(
    tmp_path, cfg, gated, monkeypatch
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ds, split = gated
    run_cfg = _cfg(cfg, backbones=["resnet18", "mobilenetv3_small_100"], student="mobilenetv3_small_100")
    said: list[str] = []
    result = compare(split, ds, tmp_path / "cmp", run_cfg, progress=said.append)

    rows = result["rows"]
    assert [r["model"] for r in rows] == [
        "resnet18",
        "mobilenetv3_small_100",
        "ensemble of 2",
        "student (mobilenetv3_small_100, distilled)",
    ]
    for r, folder in zip(rows[:2] + rows[3:], ("resnet18", "mobilenetv3_small_100", "student"), strict=True):
        ev = json.loads((tmp_path / "cmp" / folder / "evaluation" / "evaluation.json").read_text())
        per = {c["class"]: c for c in ev["per_class"]}
        assert r["acc"] == ev["metrics"]["accuracy"] and r["kappa"] == ev["metrics"]["kappa"]
        assert r["auroc"] == ev["metrics"]["macro_auc"] and r["named_f1"] == per["mel"]["f1"]
        assert abs(r["macro_f1"] - sum(c["f1"] for c in per.values()) / len(per)) < 1e-12
        assert r["params_m"] * 1e6 == ev["complexity"]["classifier"]["parameters"] and r["mmacs"] > 0
        assert r["latency_ms"] > 0 and len(ev["robustness"]) > 0
        assert 0 <= r["corrupted_acc"] <= 1
    # the student learned from the two: its model records the distillation
    student = json.loads((tmp_path / "cmp" / "student" / "model" / "model_config.json").read_text())
    assert student["backbone"] == "mobilenetv3_small_100"
    assert student["params"]["distillation"]["enabled"] is True
    assert len(student["params"]["distillation"]["teachers"]) == 2
    # resnet18 has ~11 M parameters, MobileNetV3-small ~1.5 M: the table tells them apart
    assert rows[0]["params_m"] > 5 * rows[1]["params_m"]
    assert rows[2]["params_m"] == pytest.approx(rows[0]["params_m"] + rows[1]["params_m"])

    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.splitlines()[0].startswith("| model | ACC | macro F1 | precision | recall | F1 (mel) | AUROC | kappa |")
    assert len(md.splitlines()) == 2 + 4
    assert "<table>" in (tmp_path / "cmp" / "compare.html").read_text()
    assert any(line.startswith("compare: resnet18: ACC ") for line in said)

    client = mlflow.MlflowClient()
    parent = client.get_run(result["meta"]["mlflow run"])
    assert parent.data.tags["kind"] == "compare" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == ["mobilenetv3_small_100", "resnet18", "student"]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"compare.md", "compare.html", "compare.json"} <= arts


def test_a_bad_comparison_is_refused_before_any_training(tmp_path, cfg):
    with pytest.raises(CompareError, match="compare.backbones is empty"):
        compare(tmp_path / "s.parquet", tmp_path, tmp_path / "out", _cfg(cfg, backbones=[]))
    with pytest.raises(CompareError, match="compare.named_class 'melanoma' is not one of akiec, bcc"):
        compare(tmp_path / "s.parquet", tmp_path, tmp_path / "out", _cfg(cfg, named_class="melanoma"))
    from components.model.classifier import TrainingError

    with pytest.raises(TrainingError, match="unknown timm backbone 'resnet181'"):
        compare(tmp_path / "s.parquet", tmp_path, tmp_path / "out", _cfg(cfg, backbones=["resnet18", "resnet181"]))
    assert not (tmp_path / "out").exists()
