"""``drspot`` commands: training, evaluation, comparison, the registry and the model gate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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

    for w in approval.expire(args.cfg):
        print(f"{registry.model_name(w['kind'])} v{w['version']}: approval timed out at {w['deadline']}: rejected")
    queue = approval.waiting("classifier") + approval.waiting("detector")
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


def register(sub) -> None:
    """Add this group's commands to the ``drspot`` parser's sub-commands."""
    for name, func, text in (
        ("train-classifier", cmd_train_classifier, "train the timm classifier on the split's lesion crops"),
        ("train-detector", cmd_train_detector, "train the YOLO lesion detector on the split's boxes"),
        ("evaluate", cmd_evaluate, "evaluate on the frozen test split: metrics, CIs, calibration, plots, model card"),
    ):
        t = sub.add_parser(name, help=text)
        t.add_argument("dataset", type=Path, nargs="?", help="dataset folder (default: paths.data)")
        t.add_argument("--prepared", type=Path, help="data-gate folder (default: paths.prepared/<dataset name>)")
        t.add_argument("--out", type=Path, help="output folder")
        if name == "train-classifier":
            t.add_argument("--no-resume", action="store_true", help="ignore a checkpoint left by an interrupted run")
        if name == "evaluate":
            t.add_argument("--model", type=Path, help="classifier folder (default: paths.models/classifier)")
            t.add_argument("--detector", type=Path, help="detector folder (default: paths.models/detector)")
        t.set_defaults(func=func)

    cp = sub.add_parser("compare", help="train several backbones + the distilled student the same way; one table")
    cp.add_argument("dataset", type=Path, nargs="?", help="dataset folder (default: paths.data)")
    cp.add_argument("--prepared", type=Path, help="data-gate folder (default: paths.prepared/<dataset name>)")
    cp.add_argument("--out", type=Path, help="output folder (default: paths.reports/compare)")
    cp.add_argument("--backbones", help="comma-separated timm names (default: compare.backbones)")
    cp.add_argument("--epochs", type=int, help="epochs for every model (default: compare.epochs or classifier.epochs)")
    cp.add_argument("--named-class", help="the class whose F1 gets a column (default: compare.named_class)")
    cp.add_argument("--no-distill", action="store_true", help="skip the distilled student")
    cp.set_defaults(func=cmd_compare)
    tr = sub.add_parser("train", help="the train flow: prepare -> train both -> evaluate -> register -> gate")
    tr.add_argument("dataset", type=Path, nargs="?", help="dataset folder (default: paths.data, through DVC)")
    tr.set_defaults(func=cmd_train)
    r = sub.add_parser("register", help="register the trained models in MLflow with lineage; alias challenger")
    r.add_argument("dataset", type=Path, nargs="?", help="dataset folder (default: paths.data)")
    r.add_argument("--prepared", type=Path, help="data-gate folder")
    r.add_argument("--model", type=Path, help="classifier folder (default: paths.models/classifier)")
    r.add_argument("--detector", type=Path, help="detector folder (default: paths.models/detector)")
    r.add_argument("--report", type=Path, help="evaluation folder (default: paths.reports/evaluation)")
    r.set_defaults(func=cmd_register)
    pr = sub.add_parser("promote", help="run the gate on the challenger; promote it to champion if it passes")
    pr.add_argument("--kind", choices=["classifier", "detector"], default="classifier")
    pr.add_argument("--version", help="model version (default: the one aliased challenger)")
    pr.add_argument("--dataset", help="dataset whose split re-judges a champion from older data (default: paths.data)")
    pr.add_argument("--prepared", type=Path, help="data-gate folder")
    pr.set_defaults(func=cmd_promote)
    ap_ = sub.add_parser("approvals", help="the challengers waiting for a person's approval (gate.approval)")
    ap_.set_defaults(func=cmd_approvals)
    for verb, text in (("approve", "promote the challenger waiting for approval"), ("reject", "reject it")):
        a = sub.add_parser(verb, help=text)
        a.add_argument("kind", choices=["classifier", "detector"])
        a.add_argument("version", nargs="?", help="the waiting version (checked: another is refused)")
        a.add_argument("--by", required=True, help="who decides (recorded on the model version)")
        if verb == "approve":
            a.add_argument("--no-deploy", action="store_true", help="do not build the Bento (retrain.deploy)")
            a.set_defaults(func=cmd_approve)
        else:
            a.add_argument("--reason", help="why (recorded on the model version)")
            a.set_defaults(func=cmd_reject)
    rb = sub.add_parser("rollback", help="move champion back to the previous champion")
    rb.add_argument("--kind", choices=["classifier", "detector"], default="classifier")
    rb.set_defaults(func=cmd_rollback)
