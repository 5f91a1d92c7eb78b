"""The ``drspot`` command line.

Every command loads the typed configuration (``--profile``), applies the offline settings (by
importing :mod:`components`) and calls the step in :mod:`components`; heavy libraries are
imported inside the commands that need them, so ``drspot --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

import components  # noqa: F401  (offline settings before anything else)
from flows.commands import data, models, monitoring, operations, serving
from infra.config import ConfigError, load_config, load_resolved


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

    for group in (operations, data, models, serving, monitoring):
        group.register(sub)
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


def explicit_source(args: argparse.Namespace) -> str | None:
    """The option or variable that chose this run's configuration, or None when it is the default profile."""
    for option in ("config", "profile", "params"):
        if getattr(args, option, None):
            return f"--{option} {getattr(args, option)}"
    for var in ("DRSPOT_CONFIG", "DRSPOT_PROFILE", "DRSPOT_PARAMS", "DRSPOT_SET"):
        if os.environ.get(var):
            return f"${var}={os.environ[var]}"
    return None


REAL_PROFILE = "ham10000"  # the profile `drspot demo --real` runs with by default

# commands that keep no state of their own: they run without a writable state home
STATELESS = {"config", "env"}
# commands that read or write the prediction log: a log that cannot be used is refused before they start
USES_LOG = {"serve", "monitor", "retrain", "demo", "import-logs"}


def main(argv: list[str] | None = None) -> int:
    from infra.env import check_home, close_prefect, prefect_lost, unreachable

    args = build_parser().parse_args(argv)
    try:
        args.cfg = resolve(args)
        args.config_source = explicit_source(args)
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
