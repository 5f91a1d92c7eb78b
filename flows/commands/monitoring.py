"""``drspot`` commands: monitor, retrain and alerts: the flywheel."""

from __future__ import annotations

import argparse
import json
from typing import Annotated

import typer

from flows.commands import MONITORING, invoke
from flows.console import quality_lines


def cmd_alerts(args: argparse.Namespace) -> int:
    from components.monitoring import alerts

    shown = alerts.recent(args.cfg, args.last)
    if args.json:
        print(json.dumps(shown, indent=2, default=str))
        return 0
    if not shown:
        print(f"no alerts in {alerts.alert_file(args.cfg)}")
        return 0
    from flows.console import table
    from flows.status import when

    rows = []
    for a in shown:
        failed = [f"{k} {v}" for k, v in a.get("delivery", {}).items() if str(v).startswith("failed")]
        note = f"  [{'; '.join(failed)}]" if failed else ""
        rows.append([when(a["at"]), a["kind"], a["severity"], a["title"] + note])
    table(["at", "kind", "severity", "alert"], rows)
    return 0


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


def monitor(
    ctx: typer.Context,
    since: Annotated[
        str | None,
        typer.Option(metavar="ISO-TIME", help="predictions logged since then, e.g. 2026-11-21T00:00:00+00:00"),
    ] = None,
    last: Annotated[
        int | None, typer.Option(metavar="N", help="the newest N predictions", show_default="monitor.last")
    ] = None,
) -> None:
    """Drift of the logged predictions against the champion's training reference (Evidently), and the model's
    quality on confirmed cases with a label-free estimate beside it.

    **Example:** `drspot monitor --last 500`
    """
    if since is not None and last is not None:
        raise typer.BadParameter("give --since or --last, not both", param_hint="--since/--last")
    invoke(ctx, cmd_monitor, locals())


def retrain(
    ctx: typer.Context,
    min_new: Annotated[int, typer.Option(metavar="N", help="retrain only with at least N new confirmed cases")] = 1,
    no_deploy: Annotated[
        bool, typer.Option("--no-deploy", help="do not build a Bento when a model is promoted")
    ] = False,
) -> None:
    """The flywheel: confirmed cases -> data gate -> new DVC data version -> train -> gate -> deploy.

    Resumes a run that was killed, from the step it was killed in.

    **Example:** `drspot retrain --min-new 50`
    """
    invoke(ctx, cmd_retrain, locals())


def alerts(
    ctx: typer.Context,
    last: Annotated[int, typer.Option(metavar="N", help="how many of the newest alerts")] = 20,
    json_: Annotated[bool, typer.Option("--json", help="print JSON for machines")] = False,
) -> None:
    """The newest alerts of this project (alerts.file), with any sink that failed to deliver.

    **Example:** `drspot alerts --last 5`
    """
    invoke(ctx, cmd_alerts, locals())


PANEL = MONITORING
COMMANDS = (  # (name, function): `drspot --help` lists them in this order
    ("monitor", monitor),
    ("retrain", retrain),
    ("alerts", alerts),
)
