"""``drspot`` commands: config, env, status, ui, stack, schedule and demo: the project itself."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import typer

from flows.commands import OPERATIONS, invoke


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
    import shlex

    from infra.env import exports, settings

    if args.export:
        for k, v in sorted(exports().items()):
            print(f"export {k}={shlex.quote(v)}")
        return 0
    seen = {k: os.environ.get(k) for k in sorted(settings())}
    if args.json:
        print(json.dumps(seen, indent=2, sort_keys=True))
        return 0
    from flows.console import table

    table(["setting", "value in force"], [[k, v if v is not None else "(unset)"] for k, v in seen.items()])
    print('\na shell that sees this project with prefect, mlflow, bentoml and dvc: eval "$(drspot env --export)"')
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flows.status import collect, render

    s = collect(args.cfg)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    from flows.console import table

    title, rows = render(s)
    print(title)
    table(["part", "how it stands"], rows)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.ui import run_ui

    return run_ui(args.cfg, args.prefect_port, args.mlflow_port)


def cmd_stack(args: argparse.Namespace) -> int:
    from flows.console import table
    from infra import stack

    home = args.cfg.home
    if args.action == "up":
        from serving.store import redact

        rec = stack.up(home)

        def shown(v: str) -> str:  # a database URL without its password
            return redact(v) if "@" in v and "://" in v else v

        rows = []
        for name, svc in rec["services"].items():
            where = svc.get("url") or svc.get("endpoint") or f"work pool {svc.get('pool')}"
            rows.append([name, shown(where), svc["pid"], svc["log"]])
        table(["service", "where", "pid", "log"], rows)
        print(f"\npoint DrSpot at it:  source {stack.stack_dir(home) / 'stack.env'}")
        print("  " + "\n  ".join(f"{k}={shown(v)}" for k, v in rec["env"].items() if "SECRET" not in k))
        print("stop it:  drspot stack down")
    elif args.action == "down":
        stopped = stack.down(home)
        print(f"stopped: {', '.join(stopped)}" if stopped else "no stack was running here")
    else:
        st = stack.status(home)
        if not st["services"]:
            print(st["note"])
        rows = [[n, s["pid"], "answering" if s["answering"] else "NOT answering"] for n, s in st["services"].items()]
        if rows:
            table(["service", "pid", "state"], rows)
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

    if args.clinic is not None:
        from flows.clinic import clinic_source, run_clinic_demo

        bcn = clinic_source(args.cfg, args.clinic or None)
        run_clinic_demo(
            args.cfg, real_source(args.cfg, None), bcn, args.budget, lesions=args.lesions, ham_rows=args.ham_photos
        )
        return 0
    if args.real is None:
        return run_demo(args.cfg)
    return run_real_demo(args.cfg, real_source(args.cfg, args.real or None), keep_serving=args.keep_serving)


JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for machines")]


def demo(
    ctx: typer.Context,
    real: Annotated[
        bool, typer.Option("--real", help="real dermoscopy (HAM10000) instead, with profile ham10000")
    ] = False,
    clinic: Annotated[
        bool,
        typer.Option(
            "--clinic", help="the HAM10000 champion meets a second clinic (BCN20000): drift, review queue, retrain"
        ),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Argument(
            metavar="DIR",
            help="with --real: the HAM10000 folder; with --clinic: the BCN20000 folder",
            show_default="../shared/data/ham10000_200x150, ../shared/data/bcn20000_84",
        ),
    ] = None,
    keep_serving: Annotated[bool, typer.Option(help="with --real: leave the service up at serving.port")] = False,
    budget: Annotated[int, typer.Option(min=1, help="with --clinic: cases the clinicians confirm")] = 1000,
    lesions: Annotated[
        int | None,
        typer.Option(min=2, help="with --clinic: only this many Barcelona lesions (a quick look)", show_default="all"),
    ] = None,
    ham_photos: Annotated[
        int | None,
        typer.Option(min=50, help="with --clinic: only this many HAM10000 photos (a quick look)", show_default="all"),
    ] = None,
) -> None:
    """Run the whole loop on the embedded defaults: data, gate, training, registry, deployment, serving,
    monitoring and the flywheel, as numbered steps.

    **Example:** `drspot demo` (synthetic, ~10 min), `drspot demo --real --keep-serving` (HAM10000, ~40 min),
    `drspot demo --clinic` (then Barcelona's photos: drift, 1,000 confirmations, retrain; ~30 min more)
    """
    if real and clinic:
        raise typer.BadParameter("--real or --clinic, not both (--clinic serves the --real champion first)")
    if data is not None and not (real or clinic):
        raise typer.BadParameter("a data folder is for --real or --clinic: drspot demo --real DIR", param_hint="DIR")
    as_real = (str(data) if data else "") if real else None
    as_clinic = (str(data) if data else "") if clinic else None
    # --clinic runs the real demo's profile (ham10000) too: `real` set to "" chooses it (flows/commands/__init__.py)
    invoke(
        ctx,
        cmd_demo,
        {
            "real": "" if clinic and as_real is None else as_real,
            "clinic": as_clinic,
            "keep_serving": keep_serving,
            "budget": budget,
            "lesions": lesions,
            "ham_photos": ham_photos,
        },
    )


def status(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Where everything is and how it stands: data, models, the service, the prediction log, flows, alerts.

    **Example:** `drspot status`
    """
    invoke(ctx, cmd_status, locals())


def ui(
    ctx: typer.Context,
    prefect_port: Annotated[int, typer.Option(help="Prefect UI/API port")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow UI port")] = 5000,
) -> None:
    """The Prefect UI and the MLflow UI on the project's own stores (Ctrl-C stops both).

    **Example:** `drspot ui`, then open http://127.0.0.1:4200 and http://127.0.0.1:5000
    """
    invoke(ctx, cmd_ui, locals())


def config(
    ctx: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="print JSON instead of YAML")] = False,
    write: Annotated[bool, typer.Option(help="write it where dvc.yaml's stages read it (.drspot/run/)")] = False,
) -> None:
    """Print the resolved configuration: params.yaml's defaults, the profile, $DRSPOT_SET and -S, in that order.

    **Example:** `drspot -S classifier.epochs=3 config --profile test`
    """
    invoke(ctx, cmd_config, locals())


