"""One typed configuration, loaded from ``params.yaml`` with a profile.

``params.yaml`` has a ``default`` section holding every key, and profiles (``demo``, ``test``,
``full``) that override parts of it. The merged result is validated by pydantic models that reject
unknown keys and wrong types; :class:`ConfigError` names the offending key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from infra.env import CODE, HOME_ENV, project_root
from infra.state import StatePaths

PROFILES = ("demo", "test", "full")
DEFAULT_PROFILE = "demo"


class UsageError(ValueError):
    """A value the user gave (an option, a setting) that cannot be used: ``drspot`` exits 2, as for a usage error."""


class ConfigError(UsageError):
    """The parameters file is missing, malformed, or holds an unknown key or a wrong type."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


class Classes(_Strict):
    names: list[str] = Field(min_length=2)
    malignant: list[str]
    aliases: dict[str, str] = {}

    @model_validator(mode="after")
    def _check(self) -> Classes:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"classes.names has duplicates: {self.names}")
        unknown = [m for m in self.malignant if m not in self.names]
        if unknown:
            raise ValueError(f"classes.malignant names classes not in classes.names: {unknown}")
        bad = {k: v for k, v in self.aliases.items() if v not in self.names}
        if bad:
            raise ValueError(f"classes.aliases map to classes not in classes.names: {bad}")
        return self

    def normalise(self, raw: str | None) -> str | None:
        """Map a source's spelling of a label to a configured class name (or return it unchanged).

        Case and surrounding space are ignored; ``aliases`` renames (e.g. ``AK`` to ``akiec``). A
        value that maps to no class comes back as given, so the data gate can quarantine it.
        """
        if raw is None:
            return None
        key = str(raw).strip()
        if key == "":
            return None
        lowered = {k.lower(): v for k, v in self.aliases.items()}
        if key.lower() in lowered:
            return lowered[key.lower()]
        if key.lower() in self.names:
            return key.lower()
        return key


class Paths(_Strict):
    data: str
    raw: str
    reports: str
    prepared: str
    models: str


class Faults(_Strict):
    exact_duplicates: int = Field(ge=0)
    near_duplicates: int = Field(ge=0)
    corrupt: int = Field(ge=0)
    unknown_labels: int = Field(ge=0)
    tiny: int = Field(ge=0)


class Shift(_Strict):
    colour_cast: list[float] = Field(min_length=3, max_length=3)
    blur_radius: float = Field(ge=0)
    exposure: float = Field(gt=0)


class Synthetic(_Strict):
    n_lesions: int = Field(ge=7)
    images_per_lesion: list[int] = Field(min_length=2, max_length=2)
    width: int = Field(ge=32)
    height: int = Field(ge=32)
    jpeg_quality: int = Field(ge=50, le=100)
    class_weights: dict[str, float]
    min_lesions_per_class: int = Field(ge=1)
    faults: Faults
    shift: Shift

    @model_validator(mode="after")
    def _check(self) -> Synthetic:
        lo, hi = self.images_per_lesion
        if not 1 <= lo <= hi:
            raise ValueError(f"synthetic.images_per_lesion must be [min, max] with 1 <= min <= max, got {[lo, hi]}")
        return self


class Ingest(_Strict):
    row_group_size: int = Field(ge=1)
    max_report_rows: int = Field(ge=1)
    class_map: dict[str, dict[str, str]] = {}


Severity = Literal["error", "warn", "info"]


class Validate(_Strict):
    min_side: int = Field(ge=1)
    max_side: int = Field(ge=1)
    max_pixels: int = Field(ge=1)
    blank_std: float = Field(ge=0)
    workers: int = Field(ge=0)
    max_listed_rows: int = Field(ge=1)
    severity: dict[str, Severity]


class Dedup(_Strict):
    max_distance: int = Field(ge=0, le=32)
    verify: bool
    min_correlation: float = Field(ge=0, le=1)
    min_centre_correlation: float = Field(ge=-1, le=1)
    link_lesions: bool


