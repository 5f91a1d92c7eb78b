"""The ``prepare`` flow: validate → dedup → split as Prefect tasks.

For the project's DVC-tracked dataset (``paths.data``, with ``dvc.yaml`` in the project) each task
runs its DVC stage (``dvc repro -s STAGE``), so unchanged data is a no-op and the flow is not a
second implementation; for any other dataset folder the tasks call the same component functions
the stages' commands call. Tasks retry where a retry can help (a DVC lock held by another process,
a flaky file system) and never on a data error, which no retry fixes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.data import gate
from components.data.manifest import DataError
from flows.policy import DECLARED, HOOKS, bound, run_config
from infra.config import Config

# each dvc.yaml stage's kind of timeout (flows.timeout_s)
STAGE_KIND = {
    "validate": "data",
    "dedup": "data",
    "split": "data",
    "train_classifier": "train",
    "train_detector": "train",
    "evaluate": "evaluate",
}


def _echo(line: str) -> None:
    """A stage's own progress lines (epochs, steps), shown as they come; dvc's chatter is not."""
    chatter = ("To track the changes", "\tgit add", "To enable auto staging", "\tdvc config")
    bar = "\x1b[" in line or "it/s" in line or "s/it" in line  # ultralytics' progress bars, redrawn in place
    if line.strip() and not line.startswith(chatter) and not bar:
        print(f"   | {line}", flush=True)


@task(name="dvc-stage", **DECLARED)
def dvc_stage(stage: str, cfg: Config) -> str:
    """Run one DVC stage of the project ``cfg.home`` with ``cfg`` (written first by :func:`stage_config`);
    returns 'ran', 'restored' (from DVC's run cache) or 'cached' (unchanged)."""
    from components.data.versioning import DvcError, dvc

    try:
        out = dvc("repro", "--single-item", stage, cwd=cfg.home, echo=_echo, home=cfg.home)
    except DvcError as e:
        if "error:" in str(e) and "drspot" in str(e):  # the step itself refused the data
            raise DataError(str(e)) from None
        raise
    # dvc prints "Running stage", "Stage 'x' is cached - skipping run, checking out outputs" (its run cache
    # holds the outputs of exactly these dependencies and parameters), or "Stage 'x' didn't change, skipping"
    status = "restored" if "is cached - skipping run" in out else "ran" if "Running stage" in out else "cached"
    get_run_logger().info("dvc stage %s: %s", stage, status)
    return status


@task(name="validate", **DECLARED)
def validate_task(dataset: str, prepared: str, cfg: Config) -> int:
    return gate.run_validate(dataset, Path(prepared), cfg).rows_valid


@task(name="dedup", **DECLARED)
def dedup_task(dataset: str, prepared: str, cfg: Config) -> int:
    return gate.run_dedup(dataset, Path(prepared), cfg).rows_out


@task(name="split", **DECLARED)
def split_task(dataset: str, prepared: str, cfg: Config) -> dict[str, int]:
    return gate.run_split(dataset, Path(prepared), cfg).report["rows_per_split"]


def run_stage(stage: str, cfg: Config) -> str:
    """:func:`dvc_stage` under the run's timeout and retry policy for that stage's kind (flows/policy.py)."""
    return bound(dvc_stage, cfg, STAGE_KIND[stage])(stage, cfg)


def uses_dvc(dataset: str | Path, cfg: Config) -> bool:
    """Whether ``dataset`` is the project's DVC-tracked dataset, whose steps are the stages of ``dvc.yaml``."""
    return (cfg.home / "dvc.yaml").is_file() and Path(dataset).resolve() == cfg.resolve(cfg.paths.data).resolve()


def stage_config(cfg: Config) -> Path:
    """Write ``cfg`` where ``dvc.yaml``'s stages read it (their ``--config`` and ``params`` file), so DVC runs them
    with exactly this configuration and its staleness check sees every value they use."""
    return cfg.write(cfg.runtime.stage_config)


@flow(name="prepare", log_prints=True, **HOOKS)
def prepare_flow(
    dataset: str,
    prepared: str | None = None,
    profile: str | None = None,
    root: str | None = None,
    cfg: Config | None = None,
) -> dict[str, Any]:
    """Validate, de-duplicate and split ``dataset``; publish a markdown artifact of the figures.

    ``cfg`` is the run's resolved configuration (resolved here from ``profile`` when not given); ``root`` moves its
    state home to another project folder.
    """
    cfg = run_config(cfg, profile, root)
    steps: dict[str, str] = {}
    if uses_dvc(dataset, cfg):
        # the stages in dvc.yaml write to <prepared>/<data folder name>, as the CLI defaults do
        out = cfg.resolve(cfg.paths.prepared) / Path(cfg.paths.data).name
        stage_config(cfg)
        for stage in ("validate", "dedup", "split"):
            steps[stage] = run_stage(stage, cfg)
    else:
        out = gate.prepared_dir(dataset, cfg, prepared)
        for step in (validate_task, dedup_task, split_task):
            bound(step, cfg, "data")(dataset, str(out), cfg)
        steps = dict.fromkeys(("validate", "dedup", "split"), "ran")
    md = gate.markdown(out, dataset)
    create_markdown_artifact(markdown=md, key="prepare-summary", description=f"data gate for {dataset}")
    return {"steps": steps, "prepared": str(out), **gate.summary(out)}
