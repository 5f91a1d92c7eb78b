"""``drspot`` commands: monitor, retrain and alerts: the flywheel."""

from __future__ import annotations

import argparse

from flows.console import quality_lines


def cmd_alerts(args: argparse.Namespace) -> int:
    from components.monitoring import alerts

    shown = alerts.recent(args.cfg, args.last)
    if not shown:
        print(f"no alerts in {alerts.alert_file(args.cfg)}")
    for a in shown:
        failed = [f"{k} {v}" for k, v in a.get("delivery", {}).items() if str(v).startswith("failed")]
        note = f"  [{'; '.join(failed)}]" if failed else ""
        print(f"{a['at']}  {a['kind']:<14} {a['severity']:<8} {a['title']}{note}")
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


def register(sub) -> None:
    """Add this group's commands to the ``drspot`` parser's sub-commands."""
    al = sub.add_parser("alerts", help="the newest alerts (alerts.file), with any sink that failed")
    al.add_argument("--last", type=int, default=20)
    al.set_defaults(func=cmd_alerts)
    mo = sub.add_parser("monitor", help="drift of logged predictions against the champion's training reference")
    win = mo.add_mutually_exclusive_group()
    win.add_argument("--since", help="ISO time: predictions logged since then (e.g. 2026-11-21T00:00:00+00:00)")
    win.add_argument("--last", type=int, help="the newest N predictions (default: monitor.last)")
    mo.set_defaults(func=cmd_monitor)

    rt = sub.add_parser("retrain", help="the flywheel: confirmed feedback -> data gate -> new DVC version -> train")
    rt.add_argument("--min-new", type=int, default=1, help="retrain only if at least N new confirmed cases (default 1)")
    rt.add_argument("--no-deploy", action="store_true", help="do not build a Bento when a model is promoted")
    rt.set_defaults(func=cmd_retrain)
