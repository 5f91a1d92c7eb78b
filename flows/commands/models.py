"""``drspot`` commands: training, evaluation, comparison, the registry and the model gate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from flows.commands import MODELS, invoke

Kind = Literal["classifier", "detector"]


def _split_manifest(args, cfg) -> tuple[Path, Path]:
    from components.data import gate

    dataset = Path(args.dataset) if args.dataset else cfg.resolve(cfg.paths.data)
    return dataset, gate.step_dirs(gate.prepared_dir(dataset, cfg, args.prepared))["split"] / "split.parquet"


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from components.model.train_classifier import train_classifier

    cfg = args.cfg
    dataset, manifest = _split_manifest(args, cfg)
    out = args.out or cfg.resolve(cfg.paths.models) / "classifier"
    train_classifier(manifest, dataset, out, cfg, resume=not args.no_resume)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from components.model.compare import compare, markdown

    cfg = args.cfg
    c = cfg.compare.model_copy(
        update={
            k: v
            for k, v in {
                "backbones": args.backbones.split(",") if args.backbones else None,
                "epochs": args.epochs,
                "named_class": args.named_class,
                "distill": False if args.no_distill else None,
            }.items()
            if v is not None
        }
    )
    cfg = cfg.model_copy(update={"compare": c})
    dataset, manifest = _split_manifest(args, cfg)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: run `drspot prepare {dataset}` (or `drspot train`) first")
    out = args.out or cfg.resolve(cfg.paths.reports) / "compare"
    result = compare(manifest, dataset, out, cfg)
    print(markdown(result["rows"], c.named_class))
    print(f"written: {out / 'compare.md'}, {out / 'compare.html'}, {out / 'compare.json'}")
    print(f"MLflow: run {result['meta']['mlflow run']} (experiment drspot) with a child run per model")
    return 0


def cmd_train_detector(args: argparse.Namespace) -> int:
    from components.model.train_detector import train_detector

    cfg = args.cfg
    dataset, manifest = _split_manifest(args, cfg)
    train_detector(manifest, dataset, args.out or cfg.resolve(cfg.paths.models) / "detector", cfg)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from components.data.versioning import data_version
    from components.model.evaluate import evaluate

    cfg = args.cfg
    dataset, manifest = _split_manifest(args, cfg)
    models = cfg.resolve(cfg.paths.models)
    out = args.out or cfg.resolve(cfg.paths.reports) / "evaluation"
    version = data_version(cfg.resolve("data.dvc"))
    r = evaluate(
        args.model or models / "classifier",
        manifest,
        dataset,
        out,
        cfg,
        detector_dir=args.detector or models / "detector",
        data_version=version,
    )
    for k, v in r["metrics"].items():
        lo, hi = r["intervals_95"][k]
        print(f"  {k:24s} {v:.4f}  (95% CI {lo:.4f}-{hi:.4f})")
    print(
        f"  malignant threshold {r['malignant_threshold']:.4f} (val, sensitivity >= {r['target_sensitivity']}), "
        f"temperature {r['temperature']:.3f}, ECE {r['ece_before']:.4f} -> {r['ece_after']:.4f}"
    )
    print(f"report: {out / 'report.html'}; model card: {out / 'model_card.md'}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from components.data.versioning import data_version
    from components.model import registry

    cfg = args.cfg
    dataset, manifest = _split_manifest(args, cfg)
    models = cfg.resolve(cfg.paths.models)
    tags = registry.lineage(cfg, manifest, data_version(cfg.resolve("data.dvc")))
    report = args.report or cfg.resolve(cfg.paths.reports) / "evaluation"
    evaluation = json.loads((report / "evaluation.json").read_text())
    version = registry.register("classifier", args.model or models / "classifier", evaluation["metrics"], tags, report)
    print(f"registered {registry.CLASSIFIER} v{version} (alias challenger); lineage {tags}")
    detector = args.detector or models / "detector"
    if (detector / "detector_config.json").is_file():
        dmetrics = json.loads((detector / "detector_config.json").read_text())["metrics"]
        dversion = registry.register("detector", detector, dmetrics, tags)
        print(f"registered {registry.DETECTOR} v{dversion} (alias challenger)")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from components.model import registry
    from flows.train import promote_flow

    cfg = args.cfg
    dataset, manifest = _split_manifest(args, cfg)
    r = promote_flow(args.kind, args.version, dataset=str(dataset), manifest=str(manifest), cfg=cfg)
    name = registry.model_name(args.kind)
    print(f"{name} v{r['version']}: {'PROMOTED to champion' if r['promote'] else 'REJECTED'}: {r['reason']}")
    return 0 if r["promote"] else 3


def cmd_approvals(args: argparse.Namespace) -> int:
    from components.model import approval, registry

    expired = approval.expire(args.cfg)
    queue = approval.waiting("classifier") + approval.waiting("detector")
    if args.json:
        print(json.dumps({"waiting": queue, "expired_now": expired}, indent=2, default=str))
        return 0
    for w in expired:
        print(f"{registry.model_name(w['kind'])} v{w['version']}: approval timed out at {w['deadline']}: rejected")
    if not queue:
        print("no challenger waits for approval")
    for w in queue:
        print(
            f"{registry.model_name(w['kind'])} v{w['version']} waits since {w['requested_at']} (deadline "
            f"{w['deadline']}; champion v{w['champion_at_request']}): "
            f"drspot approve {w['kind']} {w['version']} --by NAME"
        )
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from components.model import approval, registry

    cfg = args.cfg
    r = approval.approve(cfg, args.kind, args.version, args.by)
    print(f"{registry.model_name(args.kind)} v{r['version']}: approved by {args.by}: PROMOTED to champion")
    if cfg.retrain.deploy and not args.no_deploy:
        from serving.deploy import deploy

        built = deploy(cfg)
        print(f"deployed Bento {built.get('bento')}: a running `drspot serve` switches to it")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    from components.model import approval, registry

    r = approval.reject(args.cfg, args.kind, args.version, args.by, args.reason or "")
    print(f"{registry.model_name(args.kind)} v{r['version']}: rejected by {args.by}; the champion is unchanged")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from components.model import registry

    old, new = registry.rollback(args.kind)
    print(f"{args.kind}: champion moved back from v{old} to v{new}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from flows.train import train_flow

    result = train_flow(str(args.dataset) if args.dataset else None, cfg=args.cfg)
    print(f"steps: prepare {result['prepare']}, training {result['steps']}")
    for r in result["results"]:
        print(f"{r['kind']}: v{r['version']}: {r['reason']} (champion v{r['champion']})")
    return 0


DatasetOpt = Annotated[Path | None, typer.Argument(help="dataset folder", show_default="paths.data")]
PreparedOpt = Annotated[
    Path | None, typer.Option(help="the data gate's folder", show_default="paths.prepared/<dataset name>")
]
KindOpt = Annotated[Kind, typer.Option(help="which model")]
ModelOpt = Annotated[Path | None, typer.Option(help="classifier folder", show_default="paths.models/classifier")]
DetectorOpt = Annotated[Path | None, typer.Option(help="detector folder", show_default="paths.models/detector")]
KindArg = Annotated[Kind, typer.Argument(help="which model", show_default=False)]


def train(
    ctx: typer.Context,
    dataset: Annotated[
        Path | None, typer.Argument(help="dataset folder", show_default="paths.data, through DVC")
    ] = None,
) -> None:
    """The train flow: prepare -> train both models -> evaluate -> register -> gate (-> champion).

    Each step is a Prefect task; DVC restores what is cached. A challenger becomes champion only when it
    beats the serving one (the model gate).

    **Example:** `drspot train` (the project dataset), `drspot -S classifier.epochs=3 train data/`
    """
    invoke(ctx, cmd_train, locals())


def train_classifier(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    prepared: PreparedOpt = None,
    out: Annotated[Path | None, typer.Option(help="output folder", show_default="paths.models/classifier")] = None,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="ignore a checkpoint left by an interrupted run")
    ] = False,
) -> None:
    """Train the timm classifier on the split's lesion crops (resumes an interrupted run).

    **Example:** `drspot train-classifier data/ --out models/classifier`
    """
    invoke(ctx, cmd_train_classifier, locals())


def train_detector(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    prepared: PreparedOpt = None,
    out: Annotated[Path | None, typer.Option(help="output folder", show_default="paths.models/detector")] = None,
) -> None:
    """Train the YOLO lesion detector on the split's boxes.

    **Example:** `drspot train-detector data/`
    """
    invoke(ctx, cmd_train_detector, locals())


def evaluate(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    prepared: PreparedOpt = None,
    out: Annotated[Path | None, typer.Option(help="output folder", show_default="paths.reports/evaluation")] = None,
    model: ModelOpt = None,
    detector: DetectorOpt = None,
) -> None:
    """Evaluate on the frozen test split: metrics with 95% intervals, calibration, plots, a model card.

    **Example:** `drspot evaluate data/` (writes report.html and model_card.md)
    """
    invoke(ctx, cmd_evaluate, locals())


def compare(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    prepared: PreparedOpt = None,
    out: Annotated[Path | None, typer.Option(help="output folder", show_default="paths.reports/compare")] = None,
    backbones: Annotated[
        str | None,
        typer.Option(metavar="A,B", help="timm names, comma-separated", show_default="compare.backbones"),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="epochs for every model", show_default="compare.epochs or classifier.epochs"),
    ] = None,
    named_class: Annotated[
        str | None, typer.Option(help="the class whose F1 gets a column", show_default="compare.named_class")
    ] = None,
    no_distill: Annotated[bool, typer.Option("--no-distill", help="skip the distilled student")] = False,
) -> None:
    """Train several backbones and a distilled student the same way; one table, one MLflow run each.

    **Example:** `drspot compare data/ --backbones resnet18,mobilenetv3_small_100 --epochs 2`
    """
    invoke(ctx, cmd_compare, locals())


def register_(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    prepared: PreparedOpt = None,
    model: ModelOpt = None,
    detector: DetectorOpt = None,
    report: Annotated[
        Path | None, typer.Option(help="evaluation folder", show_default="paths.reports/evaluation")
    ] = None,
) -> None:
    """Register the trained models in MLflow with their lineage (data version, git commit, params); alias
    challenger.

    **Example:** `drspot register data/`
    """
    invoke(ctx, cmd_register, locals())


def promote(
    ctx: typer.Context,
    kind: KindOpt = "classifier",
    version: Annotated[str | None, typer.Option(help="model version", show_default="the challenger")] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="dataset whose split re-judges a champion from older data", show_default="paths.data"),
    ] = None,
    prepared: PreparedOpt = None,
) -> None:
    """Run the model gate on a challenger; it becomes champion only if it beats the serving one.

    Exits 3 when the gate rejects it (the champion stays).

    **Example:** `drspot promote --kind classifier --version 4`
    """
    invoke(ctx, cmd_promote, locals())


def approvals(
    ctx: typer.Context, json_: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False
) -> None:
    """The challengers waiting for a person's approval (gate.approval), with their deadlines.

    **Example:** `drspot approvals --json`
    """
    invoke(ctx, cmd_approvals, locals())


def approve(
    ctx: typer.Context,
    kind: KindArg,
    version: Annotated[str | None, typer.Argument(help="the waiting version (another is refused)")] = None,
    by: Annotated[str, typer.Option(help="who decides (recorded on the model version)")] = ...,
    no_deploy: Annotated[bool, typer.Option("--no-deploy", help="do not build the Bento (retrain.deploy)")] = False,
) -> None:
    """Promote the challenger waiting for approval, and deploy it.

    **Example:** `drspot approve classifier 5 --by dr.kim`
    """
    invoke(ctx, cmd_approve, locals())


def reject(
    ctx: typer.Context,
    kind: KindArg,
    version: Annotated[str | None, typer.Argument(help="the waiting version (another is refused)")] = None,
    by: Annotated[str, typer.Option(help="who decides (recorded on the model version)")] = ...,
    reason: Annotated[str | None, typer.Option(help="why (recorded on the model version)")] = None,
) -> None:
    """Reject the challenger waiting for approval; the champion is unchanged.

    **Example:** `drspot reject classifier 5 --by dr.kim --reason "worse on melanoma"`
    """
    invoke(ctx, cmd_reject, locals())


def rollback(ctx: typer.Context, kind: KindOpt = "classifier") -> None:
    """Move the champion back to the previous champion (a running `drspot serve` follows after a deploy).

    **Example:** `drspot rollback --kind detector`
    """
    invoke(ctx, cmd_rollback, locals())


PANEL = MODELS
COMMANDS = (  # (name, function): `drspot --help` lists them in this order
    ("train", train),
    ("train-classifier", train_classifier),
    ("train-detector", train_detector),
    ("evaluate", evaluate),
    ("compare", compare),
    ("register", register_),
    ("promote", promote),
    ("approvals", approvals),
    ("approve", approve),
    ("reject", reject),
    ("rollback", rollback),
)
