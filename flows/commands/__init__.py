"""The ``drspot`` commands, one module per group (data, models, serving, monitoring, operations), and how every one
of them runs: the run's configuration resolved once from the global options, the state home checked, the handler
called, and its outcome turned into the exit code users know.

Exit codes: 0 success, 1 a runtime failure, 2 a usage error (a wrong option or setting), 3 a gate rejection.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import typer

from infra.config import ConfigError, UsageError, load_config, load_resolved

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILED: "a runtime failure (a missing file, a server that did not answer, a failed step)",
    EXIT_USAGE: "a usage error (an unknown command or option, a wrong value, an invalid setting or profile)",
    EXIT_REJECTED: "a gate rejection (`drspot promote`: the challenger did not beat the champion)",
}
REAL_PROFILE = "ham10000"  # the profile `drspot demo --real` runs with by default
# commands that keep no state of their own: they run without a writable state home
STATELESS = {"config", "env"}
# commands that read or write the prediction log: a log that cannot be used is refused before they start
USES_LOG = {"serve", "monitor", "retrain", "demo", "import-logs"}
# the panels of `drspot --help`, in the order a project meets them
DATA, MODELS, SERVING, MONITORING, OPERATIONS = "Data", "Models", "Serving", "Monitoring", "Project"


@dataclass
class Globals:
    """The global options (``drspot --profile X -S k=v COMMAND``), documented once on ``drspot --help``."""

    profile: str | None = None
    params: str | None = None
    config: str | None = None
    sets: list[str] = field(default_factory=list)


def resolve(args: argparse.Namespace, notes: list[str]):
    """The run's configuration, resolved once: a resolved file (``--config``) as it is, else profile +
    ``DRSPOT_SET`` + ``-S`` + parameters file. Every command and flow of this run gets this object; ``notes``
    collects each setting that overrides another source's."""
    if args.config:
        if args.profile or args.params or args.sets:
            raise ConfigError("--config is a configuration resolved already: give it without --profile/--params/-S")
        if os.environ.get("DRSPOT_SET"):
            notes.append("DRSPOT_SET is ignored: --config names a configuration resolved already")
        return load_resolved(args.config)
    profile = args.profile
    env_profile = os.environ.get("DRSPOT_PROFILE")
    if profile and env_profile and env_profile != profile:
        notes.append(f"--profile {profile} overrides DRSPOT_PROFILE={env_profile}")
    if profile is None and getattr(args, "real", None) is not None and not env_profile:
        profile = REAL_PROFILE  # `drspot demo --real`: the real-data recipe unless another profile was asked for
    if os.environ.get("DRSPOT_CONFIG") and (profile or args.params or args.sets):
        notes.append("DRSPOT_CONFIG is ignored: the command line names the configuration")
    return load_config(profile, args.params, args.sets, notes)


def explicit_source(args: argparse.Namespace) -> str | None:
    """The option or variable that chose this run's configuration, or None when it is the default profile."""
    for option in ("config", "profile", "params"):
        if getattr(args, option, None):
            return f"--{option} {getattr(args, option)}"
    if args.sets:
        return " ".join(f"-S {s}" for s in args.sets)
    for var in ("DRSPOT_CONFIG", "DRSPOT_PROFILE", "DRSPOT_PARAMS", "DRSPOT_SET"):
        if os.environ.get(var):
            return f"${var}={os.environ[var]}"
    return None


def invoke(ctx: typer.Context, handler: Callable[[argparse.Namespace], int | None], params: dict[str, Any]) -> None:
    """Run ``handler`` with the command's ``params`` (``json_`` is ``args.json``) and the global options; exits."""
    g: Globals = ctx.obj or Globals()
    values = {k.rstrip("_"): v for k, v in params.items() if k != "ctx"}
    args = argparse.Namespace(
        **values, command=ctx.info_name, profile=g.profile, params=g.params, config=g.config, sets=g.sets
    )
    raise typer.Exit(run(handler, args))


def run(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """The handler's exit code; an error is one line on stderr naming the command, never a traceback."""
    from infra.env import check_home, close_prefect, prefect_lost, unreachable

    notes: list[str] = []
    try:
        try:
            args.cfg = resolve(args, notes)
        finally:
            for note in notes:
                print(f"drspot: warning: {note}", file=sys.stderr)
        args.config_source = explicit_source(args)
        if args.command not in STATELESS:
            check_home(args.cfg.home)
        if args.command in USES_LOG:
            from serving.store import check_log

            check_log(args.cfg)
        return int(handler(args) or EXIT_OK)
    except UsageError as e:
        print(f"drspot {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, KeyError, ConnectionError, OSError) as e:
        print(f"drspot {args.command}: error: {unreachable(e) or e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # a library's error: a server that did not answer is the user's setting, said so
        if unreachable(e) is None:
            raise
        print(f"drspot {args.command}: error: {unreachable(e)}", file=sys.stderr)
        if prefect_lost(e):
            # Prefect's log and event workers would go on retrying the lost server for every line and event still
            # queued (minutes) before the interpreter may exit: they cannot be delivered, so the command ends now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_FAILED)
        return EXIT_FAILED
    finally:
        close_prefect()  # while stdout is open: the command ends on its own last line
