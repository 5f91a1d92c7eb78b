"""The ``drspot`` command line.

Every command loads the typed configuration (``--profile``), applies the offline settings (by
importing :mod:`components`) and calls the step in :mod:`components`; heavy libraries are
imported inside the commands that need them, so ``drspot --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import components  # noqa: F401  (offline settings before anything else)
from components.config import ConfigError, load_config, load_resolved


def _progress(label: str, total: int | None = None):
    state = {"last": 0.0}
    tty = sys.stderr.isatty()

    def show(done: int, total_: int | None = total) -> None:
        now = time.monotonic()
        final = total_ is not None and done >= total_
        if not final and now - state["last"] < (0.2 if tty else 5.0):
            return
        state["last"] = now
        text = f"{label}: {done}/{total_}" if total_ else f"{label}: {done}"
        print(("\r" if tty else "") + text, end="" if tty and not final else "\n", file=sys.stderr, flush=True)

    return show


def _kv(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected NAME=CLASS pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_config(args: argparse.Namespace) -> int:
    cfg = args.cfg
    if args.write:
        from flows.prepare import stage_config

        print(f"wrote {stage_config(cfg)} (profile {cfg.profile}, digest {cfg.digest()}): `dvc repro` runs with it")
    elif args.json:
        print(json.dumps(cfg.as_dict(), indent=2))
    else:
        print(cfg.to_yaml(), end="")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import os
    import shlex

    from components.env import exports, settings

    if args.export:
        for k, v in sorted(exports().items()):
            print(f"export {k}={shlex.quote(v)}")
        return 0
    print(json.dumps({k: os.environ.get(k) for k in settings()}, indent=2, sort_keys=True))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from components.ingest import ingest

    cfg = args.cfg
    opts: dict = {
        "images": args.images,
        "class_map": args.class_map,
        "ham_metadata": args.ham_metadata,
        "label_source": args.label_source,
        "lesion_csv": args.lesion_csv,
        "boxes": args.boxes,
        "id_prefix": args.id_prefix,
    }
    if args.kind == "synthetic":
        opts.update(
            generate=not args.no_generate,
            shifted=args.shifted,
            gen_progress=_progress("generate"),
            overrides={
                "seed": args.seed,
                "n_lesions": args.n_lesions,
                "exact_duplicates": args.exact_duplicates,
                "near_duplicates": args.near_duplicates,
                "corrupt": args.corrupt,
                "unknown_labels": args.unknown_labels,
                "tiny": args.tiny,
            },
        )
    result = ingest(args.kind, args.source, args.out, cfg, append=args.append, progress=_progress("ingest"), **opts)
    report_rows(result, cfg.ingest.max_report_rows)
    return 0


def report_rows(result, limit: int) -> None:
    """Print an ingest result: counts, then problems grouped by check (up to ``limit`` each)."""
    s = result.summary
    print(f"ingested {result.rows} rows ({result.kind}) into {result.out}")
    print(f"  lesions {s['lesions']}, images with boxes {s['images_with_boxes']}, boxes {s['boxes']}")
    print(f"  labels  {s['labels']}")
    if s["splits"]:
        print(f"  splits  {s['splits']}")
    counts = result.problem_counts()
    if counts:
        print(f"  problems {counts} (every row listed in {Path(result.out) / 'ingest_report.json'})")
        for check in counts:
            rows = [p for p in result.problems if p.check == check]
            kept = "kept for the data gate" if rows[0].kept else "not ingested"
            print(f"  - {check} ({len(rows)}, {kept}):")
            for p in rows[:limit]:
                print(f"      {p.row}: {p.detail}")
            if len(rows) > limit:
                print(f"      ... and {len(rows) - limit} more")


def _gate_step(step: str):
    def run(args: argparse.Namespace) -> int:
        from components import gate

        cfg = args.cfg
        prepared = gate.prepared_dir(args.dataset, cfg, args.prepared)
        fn = {"validate": gate.run_validate, "dedup": gate.run_dedup, "split": gate.run_split}[step]
        fn(args.dataset, prepared, cfg)
        s = gate.summary(prepared)
        out = gate.step_dirs(prepared)[step]
        if step == "validate":
            print(
                f"validated {s['rows_in']} rows: {s['rows_valid']} passed, "
                f"quarantined by check {s['quarantined_by_check']}"
            )
        elif step == "dedup":
            print(
                f"de-duplicated: {s['exact_pairs']} exact and {s['near_pairs']} near-duplicate pairs, "
                f"{s['duplicate_groups']} groups with several images, dropped {s['dropped_by_reason']}, "
                f"{s['label_conflicts']} label conflicts"
            )
        else:
            print(f"split: rows {s['rows_per_split']}, held out {s['held_out']}, leakage {s['leakage']}")
            if s["source_split_leakage"]:
                print(f"  the source's own split had: {s['source_split_leakage']}")
            if s["warning"]:
                print(f"WARNING: {s['warning']}", file=sys.stderr)
        print(f"  outputs in {out}")
        return 0

    return run


def cmd_prepare(args: argparse.Namespace) -> int:
    from flows.prepare import prepare_flow

    result = prepare_flow(str(args.dataset), str(args.prepared) if args.prepared else None, cfg=args.cfg)
    from components import gate

    print(gate.markdown(Path(result["prepared"]), args.dataset))
    print(f"\nsteps: {result['steps']}; outputs in {result['prepared']}")
    return 0


def _split_manifest(args, cfg) -> tuple[Path, Path]:
    from components import gate

    dataset = Path(args.dataset) if args.dataset else cfg.resolve(cfg.paths.data)
    return dataset, gate.step_dirs(gate.prepared_dir(dataset, cfg, args.prepared))["split"] / "split.parquet"


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from components.train_classifier import train_classifier

    cfg = args.cfg
    dataset, manifest = _split_manifest(args, cfg)
    out = args.out or cfg.resolve(cfg.paths.models) / "classifier"
    train_classifier(manifest, dataset, out, cfg, resume=not args.no_resume)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from components.compare import compare, markdown

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
    from components.train_detector import train_detector

    cfg = args.cfg
    dataset, manifest = _split_manifest(args, cfg)
    train_detector(manifest, dataset, args.out or cfg.resolve(cfg.paths.models) / "detector", cfg)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from components.evaluate import evaluate
    from components.versioning import data_version

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
    from components import registry
    from components.versioning import data_version

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
    from components import registry
    from flows.train import promote_flow

    cfg = args.cfg
    dataset, manifest = _split_manifest(args, cfg)
    r = promote_flow(args.kind, args.version, dataset=str(dataset), manifest=str(manifest), cfg=cfg)
    name = registry.model_name(args.kind)
    print(f"{name} v{r['version']}: {'PROMOTED to champion' if r['promote'] else 'REJECTED'}: {r['reason']}")
    return 0 if r["promote"] else 3


def cmd_approvals(args: argparse.Namespace) -> int:
    from components import approval, registry

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
    from components import approval, registry

    cfg = args.cfg
    r = approval.approve(cfg, args.kind, args.version, args.by)
    print(f"{registry.model_name(args.kind)} v{r['version']}: approved by {args.by}: PROMOTED to champion")
    if cfg.retrain.deploy and not args.no_deploy:
        from serving.deploy import deploy

        built = deploy(cfg)
        print(f"deployed Bento {built.get('bento')}: a running `drspot serve` switches to it")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    from components import approval, registry

    r = approval.reject(args.cfg, args.kind, args.version, args.by, args.reason or "")
    print(f"{registry.model_name(args.kind)} v{r['version']}: rejected by {args.by}; the champion is unchanged")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from components import alerts

    shown = alerts.recent(args.cfg, args.last)
    if not shown:
        print(f"no alerts in {alerts.alert_file(args.cfg)}")
    for a in shown:
        failed = [f"{k} {v}" for k, v in a.get("delivery", {}).items() if str(v).startswith("failed")]
        note = f"  [{'; '.join(failed)}]" if failed else ""
        print(f"{a['at']}  {a['kind']:<14} {a['severity']:<8} {a['title']}{note}")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from components import stack

    home = args.cfg.home
    if args.action == "up":
        rec = stack.up(home)
        for name, svc in rec["services"].items():
            where = svc.get("url") or svc.get("endpoint") or f"work pool {svc.get('pool')}"
            print(f"{name:<13} {where:<40} pid {svc['pid']}  log {svc['log']}")
        print(f"\npoint DrSpot at it:  source {stack.stack_dir(home) / 'stack.env'}")
        print("  " + "\n  ".join(f"{k}={v}" for k, v in rec["env"].items() if "SECRET" not in k))
        print("stop it:  drspot stack down")
    elif args.action == "down":
        stopped = stack.down(home)
        print(f"stopped: {', '.join(stopped)}" if stopped else "no stack was running here")
    else:
        st = stack.status(home)
        if not st["services"]:
            print(st["note"])
        for name, s in st["services"].items():
            print(f"{name:<13} pid {s['pid']}: {'answering' if s['answering'] else 'NOT answering'}")
        return 0 if all(s["answering"] for s in st["services"].values()) else 1
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from components import registry

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


def cmd_deploy(args: argparse.Namespace) -> int:
    from serving.deploy import deploy

    cfg = args.cfg
    r = deploy(cfg, build=not args.no_build)
    for kind in ("classifier", "detector"):
        print(f"{kind}: {r['registry'][kind]} -> Bento model {r['models'][kind]}")
        check = r["onnx"][kind]
        if "error" in check:
            print(f"  ONNX export refused: {check['error']}")
        else:
            worst = max(check["max_abs_diff"].values())
            diff = f"max abs difference from PyTorch {worst:.2g} (limit {check['limit']:g})"
            print(f"  ONNX export {check['file']}: {diff}")
    if "bento" in r:
        print(f"built Bento {r['bento']} ({r['bento_path']})")
        print("serve it: drspot serve   |   production image: bentoml containerize " + r["bento"])
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from serving.batch import predict

    r = predict(
        args.source,
        args.out,
        args.cfg,
        batch=args.batch,
        language=args.language,
        preprocess=args.preprocess,
        restart=args.restart,
    )
    print(
        f"scored {r['photos']} photos with {r['models']['classifier']} + {r['models']['detector']}: "
        f"{r['lesions']} lesion rows (high {r['by_risk']['high']}, medium {r['by_risk']['medium']}, "
        f"low {r['by_risk']['low']}), {r['fallback_photos']} photos assessed whole, {r['errors']} not scored"
        + (f", {r['resumed']} from the interrupted run" if r["resumed"] else "")
    )
    print(f"wrote {r['out']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from serving.deploy import SOURCE, deployed_file

    cfg = args.cfg
    state = deployed_file(cfg)
    if args.source:
        target = "serving.service:DrSpot"
    elif args.bento:
        target = args.bento
    elif state.is_file() and "bento" in json.loads(state.read_text()):
        target = json.loads(state.read_text())["bento"]
    else:
        raise FileNotFoundError(f"no Bento deployed yet ({state} is missing): run `drspot deploy` first")
    host, port = args.host or cfg.serving.host, args.port or cfg.serving.port
    from components.config import hand_over
    from serving.store import describe

    handed = hand_over(cfg, f"serve-{port}")
    env = {**os.environ, **handed}
    follow = not (args.source or args.bento or args.no_follow)
    print(f"serving {target} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    print(f"  state home {cfg.home}; prediction log {describe(cfg)}; configuration {env['DRSPOT_CONFIG']}", flush=True)
    if args.source:  # the service straight from this checkout (development)
        from serving.backend import command, metrics_dir

        cmd = command(target, host, port, metrics_dir("source", port))  # its own Prometheus folder
        return subprocess.call(cmd, cwd=SOURCE, env=env)
    from serving.switch import serve

    if follow:
        print(f"  a newly deployed Bento ({state}) is switched to without downtime", flush=True)
    return serve(cfg, target, host, port, handed, state, follow)


def cmd_monitor(args: argparse.Namespace) -> int:
    from flows.monitor import monitor_flow

    s = monitor_flow(since=args.since, last=args.last, cfg=args.cfg)
    print(f"drift monitor: {s['status'].upper()} ({s['rows']['current']} predictions in the window)")
    for r in s.get("reasons", []):
        print(f"  - {r}")
    if "report" in s:
        print(f"  drifted: {', '.join(s['drifted']) or 'nothing'}")
        print(f"  report: {s['report']}")
    print(quality_lines(s["quality"]))
    return 0


def quality_lines(q: dict) -> str:
    """The monitor's quality verdict as printed: the label rule, then the label-free estimate."""
    from components.quality import ESTIMATED

    r, est = q["rule"], q["estimate"]
    figures = ", ".join(f"{k.replace('_', ' ')} {est[k]:.3f}" for k in ESTIMATED if k in est)
    return (
        f"model quality: {r['status'].upper()} ({q['confirmed_cases']} confirmed case(s) in the log)\n"
        f"  - {r['reason']}\n"
        f"  estimated without labels (CBPE, {est.get('rows', 0)} predictions of {est.get('version', '-')}): "
        f"{figures or est.get('note', '')}\n"
        f"  report: {q['report']}"
    )


