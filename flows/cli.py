"""The ``drspot`` command line (Typer): commands grouped by phase, help from each command's docstring, global
options documented once, ``--version``, the nearest command suggested for a typo.

Every command loads the typed configuration once (:func:`flows.commands.run`), applies the offline settings (by
importing :mod:`components`) and calls its step; heavy libraries are imported inside the commands that need them,
so ``drspot --help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

import components  # noqa: F401  (offline settings before anything else)
from flows.commands import Globals, data, models, monitoring, operations, serving

HELP = """DrSpot: skin-lesion MLOps on one machine. Data gate, a YOLO detector and a timm classifier, MLflow registry
and model gate, a BentoML endpoint, drift monitoring and the retraining flywheel.

Start with `drspot demo` (the whole loop on synthetic photos), then `drspot status` and `drspot ui`.
Global options may come before or after the command. Exit codes: 0 success, 1 a runtime failure, 2 a usage
error, 3 a gate rejection.
"""
# the options that belong to every command; accepted after the command too (moved before it by main)
GLOBAL_VALUED = ("--profile", "--params", "--config", "--set", "-S")

app = typer.Typer(
    name="drspot",
    help=HELP,
    no_args_is_help=True,  # bare `drspot` shows the help
    suggest_commands=True,  # `drspot trian` -> Did you mean 'train'?
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"drspot {version('drspot')} (Python {sys.version.split()[0]})")
        raise typer.Exit(0)


@app.callback()
def options(
    ctx: typer.Context,
    profile: Annotated[
        str | None,
        typer.Option(help="params.yaml profile: demo, test, ham10000, ...", show_default="$DRSPOT_PROFILE or demo"),
    ] = None,
    params: Annotated[
        str | None,
        typer.Option(metavar="FILE", help="the parameters file", show_default="params.yaml in the state home"),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(metavar="FILE", help="a configuration resolved earlier (`drspot config`), used as it is"),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "-S",
            "--set",
            metavar="KEY=VALUE",
            help="override one setting, e.g. `-S classifier.epochs=3` (repeatable; after $DRSPOT_SET)",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    ctx.obj = Globals(profile, params, config, list(set_ or []))


for group in (operations, data, models, serving, monitoring):  # the panels of `drspot --help`, in this order
    for name, command in group.COMMANDS:
        app.command(name, rich_help_panel=group.PANEL)(command)


def hoist(argv: list[str]) -> list[str]:
    """Global options given after the command (``drspot config --profile test``) moved before it, where the
    command line's parser reads them; everything after a ``--`` stays where it is."""
    front, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest.extend(argv[i:])
            break
        name = a.split("=", 1)[0]
        if a.startswith("-S") and len(a) > 2:  # -Skey=value
            takes = 1
        elif name in GLOBAL_VALUED:
            takes = 1 if "=" in a else 2
        else:
            takes = 0
        if takes:
            front.extend(argv[i : i + takes])
            i += takes
            continue
        rest.append(a)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    args = hoist(list(sys.argv[1:] if argv is None else argv)) or ["--help"]  # bare `drspot`: the help, exit 0
    try:
        app(args=args, prog_name="drspot")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