def env(
    ctx: typer.Context,
    json_: JsonOpt = False,
    export: Annotated[
        bool, typer.Option(help='shell lines for prefect, mlflow, bentoml and dvc: eval "$(drspot env --export)"')
    ] = False,
) -> None:
    """The offline, telemetry and library-home settings DrSpot runs its libraries with.

    **Example:** `drspot env`, `eval "$(drspot env --export)"; mlflow models list`
    """
    invoke(ctx, cmd_env, locals())


def stack(
    ctx: typer.Context,
    action: Annotated[
        Literal["up", "down", "status"],
        typer.Argument(help="start the services, stop them, or say whether each answers"),
    ],
) -> None:
    """The production topology on this machine: PostgreSQL, an S3 store, MLflow and Prefect servers, a worker.

    `status` exits 1 when a service does not answer.

    **Example:** `drspot stack up`, then `source .drspot/stack/stack.env`
    """
    invoke(ctx, cmd_stack, locals())


def schedule(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="local Prefect server port when PREFECT_API_URL is unset")] = 4200,
    pool: Annotated[
        str | None,
        typer.Option(
            help="instead of serving: register the deployments for the workers of this process work pool "
            "(created if missing) on PREFECT_API_URL's server, and exit"
        ),
    ] = None,
) -> None:
    """Serve the flows on a schedule: monitor, nightly retrain, and the drift and feedback triggers.

    **Example:** `drspot schedule` (Ctrl-C stops), `drspot schedule --pool drspot`
    """
    invoke(ctx, cmd_schedule, locals())


PANEL = OPERATIONS
COMMANDS = (  # (name, function): `drspot --help` lists them in this order
    ("demo", demo),
    ("status", status),
    ("ui", ui),
    ("config", config),
    ("env", env),
    ("stack", stack),
    ("schedule", schedule),
)