def cmd_retrain(args: argparse.Namespace) -> int:
    from flows.retrain import retrain_flow

    s = retrain_flow(trigger="by hand", min_new=args.min_new, deploy=not args.no_deploy, cfg=args.cfg)
    print(f"retrain: {s['status'].upper()}: {s['new_cases']} new confirmed case(s)")
    for x in s["skipped_cases"]:
        print(f"  not usable: {x['request_id']}: {x['reason']}")
    if s["status"] == "skipped":
        print(f"  {s['reason']}")
        return 0
    print(f"  data version {s['data_version_before']} -> {s['data_version']}")
    for r in s["gate"]:
        print(f"  {r['kind']}: v{r['version']}: {r['reason']} (champion v{r['champion']})")
    if s.get("deployed"):
        print(f"  deployed Bento {s['deployed']}: a running `drspot serve` switches to it")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from flows.schedule import deploy_to_pool, run_schedule

    cfg = args.cfg
    if args.pool:
        for name in deploy_to_pool(cfg, cfg.profile, args.pool):
            print(f"deployed {name} to work pool {args.pool} on {os.environ['PREFECT_API_URL']}")
        print(f"run them with a worker: prefect worker start --pool {args.pool}")
        return 0
    return run_schedule(cfg, cfg.profile, port=args.port)


