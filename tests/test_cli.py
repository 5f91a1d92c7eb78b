"""The command line as a newcomer meets it: every command explains itself (a description, an example, its
defaults), the README names only options that exist, the exit codes follow the convention, and the settings
sources say when one overrides another."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from flows.cli import app, hoist, main
from flows.commands import EXIT_CODES
from tests.conftest import shell_env

ROOT = Path(__file__).resolve().parent.parent
COMMAND = typer.main.get_command(app)
COMMANDS = sorted(COMMAND.commands)


def _help(*args: str) -> str:
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, [*args, "--help"], prog_name="drspot", terminal_width=200)
    assert out.exit_code == 0, out.output
    return out.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_a_description_an_example_and_its_defaults(name):
    cmd = COMMAND.commands[name]
    assert cmd.help and len(cmd.help.split("\n", 1)[0]) > 20, f"drspot {name} --help has no description"
    text = _help(name)
    example = text.split("Example:", 1)[1] if "Example:" in text else ""
    assert re.search(rf"drspot .*\b{name}\b", example), f"drspot {name} --help has no example"
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.is_flag and not p.required and p.name != "help":
            # a default the user can read: a value, or where it comes from (show_default's text)
            assert p.show_default or p.default is not None, f"drspot {name} {p.opts[0]}: no default shown"
        if p.name != "help":
            assert getattr(p, "help", None), f"drspot {name} {p.name}: no help text"


def test_the_top_level_help_groups_the_commands_and_documents_the_global_options_once():
    text = _help()
    panels = [m for m in ("Project", "Data", "Models", "Serving", "Monitoring") if f"─ {m} " in text]
    assert panels == ["Project", "Data", "Models", "Serving", "Monitoring"], text
    for option in ("--profile", "--params", "--config", "--set", "--version"):
        assert option in text
    # ... and not repeated on every command
    assert "--profile" not in _help("train")


def test_bare_drspot_shows_the_help_and_a_typo_gets_a_suggestion(capsys):
    assert main([]) == 0
    assert "Usage: drspot" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "Did you mean 'train'" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert re.match(r"drspot \d+\.\d+\.\d+ \(Python 3\.\d+", capsys.readouterr().out)


def test_global_options_may_follow_the_command():
    assert hoist(["config", "--profile", "test", "--json", "-S", "a.b=1", "--set=c=2", "-Sd=3"]) == [
        "--profile",
        "test",
        "-S",
        "a.b=1",
        "--set=c=2",
        "-Sd=3",
        "config",
        "--json",
    ]
    assert hoist(["predict", "x", "--", "--profile"]) == ["predict", "x", "--", "--profile"]


def test_exit_codes_are_the_documented_ones(drspot_cli, tmp_path):
    assert set(EXIT_CODES) == {0, 1, 2, 3}
    env = shell_env(DRSPOT_HOME=str(tmp_path))
    usage = drspot_cli("ingest", "dicom", "x", "--out", "y", env=env)  # a kind that does not exist
    assert usage.returncode == 2 and "'dicom' is not one of" in usage.stderr, usage.stderr
    failure = drspot_cli("ingest", "ham10000", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "ds"), env=env)
    assert failure.returncode == 1 and "drspot ingest: error: source not found" in failure.stderr
    readme = (ROOT / "README.md").read_text()
    for code in EXIT_CODES:
        assert re.search(rf"^\| *{code} *\|", readme, re.M), f"exit code {code} is not in the README's table"


def test_a_bad_setting_names_its_source_and_an_override_is_warned(drspot_cli, tmp_path):
    env = shell_env(DRSPOT_HOME=str(tmp_path), DRSPOT_SET="classifier.epochs=2")
    out = drspot_cli("config", "-S", "classifier.epochs=abc", env=env)
    assert out.returncode == 2
    assert "drspot config: error: -S 'classifier.epochs=abc': key 'classifier.epochs'" in out.stderr
    assert "params.yaml" not in out.stderr  # the file was not what was wrong
    out = drspot_cli("config", "--json", "-S", "classifier.epochs=3", env=env)
    assert out.returncode == 0 and '"epochs": 3' in out.stdout
    assert "warning: -S 'classifier.epochs=3' overrides classifier.epochs of DRSPOT_SET" in out.stderr
    bad_env = drspot_cli("config", env={**env, "DRSPOT_SET": "classifier.epochs=abc"})
    assert bad_env.returncode == 2 and "DRSPOT_SET='classifier.epochs=abc': key 'classifier.epochs'" in bad_env.stderr


def test_env_prints_text_and_exports_nothing_that_changes_other_tools(drspot_cli, tmp_path):
    env = shell_env(DRSPOT_HOME=str(tmp_path))
    text = drspot_cli("env", env=env)
    assert text.returncode == 0 and text.stdout.splitlines()[0].split() == ["setting", "value", "in", "force"]
    assert re.search(r"^BENTOML_DO_NOT_TRACK +true$", text.stdout, re.M), text.stdout
    exported = drspot_cli("env", "--export", env=env).stdout
    assert "export MLFLOW_TRACKING_URI=" in exported and "export PREFECT_HOME=" in exported
    for name in ("PYTHONWARNINGS", "HF_HUB_OFFLINE", "YOLO_OFFLINE", "DO_NOT_TRACK="):
        assert f"export {name}" not in exported


def _readme_commands() -> list[tuple[str, list[str]]]:
    """(command, options) of every `drspot ...` the README's command table names."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in table.splitlines():
        for snippet in re.findall(r"`(drspot [^`]+)`", line):
            words = snippet.split()
            name = next((w for w in words[1:] if not w.startswith("-") and w in COMMAND.commands), None)
            if name:
                found.append((name, [w.split("=")[0] for w in words if w.startswith("--")]))
    return found


def test_every_option_the_readme_command_table_names_exists():
    found = _readme_commands()
    assert len({name for name, _ in found}) >= 25, found  # the table covers the commands
    globals_ = {o for p in COMMAND.params for o in p.opts}
    for name, options in found:
        known = {o for p in COMMAND.commands[name].params for o in p.opts} | globals_
        missing = [o for o in options if o not in known]
        assert not missing, f"README names `drspot {name} {' '.join(missing)}`, which drspot {name} does not take"


def test_the_help_starts_fast():
    """``drspot --help`` imports no heavy library (the commands import theirs when they run)."""
    code = "import sys, flows.cli; print([m for m in ('torch', 'mlflow', 'prefect', 'bentoml') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    "argv,profile,real",
    [
        (["demo"], "demo", None),
        (["demo", "--real"], "ham10000", ""),
        (["demo", "--real", "/data/ham"], "ham10000", "/data/ham"),
        (["--profile", "test", "demo", "--real"], "test", ""),
        (["demo", "--clinic"], "ham10000", ""),
    ],
)
def test_the_real_demo_runs_the_real_data_recipe_unless_a_profile_is_named(argv, profile, real, monkeypatch):
    from typer.testing import CliRunner

    from flows.commands import operations

    seen = {}
    monkeypatch.setattr(operations, "cmd_demo", lambda args: seen.update(vars(args)) or 0)
    monkeypatch.delenv("DRSPOT_PROFILE", raising=False)
    out = CliRunner().invoke(app, hoist(argv), prog_name="drspot")
    assert out.exit_code == 0, out.output
    assert seen["cfg"].profile == profile and seen["real"] == real
