"""``drspot deploy``: the registry's champions into the BentoML model store, and a Bento built.

Each champion's registered folder (weights + resolved config) becomes a BentoML model
(``drspot-classifier`` / ``drspot-detector``) whose metadata names its registry name/version, data
version, lineage and test metrics; a model already copied for the same registry version is reused.
Each model folder also gets its ONNX export (``classifier.onnx`` / ``detector.onnx``), checked against the PyTorch
model on fixed inputs (``serving/onnx_export.py``); an export over ``serving.onnx_max_abs_diff`` is discarded and
named in the metadata (and stops the deploy when ``serving.runtime`` is ``onnx``).
Then the Bento is built from ``serving/bentofile.yaml`` pinned to exactly those two models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from components.model import registry
from infra.config import Config

BENTO = "drspot"
BENTOFILE = Path(__file__).parent / "bentofile.yaml"
SOURCE = Path(__file__).resolve().parent.parent  # the checkout the Bento is built from


class DeployError(RuntimeError):
    """Nothing to deploy (no champion), or the Bento cannot be built."""


def export_onnx(kind: str, folder: Path, cfg: Config) -> dict[str, Any]:
    """``kind``'s ONNX export written into ``folder`` and checked against PyTorch (serving/onnx_export.py): the
    check, or ``{"error": why}`` when the export was refused (then no ONNX file is left in the folder).

    Raises:
        DeployError: the export was refused and ``serving.runtime`` is ``onnx`` (nothing would be left to serve).
    """
    from serving import onnx_export

    export = onnx_export.export_classifier if kind == "classifier" else onnx_export.export_detector
    try:
        return export(folder, cfg.serving.onnx_max_abs_diff)
    except Exception as e:  # noqa: BLE001 - a refused check, or a model that does not even load: said, not raised
        why = (
            str(e)
            if isinstance(e, onnx_export.OnnxMismatch)
            else f"the {kind} could not be exported: {type(e).__name__}: {e}"
        )
        (folder / onnx_export.FILES[kind]).unlink(missing_ok=True)
        if cfg.serving.runtime == "onnx":
            raise DeployError(f"{why} (serving.runtime is onnx: nothing deployed)") from e
        return {"error": why}


def to_bento_store(kind: str, cfg: Config, version: str | None = None) -> tuple[str, dict[str, Any]]:
    """Copy ``kind``'s champion (or ``version``) into the Bento model store, with its ONNX export checked against
    PyTorch (:func:`export_onnx`) as ``cfg`` (the run's configuration) says; returns (bento tag, metadata)."""
    import bentoml

    name = registry.model_name(kind)
    version = version or registry.champion(name)
    if version is None:
        raise DeployError(f"{name} has no champion in the registry ({registry.tracking_uri()}); run `drspot train`")
    mv = registry.client().get_model_version(name, version)
    ref = f"{name}/{version}"
    try:
        existing = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        existing = []
    for m in existing:
        md = m.info.metadata
        same = md.get("registry") == ref and md.get("model_hash") == mv.tags.get("model_hash")
        if same and "onnx" in md and (cfg.serving.runtime == "torch" or "error" not in md["onnx"]):
            return str(m.tag), dict(md)
    metadata = {
        "registry": ref,
        "registry_name": name,
        "registry_version": version,
        "tracking_uri": registry.tracking_uri(),
        **{k: mv.tags.get(k) for k in ("data_version", "manifest_hash", "git_commit", "params_hash", "model_hash")},
        "metrics": {k[len("metric.") :]: float(v) for k, v in mv.tags.items() if k.startswith("metric.")},
    }
    folder = registry.download(name, version)
    try:
        metadata["onnx"] = export_onnx(kind, folder, cfg)
        with bentoml.models.create(
            name, labels={"registry_version": version, "kind": kind}, metadata=metadata
        ) as model:
            shutil.copytree(folder, model.path, dirs_exist_ok=True)
    finally:
        shutil.rmtree(folder.parent.parent, ignore_errors=True)
    return str(model.tag), metadata


def build_bento(tags: dict[str, str], registry_refs: dict[str, str]) -> str:
    """``bentoml build`` of the service pinned to the model-store ``tags`` (offline: no package locking)."""
    import bentoml

    bento = bentoml.bentos.build_bentofile(
        str(BENTOFILE),
        build_ctx=str(SOURCE),
        labels={"classifier": registry_refs["classifier"], "detector": registry_refs["detector"]},
        args={"classifier": tags["classifier"], "detector": tags["detector"]},
    )
    return str(bento.tag)


def deploy(cfg: Config, build: bool = True) -> dict[str, Any]:
    """Champions into the model store, then ``bentoml build`` (offline: no package locking).

    Prediction logs that earlier DrSpot versions left inside Bento folders are imported into the configured log
    first (idempotent), so no logged prediction, confirmation or stored image stays behind in an old Bento.
    """
    import bentoml

    from serving.log_import import import_stranded

    imported = [(str(src), n) for src, n in import_stranded(cfg) if n["predictions"] or n["feedback"]]
    tags, meta = {}, {}
    for kind in ("classifier", "detector"):
        tags[kind], meta[kind] = to_bento_store(kind, cfg)
    result: dict[str, Any] = {
        "models": tags,
        "registry": {k: m["registry"] for k, m in meta.items()},
        "onnx": {k: m["onnx"] for k, m in meta.items()},
    }
    if imported:
        result["imported_logs"] = imported
    if build:
        import bentoml

        result["bento"] = build_bento(tags, {k: m["registry"] for k, m in meta.items()})
        result["bento_path"] = str(bentoml.bentos.get(result["bento"]).path)
    # the configuration the models were deployed with, before deployed.json names the Bento (a follower that sees the
    # new Bento finds its configuration already there)
    written = cfg.write(cfg.runtime.deployed_config)
    result["config"] = {"profile": cfg.profile, "digest": cfg.digest(), "file": str(written)}
    state = cfg.runtime.deployed
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(f".{state.name}.tmp")  # `drspot serve` follows this file: it never sees half of it
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(state)
    return result


def serves_champions(cfg: Config) -> bool:
    """Whether the last built Bento (``deployed.json``) holds the registry's current champions."""
    state = cfg.runtime.deployed
    if not state.is_file():
        return False
    built = json.loads(state.read_text())
    if "bento" not in built:
        return False
    for kind in ("classifier", "detector"):
        name = registry.model_name(kind)
        if built.get("registry", {}).get(kind) != f"{name}/{registry.champion(name)}":
            return False
    return True