def cmd_status(args: argparse.Namespace) -> int:
    from flows.status import collect, render

    s = collect(args.cfg)
    print(json.dumps(s, indent=2, default=str) if args.json else render(s))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.ui import run_ui

    return run_ui(args.cfg, args.prefect_port, args.mlflow_port)


def cmd_import_logs(args: argparse.Namespace) -> int:
    from serving.store import describe, import_stranded

    done = import_stranded(args.cfg, [p.resolve() for p in args.logs] or None)
    if not done:
        print("no prediction logs inside Bento folders: nothing to import")
    for src, n in done:
        print(
            f"{src}: {n['predictions']} predictions, {n['feedback']} confirmations, {n['images']} images imported "
            f"({n['predictions_present']} predictions and {n['feedback_present']} confirmations were there already"
            + (f"; {n['images_missing']} stored images missing at the source" if n["images_missing"] else "")
            + ")"
        )
    print(f"prediction log: {describe(args.cfg)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import real_source, run_demo, run_real_demo

    if args.real is None:
        return run_demo(args.cfg)
    return run_real_demo(args.cfg, real_source(args.cfg, args.real or None), keep_serving=args.keep_serving)


def build_parser() -> argparse.ArgumentParser:
    # --profile/--params are accepted before or after the command; SUPPRESS keeps a
    # sub-command's absent option from hiding the global one.
    common = argparse.ArgumentParser(add_help=False)
    p = argparse.ArgumentParser(prog="drspot", description="DrSpot: skin-lesion MLOps (see README.md).")
    for parser, default in ((common, argparse.SUPPRESS), (p, None)):
        parser.add_argument("--profile", default=default, help="params.yaml profile (default: $DRSPOT_PROFILE or demo)")
        parser.add_argument(
            "--params", default=default, help="parameters file (default: params.yaml in the state home)"
        )
        parser.add_argument(
            "--config",
            default=default,
            metavar="FILE",
            help="a configuration resolved earlier (`drspot config`), used as it is: no profile, no DRSPOT_SET",
        )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add = sub.add_parser

    def add_parser(name: str, **kw):
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    c = sub.add_parser("config", help="print the resolved configuration (profile + DRSPOT_SET + params.yaml)")
    c.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    c.add_argument("--write", action="store_true", help="write it where dvc.yaml's stages read it (.drspot/run/)")
    c.set_defaults(func=cmd_config)

    e = sub.add_parser("env", help="print the offline/telemetry settings in force")
    e.add_argument(
        "--export", action="store_true", help='shell lines: eval "$(drspot env --export)" gives a shell the project'
    )
    e.set_defaults(func=cmd_env)

    st = sub.add_parser("status", help="where everything is and how it stands: data, models, service, log, flows")
    st.add_argument("--json", action="store_true", help="print JSON for machines")
    st.set_defaults(func=cmd_status)

    u = sub.add_parser("ui", help="the Prefect UI and the MLflow UI on the project's own stores (Ctrl-C stops)")
    u.add_argument("--prefect-port", type=int, default=4200, help="Prefect UI/API port (default 4200)")
    u.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default 5000)")
    u.set_defaults(func=cmd_ui)

    il = sub.add_parser(
        "import-logs", help="import prediction logs that earlier versions left inside Bento folders (idempotent)"
    )
    il.add_argument("logs", type=Path, nargs="*", help="SQLite logs to import (default: every one in the Bento store)")
    il.set_defaults(func=cmd_import_logs)

    i = sub.add_parser("ingest", help="turn a data source into a dataset (images + manifest.parquet)")
    i.add_argument("kind", choices=["synthetic", "ham10000", "isic", "medmnist", "yolo", "imagefolder", "feedback"])
    i.add_argument("source", type=Path, help="the source file or folder (synthetic: where the set is generated)")
    i.add_argument("--out", type=Path, required=True, help="the dataset folder to write")
    i.add_argument("--append", action="store_true", help="keep the rows already in --out and add these")
    i.add_argument("--images", type=Path, action="append", help="image folder (ham10000, isic; repeatable)")
    i.add_argument("--class-map", type=_kv, help="rename source classes, e.g. AKIEC=akiec,BCC=bcc (yolo)")
    i.add_argument("--ham-metadata", type=Path, help="HAM10000 metadata CSV to join by ISIC id (yolo)")
    i.add_argument(
        "--boxes", type=Path, help="lesion boxes CSV: image_id,x_min,y_min,x_max,y_max, normalised (ham10000)"
    )
    i.add_argument("--label-source", choices=["yolo", "metadata"], help="which label wins when joined (yolo)")
    i.add_argument("--lesion-csv", type=Path, help="CSV with image,lesion_id columns (isic)")
    i.add_argument("--id-prefix", help="image id prefix (medmnist; default from the file name)")
    g = i.add_argument_group("synthetic")
    g.add_argument("--no-generate", action="store_true", help="ingest SOURCE as it is; do not (re)generate it")
    g.add_argument("--shifted", action="store_true", help="render through the shifted 'other camera'")
    g.add_argument("--seed", type=int, help="generator seed (default: params seed)")
    g.add_argument("--n-lesions", type=int, help="lesions to draw (default: params)")
    for fault in ("exact-duplicates", "near-duplicates", "corrupt", "unknown-labels", "tiny"):
        g.add_argument(f"--{fault}", type=int, metavar="N", help=f"planted {fault.replace('-', ' ')} (default: params)")
    i.set_defaults(func=cmd_ingest)

    for step, text in (
        ("validate", "GX suite over the manifest + image checks; quarantine bad rows"),
        ("dedup", "exact + near-duplicate groups (pHash, verified), lesion links, label conflicts"),
        ("split", "stratified, grouped, leakage-free split with a frozen test set"),
        ("prepare", "validate -> dedup -> split as a Prefect flow (DVC stages for the project dataset)"),
    ):
        s = sub.add_parser(step, help=text)
        s.add_argument("dataset", type=Path, help="dataset folder (images + manifest.parquet)")
        s.add_argument("--prepared", type=Path, help="output folder (default: paths.prepared/<dataset name>)")
        s.set_defaults(func=cmd_prepare if step == "prepare" else _gate_step(step))

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
    sk = sub.add_parser(
        "stack", help="the production topology on this machine: PostgreSQL, S3, MLflow and Prefect servers"
    )
    sk.add_argument("action", choices=["up", "down", "status"])
    sk.set_defaults(func=cmd_stack)
    al = sub.add_parser("alerts", help="the newest alerts (alerts.file), with any sink that failed")
    al.add_argument("--last", type=int, default=20)
    al.set_defaults(func=cmd_alerts)
    rb = sub.add_parser("rollback", help="move champion back to the previous champion")
    rb.add_argument("--kind", choices=["classifier", "detector"], default="classifier")
    rb.set_defaults(func=cmd_rollback)

    dp = sub.add_parser("deploy", help="copy the champions into the Bento model store and build the Bento")
    dp.add_argument("--no-build", action="store_true", help="only copy the models (serve from source)")
    dp.set_defaults(func=cmd_deploy)
    pr = sub.add_parser(
        "predict", help="score a folder or a CSV list of photos offline with the champions (CSV/Parquet, resumable)"
    )
    pr.add_argument("source", type=Path, help="a folder of photos, a CSV with a path column, or one photo")
    pr.add_argument(
        "--out", type=Path, default=Path("predictions.csv"), help="a .csv (UTF-8 with BOM) or .parquet file"
    )
    pr.add_argument("--batch", type=int, default=16, help="photos per model call (16)")
    pr.add_argument("--language", help="language of the guidance column (default: serving.language)")
    pr.add_argument("--preprocess", default="none", help="none | color_constancy | clahe")
    pr.add_argument("--restart", action="store_true", help="discard an unfinished run's batches and start over")
    pr.set_defaults(func=cmd_predict)
    sv = sub.add_parser("serve", help="serve the deployed Bento (127.0.0.1:3000 by default)")
    sv.add_argument("--host", help="bind address (default: serving.host)")
    sv.add_argument("--port", type=int, help="port (default: serving.port)")
    sv.add_argument("--source", action="store_true", help="serve serving/service.py from this checkout")
    sv.add_argument("--bento", help="serve this Bento tag instead of the deployed one (e.g. a candidate)")
    sv.add_argument("--no-follow", action="store_true", help="keep this Bento: do not switch to newly deployed ones")
    sv.set_defaults(func=cmd_serve)

    mo = sub.add_parser("monitor", help="drift of logged predictions against the champion's training reference")
    win = mo.add_mutually_exclusive_group()
    win.add_argument("--since", help="ISO time: predictions logged since then (e.g. 2026-11-21T00:00:00+00:00)")
    win.add_argument("--last", type=int, help="the newest N predictions (default: monitor.last)")
    mo.set_defaults(func=cmd_monitor)

    rt = sub.add_parser("retrain", help="the flywheel: confirmed feedback -> data gate -> new DVC version -> train")
    rt.add_argument("--min-new", type=int, default=1, help="retrain only if at least N new confirmed cases (default 1)")
    rt.add_argument("--no-deploy", action="store_true", help="do not build a Bento when a model is promoted")
    rt.set_defaults(func=cmd_retrain)
    sc = sub.add_parser("schedule", help="serve the flows: monitor, nightly retrain, drift/feedback triggers")
    sc.add_argument("--port", type=int, default=4200, help="local Prefect server port when PREFECT_API_URL is unset")
    sc.add_argument(
        "--pool",
        help="instead of serving: register the deployments on PREFECT_API_URL's server for the workers of this "
        "process work pool (created if missing), and exit",
    )
    sc.set_defaults(func=cmd_schedule)

    d = sub.add_parser("demo", help="run the whole loop on the embedded defaults")
    d.add_argument(
        "--real",
        nargs="?",
        const="",
        metavar="DIR",
        help="real dermoscopy instead: the HAM10000 folder (default ../shared/data/ham10000_200x150), profile ham10000",
    )
    d.add_argument("--keep-serving", action="store_true", help="with --real: leave the service up at serving.port")
    d.set_defaults(func=cmd_demo)
    return p


