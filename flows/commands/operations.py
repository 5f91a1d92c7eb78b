"""``drspot`` commands: config, env, status, ui, stack, schedule and demo: the project itself."""

from __future__ import annotations

import argparse
import json
import os


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

    from infra.env import exports, settings

    if args.export:
        for k, v in sorted(exports().items()):
            print(f"export {k}={shlex.quote(v)}")
        return 0
    print(json.dumps({k: os.environ.get(k) for k in settings()}, indent=2, sort_keys=True))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flows.status import collect, render

    s = collect(args.cfg)
    print(json.dumps(s, indent=2, default=str) if args.json else render(s))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.ui import run_ui

    return run_ui(args.cfg, args.prefect_port, args.mlflow_port)


def cmd_stack(args: argparse.Namespace) -> int:
    from infra import stack

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


def cmd_schedule(args: argparse.Namespace) -> int:
    from flows.schedule import deploy_to_pool, run_schedule

    cfg = args.cfg
    if args.pool:
        for name in deploy_to_pool(cfg, cfg.profile, args.pool):
            print(f"deployed {name} to work pool {args.pool} on {os.environ['PREFECT_API_URL']}")
        print(f"run them with a worker: prefect worker start --pool {args.pool}")
        return 0
    return run_schedule(cfg, cfg.profile, port=args.port)


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import real_source, run_demo, run_real_demo

    if args.real is None:
        return run_demo(args.cfg)
    return run_real_demo(args.cfg, real_source(args.cfg, args.real or None), keep_serving=args.keep_serving)


def register(sub) -> None:
    """Add this group's commands to the ``drspot`` parser's sub-commands."""
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

    sk = sub.add_parser(
        "stack", help="the production topology on this machine: PostgreSQL, S3, MLflow and Prefect servers"
    )
    sk.add_argument("action", choices=["up", "down", "status"])
    sk.set_defaults(func=cmd_stack)
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