class Split(_Strict):
    ratios: dict[str, float]
    source_split: Literal["keep", "regroup"]
    max_class_drift: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> Split:
        if set(self.ratios) != {"train", "val", "test"}:
            raise ValueError(f"split.ratios must name train, val and test, got {sorted(self.ratios)}")
        if any(v < 0 for v in self.ratios.values()):
            raise ValueError(f"split.ratios must not be negative: {self.ratios}")
        total = sum(self.ratios.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.ratios must sum to 1, they sum to {total:g}: {self.ratios}")
        return self


class Augment(_Strict):
    hflip: bool
    vflip: bool
    rotate90: bool
    scale: list[float] = Field(min_length=2, max_length=2)
    color_jitter: float = Field(ge=0, le=1)
    mixup: float = Field(ge=0)
    cutmix: float = Field(ge=0)


class EarlyStopping(_Strict):
    metric: Literal["macro_auc", "balanced_accuracy", "accuracy"]
    patience: int = Field(ge=1)


class LPFT(_Strict):
    enabled: bool
    probe_epochs: int = Field(ge=0)
    probe_lr: float = Field(gt=0)


class Distillation(_Strict):
    enabled: bool
    teachers: list[str]
    alpha: float = Field(ge=0, le=1)
    temperature: float = Field(gt=0)


class ModelInit(_Strict):
    """Start training from a trained model (``retrain.init: champion`` sets it for a retrain's challengers)."""

    path: str | None = None  # the model folder (relative to the state home or absolute)
    version: str | None = None  # its registered version: the new model's parent (lineage)
    sha256: str | None = None  # its weights' hash: a changed start re-runs the DVC stage

    def origin(self) -> dict[str, Any]:
        """Where a model trained from this start came from (its config's ``init``): a registered version is the
        champion a retrain started from."""
        role = "champion" if self.version else "model"
        return {"from": role, "version": self.version, "sha256": self.sha256, "path": self.path}


class Classifier(_Strict):
    backbone: str
    input_size: int = Field(ge=16)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    optimizer: Literal["adamw", "sgd"]
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    schedule: Literal["onecycle", "cosine", "constant"]
    label_smoothing: float = Field(ge=0, lt=1)
    imbalance: Literal["none", "loss_weights", "weighted_sampling"]
    source_share: dict[str, float] = Field(default_factory=dict)
    augment: Augment
    early_stopping: EarlyStopping
    crop_margin: float = Field(ge=0)
    pretrained: bool
    pretrained_path: str | None
    lp_ft: LPFT
    distillation: Distillation
    tta: bool | Literal["none", "flip", "flips", "dihedral"]  # true = flip (components/model/classifier.py)
    # the trained model's views chosen on validation among these (components/model/answer.py); empty: ``tta``
    tta_choices: list[Literal["none", "flip", "flips", "dihedral"]] = Field(default_factory=list)
    ema: float = Field(default=0.0, ge=0, lt=1)
    logit_adjustment: list[Annotated[float, Field(ge=0, le=3)]] = Field(default_factory=lambda: [0.0], min_length=1)
    logit_adjustment_source_min_rows: int = Field(default=50, ge=0)
    threads: int = Field(ge=0)
    init: ModelInit = ModelInit()

    @model_validator(mode="after")
    def _shares(self):
        bad = {k: v for k, v in self.source_share.items() if not 0 < v < 1}
        if bad:
            raise ValueError(f"source_share: each share must be between 0 and 1 (exclusive), got {bad}")
        if sum(self.source_share.values()) >= 1:
            raise ValueError(
                f"source_share: the shares sum to {sum(self.source_share.values()):g}; leave the rest some"
            )
        return self


class Detector(_Strict):
    arch: str
    imgsz: int = Field(ge=32)
    epochs: int = Field(ge=1)
    batch: int = Field(ge=1)
    patience: int = Field(ge=1)
    mosaic: float = Field(ge=0, le=1)
    fraction: float = Field(gt=0, le=1)
    single_class: bool
    conf: float = Field(gt=0, lt=1)
    iou: float = Field(gt=0, lt=1)
    workers: int = Field(ge=0)
    lr0: float = Field(gt=0)
    warmup_epochs: float = Field(ge=0)
    init: ModelInit = ModelInit()


class Evaluate(_Strict):
    n_bootstrap: int = Field(ge=10)
    # the name before 2026-12 is still read (configurations recorded by earlier runs and deployments)
    malignant_target_sensitivity: float = Field(
        gt=0, le=1, validation_alias=AliasChoices("malignant_target_sensitivity", "target_sensitivity")
    )
    ece_bins: int = Field(ge=2)
    slice_min_rows: int = Field(ge=1)
    malignant_prevalence: float = Field(gt=0, lt=1)
    gradcam_samples: int = Field(ge=0)
    latency_repeats: int = Field(ge=1)
    robustness: dict[Literal["blur", "noise", "brightness", "jpeg"], list[float]]


SLICE_METRICS = ("malignant_sensitivity", "accuracy", "balanced_accuracy", "macro_auc", "primary")


class GateSources(_Strict):
    metric: Literal[SLICE_METRICS]
    improve: list[str]
    max_drop: float = Field(ge=0)


class GateSlices(_Strict):
    columns: list[str]
    min_cases: int = Field(ge=1)
    min_malignant: int = Field(ge=1)
    floors: dict[Literal[SLICE_METRICS], float]
    max_drop: dict[Literal[SLICE_METRICS], float]
    sources: GateSources


class ServingCheck(_Strict):
    enabled: bool
    canaries: int = Field(ge=1)
    tolerance: float = Field(gt=0)
    latency_ratio: float = Field(gt=0)
    start_timeout_s: int = Field(ge=10)


class Approval(_Strict):
    required: bool
    timeout_h: float = Field(gt=0)


class Gate(_Strict):
    primary_metric: Literal["macro_auc", "balanced_accuracy", "accuracy", "malignant_auc"]
    tolerance: float = Field(ge=0)
    malignant_sensitivity_floor: float = Field(ge=0, le=1)
    first_model_floors: dict[str, float]
    detector_metric: Literal["map50", "map50_95"]
    detector_tolerance: float = Field(ge=0)
    detector_first_floor: float = Field(ge=0, le=1)
    serving_check: ServingCheck
    slices: GateSlices
    approval: Approval


class Stability(_Strict):
    hold_s: float = Field(ge=0)
    min_frames: int = Field(ge=1)
    min_confidence: float = Field(ge=0, le=1)
    max_gap_s: float = Field(gt=0)
    max_frames: int = Field(ge=1)


class Serving(_Strict):
    host: str
    port: int = Field(ge=1, le=65535)
    max_body_mb: float = Field(gt=0)
    max_pixels: int = Field(ge=1)
    formats: list[str] = Field(min_length=1)
    min_side: int = Field(ge=1)
    quality_policy: Literal["warn", "reject"]
    quality_limits: Literal["calibrated", "fixed"]
    quality_percentile: float = Field(gt=0, lt=50)
    blur_min: float = Field(ge=0)
    brightness_min: float = Field(ge=0, le=1)
    brightness_max: float = Field(ge=0, le=1)
    low_resolution_side: int = Field(ge=1)
    detector_conf: float | None = Field(gt=0, le=1)
    high_risk_probability: float = Field(gt=0, le=1)
    ood_quantile: float = Field(gt=0, le=1)
    uncertain_below: float = Field(ge=0, le=1)
    language: str
    store_images: bool
    database_url: str | None
    images_dir: str
    feedback_key_env: str
    batching: bool
    workers: int = Field(ge=1)
    runtime: Literal["torch", "onnx"]
    onnx_max_abs_diff: float = Field(gt=0)
    report_photos: int = Field(ge=0)
    stability: Stability
    follow_s: float = Field(gt=0)
    drain_s: float = Field(ge=0)
    # defaults: a configuration resolved before these keys existed (a deployed Bento's) still loads
    max_inflight: int = Field(64, ge=1)
    body_timeout_s: float = Field(30, gt=0)
    work_side: int = Field(2048, ge=64)
    max_connections: int = Field(256, ge=1)
    threads: int = Field(0, ge=0)
    header_timeout_s: float = Field(10, gt=0)
    max_decode_pixels: int = Field(16_000_000, ge=1)
    max_batch_size: int = Field(ge=1)
    max_latency_ms: int = Field(ge=1)


class MonitorQuality(_Strict):
    last_cases: int = Field(ge=1)
    min_malignant: int = Field(ge=1)
    sensitivity_floor: float = Field(ge=0, le=1)
    period: Literal["day", "week"]


class Review(_Strict):
    pool: int = Field(ge=1)
    random_share: float = Field(ge=0, le=1)
    spread: Literal["clusters", "classes", "none"]


class Monitor(_Strict):
    min_rows: int = Field(ge=2)
    last: int = Field(ge=2)
    drift_share: float = Field(gt=0, le=1)
    embedding_share: float = Field(gt=0, le=1)
    prediction_drift: bool
    num_method: str
    cat_method: str
    threshold: float = Field(gt=0, lt=1)
    correction: Literal["bonferroni", "none"]
    reports: str
    cron: str
    quality: MonitorQuality
    review: Review


class Finetune(_Strict):
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    schedule: Literal["onecycle", "cosine", "constant"]
    new_share: float = Field(ge=0, lt=1)
    imbalance: Literal["none", "loss_weights", "weighted_sampling"]
    detector_epochs: int = Field(ge=1)
    detector_lr0: float = Field(gt=0)


class Retrain(_Strict):
    min_new_cases: int = Field(ge=1)
    feedback_dir: str
    deploy: bool
    cron: str
    timezone: str
    init: Literal["champion", "pretrained"]
    finetune: Finetune


class FlowTimeouts(_Strict):
    data: float = Field(gt=0)
    train: float = Field(gt=0)
    evaluate: float = Field(gt=0)
    registration: float = Field(gt=0)
    deploy: float = Field(gt=0)
    push: float = Field(gt=0)


class Flows(_Strict):
    timeout_s: FlowTimeouts
    retries: int = Field(ge=0)
    retry_delay_s: float = Field(ge=0)


class Alerts(_Strict):
    file: str
    webhook_url: str | None
    prefect_blocks: list[str]
    kinds: list[Literal["drift", "quality", "gate", "flow_failed", "nightly_missed", "serving"]]
    timeout_s: float = Field(gt=0)
    nightly_grace_h: float = Field(gt=0)


class Compare(_Strict):
    backbones: list[str]
    named_class: str
    distill: bool
    student: str
    epochs: int | None = Field(default=None, ge=1)


class Compute(_Strict):
    dask_address: str | None
    chunk_size: int = Field(ge=1)
    pair_chunk_size: int = Field(ge=1)
    connect_timeout_s: float = Field(gt=0)
    local_workers: int = Field(ge=0)


class Config(_Strict):
    profile: str
    seed: int
    classes: Classes
    paths: Paths
    synthetic: Synthetic
    ingest: Ingest
    validate_: Validate = Field(alias="validate")
    dedup: Dedup
    split: Split
    classifier: Classifier
    detector: Detector
    evaluate: Evaluate
    gate: Gate
    serving: Serving
    monitor: Monitor
    retrain: Retrain
    flows: Flows
    alerts: Alerts
    compute: Compute
    compare: Compare

    @model_validator(mode="after")
    def _check(self) -> Config:
        bad = [k for k in self.synthetic.class_weights if k not in self.classes.names]
        if bad:
            raise ValueError(f"synthetic.class_weights names classes not in classes.names: {bad}")
        bad_map = {
            f"{kind}.{src}": dst
            for kind, m in self.ingest.class_map.items()
            for src, dst in m.items()
            if dst not in self.classes.names
        }
        if bad_map:
            raise ValueError(f"ingest.class_map maps to classes not in classes.names: {bad_map}")
        return self

    _base: Path = PrivateAttr(default_factory=project_root)

    @property
    def home(self) -> Path:
        """The state home this configuration's relative paths resolve against (:func:`infra.env.project_root`)."""
        return self._base

    def at(self, home: str | Path) -> Config:
        """The same configuration with its relative paths resolved against another project folder."""
        other = self.model_copy()
        other._base = Path(home).resolve()
        return other

    @property
    def runtime(self) -> StatePaths:
        """Where this run's state home keeps its files (the prediction log, locks, run configs, logs, ...)."""
        return StatePaths(self._base)

    def resolve(self, relative: str) -> Path:
        """A path from the config: absolute, or relative to the state home (never to where the code sits)."""
        p = Path(relative)
        return p if p.is_absolute() else self._base / p

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def updated(self, tree: dict[str, Any]) -> Config:
        """This configuration with the values in ``tree`` (nested like params.yaml) replaced, checked like any other
        setting; the state home is kept. How a flow hands a derived decision down (e.g. the retrain's start)."""
        merged = _merge(self.as_dict(), tree, "")
        try:
            other = Config.model_validate(merged)
        except ValidationError as e:
            raise ConfigError(_format(e, "a derived setting")) from None
        other._base = self._base
        return other

    def digest(self) -> str:
        """A stable hash of the resolved config, for lineage tags."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        """The resolved configuration as YAML, headed by its profile and digest (what a run records)."""
        head = f"# DrSpot resolved configuration: profile {self.profile}, digest {self.digest()}\n"
        return head + yaml.safe_dump(self.as_dict(), sort_keys=False)

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_yaml` to ``path`` atomically (a reader never sees half a file); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)
        return path


CONFIG_ENV = "DRSPOT_CONFIG"  # a resolved configuration file handed to a process (``drspot serve`` -> the service)


def default_params_path() -> Path:
    """``$DRSPOT_PARAMS``, else the state home's ``params.yaml``, else the one beside the code (a Bento's copy)."""
    if os.environ.get("DRSPOT_PARAMS"):
        return Path(os.environ["DRSPOT_PARAMS"])
    try:
        home = project_root() / "params.yaml"
    except Exception:  # noqa: BLE001 - no state home: the code's own copy still says what the parameters are
        home = None
    return home if home is not None and home.is_file() else CODE / "params.yaml"


def _merge(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if key not in out:
            raise ConfigError(f"unknown key '{path}' (not in the default section of params.yaml)")
        if (
            isinstance(value, dict)
            and isinstance(out[key], dict)
            and key
            not in {
                "class_weights",
                "aliases",
                "class_map",
                "ratios",
                "robustness",
                "first_model_floors",
                "source_share",
            }
        ):
            out[key] = _merge(out[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _settings(text: str) -> dict[str, Any]:
    """``$DRSPOT_SET``: ``key.path=value`` pairs separated by ``;`` (values in YAML), applied after the
    profile, e.g. ``DRSPOT_SET="serving.store_images=true;monitor.last=500"``."""
    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r} is not key.path=value")
        d = out
        *parents, last = key.strip().split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = yaml.safe_load(value)
    return out


def _format(err: ValidationError, source: str, layers: Sequence[tuple[str, dict[str, Any]]] = ()) -> str:
    """The validation errors, each blamed on the setting that gave the value: the last of ``layers`` (source,
    nested settings) holding its key, else ``source`` (the parameters file and profile)."""
    by_source: dict[str, list[str]] = {}
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "(top level)"
        blame = next((name for name, tree in reversed(layers) if _holds(tree, loc)), source)
        if e["type"] == "extra_forbidden":
            text = f"unknown key '{key}'"
        elif e["type"] == "missing":
            text = f"missing key '{key}'"
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            text = f"key '{key}': {e['msg']} (got {shown})"
        by_source.setdefault(blame, []).append(text)
    return "; ".join(f"{name}: " + "; ".join(texts) for name, texts in by_source.items())


def _holds(tree: dict[str, Any], loc: list[str]) -> bool:
    for part in loc:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for k, v in tree.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def load_config(
    profile: str | None = None,
    path: str | Path | None = None,
    sets: Sequence[str] = (),
    notes: list[str] | None = None,
) -> Config:
    """Load ``params.yaml``'s ``default`` section overridden by ``profile``, then ``$DRSPOT_SET``, then ``sets``
    (``drspot -S key=value``), and validate it.

    Args:
        profile: one of the file's profiles; ``$DRSPOT_PROFILE`` or ``demo`` when None.
        path: the parameters file; ``$DRSPOT_PARAMS`` or ``<project>/params.yaml`` when None.
        sets: ``key.path=value`` settings given on the command line (values in YAML), applied last.
        notes: where to add a line for each setting that overrides another source's (the caller warns).

    Raises:
        ConfigError: naming the source that was wrong (the file and profile, ``DRSPOT_SET`` or ``-S``) and the key.
    """
    notes = notes if notes is not None else []
    if profile is None and path is None and not sets and os.environ.get(CONFIG_ENV):
        if os.environ.get("DRSPOT_SET"):
            notes.append(f"DRSPOT_SET is ignored: {CONFIG_ENV} names a configuration resolved already")
        return load_resolved(os.environ[CONFIG_ENV], CONFIG_ENV)
    profile = profile or os.environ.get("DRSPOT_PROFILE") or DEFAULT_PROFILE
    path = Path(path) if path else default_params_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"parameters file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("default"), dict):
        raise ConfigError(f"{path} must be a mapping with a 'default' section")
    profiles = [k for k in raw if k != "default"]
    if profile not in profiles:
        raise ConfigError(f"unknown profile '{profile}' in {path}; choose one of: {', '.join(profiles)}")
    override = raw.get(profile) or {}
    if not isinstance(override, dict):
        raise ConfigError(f"{path}: profile '{profile}' must be a mapping")
    try:
        merged = _merge(raw["default"], override, "")
    except ConfigError as e:
        raise ConfigError(f"{path} [profile {profile}]: {e}") from None
    env_sets = os.environ.get("DRSPOT_SET", "")
    layers: list[tuple[str, dict[str, Any]]] = []
    for source, text in [(f"DRSPOT_SET={env_sets!r}", env_sets)] + [(f"-S {x!r}", x) for x in sets]:
        try:
            tree = _settings(text)
            merged = _merge(merged, tree, "")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        for earlier, before in layers:
            for key in sorted(_keys(tree) & _keys(before)):
                notes.append(f"{source} overrides {key} of {earlier}")
        layers.append((source, tree))
    merged["profile"] = profile
    try:
        cfg = Config.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format(e, f"{path} [profile {profile}]", layers)) from None
    return cfg


def load_resolved(path: str | Path, setting: str = "--config") -> Config:
    """A configuration resolved earlier (``Config.write``), taken as it is: no profile, no ``DRSPOT_SET``.

    This is how a run hands its configuration to the processes it starts (DVC stages, the service), so that
    none of them re-resolves a profile by name.

    Raises:
        ConfigError: naming the file and ``setting`` when it is missing, malformed or invalid.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"resolved configuration not found: {path} ({setting})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} ({setting}) is not valid YAML: {e}") from None
    if not isinstance(raw, dict) or "profile" not in raw:
        raise ConfigError(f"{path} ({setting}) is not a resolved DrSpot configuration (write one with `drspot config`)")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, f"{path} ({setting})")) from None


def hand_over(cfg: Config, name: str) -> dict[str, str]:
    """The variables that hand a child process (the service, a flow-run worker) this run's decisions: the state home
    and the resolved configuration, written to ``<home>/.drspot/run/<name>.yaml``, so that it re-derives neither."""
    path = cfg.write(cfg.runtime.run_config(name))
    return {HOME_ENV: str(cfg.home), CONFIG_ENV: str(path)}