def resolve(args: argparse.Namespace):
    """The run's configuration, resolved once: a resolved file (``--config``) as it is, else profile +
    ``DRSPOT_SET`` + parameters file. Every command and flow of this run gets this object."""
    if args.config:
        if args.profile or args.params:
            raise ConfigError("--config is a configuration resolved already: give it without --profile/--params")
        return load_resolved(args.config)
    profile = args.profile
    if profile is None and getattr(args, "real", None) is not None and not os.environ.get("DRSPOT_PROFILE"):
        profile = REAL_PROFILE  # `drspot demo --real`: the real-data recipe unless another profile was asked for
    return load_config(profile, args.params)


REAL_PROFILE = "ham10000"  # the profile `drspot demo --real` runs with by default

# commands that keep no state of their own: they run without a writable state home
STATELESS = {"config", "env"}
# commands that read or write the prediction log: a log that cannot be used is refused before they start
USES_LOG = {"serve", "monitor", "retrain", "demo", "import-logs"}


def main(argv: list[str] | None = None) -> int:
    from components.env import check_home, close_prefect, prefect_lost, unreachable

    args = build_parser().parse_args(argv)
    try:
        args.cfg = resolve(args)
        if args.command not in STATELESS:
            check_home(args.cfg.home)
        if args.command in USES_LOG:
            from serving.store import check_log

            check_log(args.cfg)
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, RuntimeError, KeyError, ConnectionError) as e:
        print(f"drspot {args.command}: error: {unreachable(e) or e}", file=sys.stderr)
        return 2
    except Exception as e:  # a library's error: a server that did not answer is the user's setting, said so
        if unreachable(e) is None:
            raise
        print(f"drspot {args.command}: error: {unreachable(e)}", file=sys.stderr)
        if prefect_lost(e):
            # Prefect's log and event workers would go on retrying the lost server for every line and event still
            # queued (minutes) before the interpreter may exit: they cannot be delivered, so the command ends now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    finally:
        close_prefect()  # while stdout is open: the command ends on its own last line


if __name__ == "__main__":
    sys.exit(main())
