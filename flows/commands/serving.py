"""``drspot`` commands: deploy, serve, predict and import-logs: the models in use."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import typer

from flows.commands import SERVING, invoke


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
    import subprocess

    from infra.config import CONFIG_ENV, HOME_ENV, hand_over, load_resolved
    from serving.deploy import SOURCE
    from serving.store import describe

    cfg = args.cfg
    state = cfg.runtime.deployed
    deployed = None
    if args.source:
        target = "serving.service:DrSpot"
    elif args.bento:
        target = args.bento
    elif state.is_file() and "bento" in json.loads(state.read_text()):
        target = deployed = json.loads(state.read_text())["bento"]
    else:
        raise FileNotFoundError(f"no Bento deployed yet ({state} is missing): run `drspot deploy` first")
    recorded = cfg.runtime.deployed_config
    if deployed and args.config_source is None and recorded.is_file():
        # the deployed Bento with the configuration it was deployed with (thresholds, runtime, limits), not the
        # command's default profile; the file is handed as it is, so a newly deployed Bento brings its own
        cfg = load_resolved(recorded, str(recorded)).at(cfg.home)
        source = f"deployed with the Bento (profile {cfg.profile}, {recorded})"
        handed = {HOME_ENV: str(cfg.home), CONFIG_ENV: str(recorded)}
    else:
        source = args.config_source or f"the default profile {cfg.profile}"
        handed = None
    host, port = args.host or cfg.serving.host, args.port or cfg.serving.port
    handed = {**(handed or hand_over(cfg, f"serve-{port}")), "DRSPOT_CONFIG_SOURCE": source}
    env = {**os.environ, **handed}
    follow = not (args.source or args.bento or args.no_follow)
    print(f"serving {target} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    print(f"  state home {cfg.home}; prediction log {describe(cfg)}; configuration {env['DRSPOT_CONFIG']}", flush=True)
    print(f"  configuration source: {source}", flush=True)
    if args.source:  # the service straight from this checkout (development)
        from serving.backend import command

        cmd = command(target, host, port, cfg.runtime.metrics("source", port))  # its own Prometheus folder
        return subprocess.call(cmd, cwd=SOURCE, env=env)
    from serving.serve import serve

    if follow:
        print(f"  a newly deployed Bento ({state}) is switched to without downtime", flush=True)
    return serve(cfg, target, host, port, handed, state, follow)


def cmd_import_logs(args: argparse.Namespace) -> int:
    from serving.log_import import import_stranded
    from serving.store import describe

    done = import_stranded(args.cfg, [p.resolve() for p in args.logs] or None)
    if not done:
        print("no prediction logs inside Bento folders: nothing to import")
    for src, n in done:
        print(
            f"{src}: {n['predictions']} predictions, {n['feedback']} confirmations, {n['images']} images imported "
            f"({n['predictions_present']} predictions and {n['feedback_present']} confirmations were there already"
            + (f"; {n['images_missing']} stored images missing at the source" if n["images_missing"] else "")
            + f"); {n['patients']} patients' consented fields"
        )
    print(f"prediction log: {describe(args.cfg)}")
    return 0


def deploy(
    ctx: typer.Context,
    no_build: Annotated[bool, typer.Option("--no-build", help="only copy the models (serve from source)")] = False,
) -> None:
    """Copy the champions into the Bento model store (ONNX export checked against PyTorch) and build the Bento.

    A running `drspot serve` switches to the new Bento without downtime.

    **Example:** `drspot deploy`
    """
    invoke(ctx, cmd_deploy, locals())


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="bind address", show_default="serving.host: 127.0.0.1")] = None,
    port: Annotated[int | None, typer.Option(help="port", show_default="serving.port: 3000")] = None,
    source: Annotated[bool, typer.Option("--source", help="serve serving/service.py from this checkout")] = False,
    bento: Annotated[
        str | None, typer.Option(metavar="TAG", help="serve this Bento instead of the deployed one")
    ] = None,
    no_follow: Annotated[
        bool, typer.Option("--no-follow", help="keep this Bento: do not switch to newly deployed ones")
    ] = False,
) -> None:
    """Serve the deployed Bento: the web page, `/predict`, the stream and camera endpoints, reports, review.

    Without --profile/--config it serves the configuration the Bento was deployed with (`/readyz` says which).

    **Example:** `drspot serve --port 3000`, then open http://127.0.0.1:3000/
    """
    invoke(ctx, cmd_serve, locals())


def predict(
    ctx: typer.Context,
    source: Annotated[
        Path, typer.Argument(help="a folder of photos, a CSV with a path column, or one photo", show_default=False)
    ],
    out: Annotated[Path, typer.Option(help="a .csv (UTF-8 with BOM) or .parquet file")] = Path("predictions.csv"),
    batch: Annotated[int, typer.Option(min=1, help="photos per model call")] = 16,
    language: Annotated[
        str | None,
        typer.Option(help="language of the guidance column: en, ko, vi", show_default="serving.language"),
    ] = None,
    preprocess: Annotated[
        Literal["none", "color_constancy", "clahe"], typer.Option(help="colour correction before the models")
    ] = "none",
    restart: Annotated[bool, typer.Option(help="discard an unfinished run's batches and start over")] = False,
) -> None:
    """Score photos offline with the champions into CSV or Parquet (resumable: an interrupted run goes on).

    **Example:** `drspot predict photos/ --out scores.parquet`
    """
    invoke(ctx, cmd_predict, locals())


def import_logs(
    ctx: typer.Context,
    logs: Annotated[
        list[Path] | None,
        typer.Argument(help="SQLite logs to import", show_default="every one in the Bento store"),
    ] = None,
) -> None:
    """Import prediction logs that earlier versions left inside Bento folders (idempotent).

    **Example:** `drspot import-logs`
    """
    invoke(ctx, cmd_import_logs, {"logs": logs or []})


PANEL = SERVING
COMMANDS = (  # (name, function): `drspot --help` lists them in this order
    ("deploy", deploy),
    ("serve", serve),
    ("predict", predict),
    ("import-logs", import_logs),
)
