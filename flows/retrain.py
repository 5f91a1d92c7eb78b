"""The ``retrain`` flow, the flywheel: confirmed feedback -> data gate -> new DVC version -> ``train`` -> deploy.

1. The clinician-confirmed cases not yet in the dataset are taken from the prediction log
   (:func:`components.monitoring.feedback.pending`: only confirmations, only stored images; every case left
   out is listed with its reason). Fewer than ``min_new`` of them: nothing happens, and the flow
   says so (the threshold trigger runs it with ``retrain.min_new_cases``).
2. They are exported as a source folder under ``retrain.feedback_dir`` and appended to the dataset
   by ``ingest`` (``source=feedback``), then the dataset is versioned (``dvc add`` + ``dvc push`` to
   the default remote) when the project tracks it with DVC.
3. The challengers' start is decided (``retrain.init``, :func:`challenger_config`): ``champion`` fine-tunes the
   serving champions' weights with ``retrain.finetune``'s short schedule; ``pretrained`` starts as ``train`` does.
   The ``train`` flow runs with that configuration: its data gate validates and de-duplicates the new rows against
   everything already there, and the split keeps the frozen test set (a case duplicating a test
   image is dropped or held out, never trained on; no case enters test). The gate decides.
4. If a model was promoted (and ``retrain.deploy``), ``drspot deploy`` builds the new Bento; a
   running ``drspot serve`` switches to it without downtime (serving/serve.py).

Runs are serialised by a file lock, so the nightly run, the threshold run and a drift-triggered run
never retrain the same data twice at once. Each run keeps a journal of its steps beside the lock (:class:`Journal`):
a run that was killed or failed is resumed by the next one from the step it stopped in. Every task has a timeout
and retries only what a retry can fix (flows/policy.py).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.monitoring import feedback
from flows.console import decision
from flows.policy import DECLARED, HOOKS, bound, checkpoint, run_config
from infra.config import Config
from infra.state import StatePaths

# the steps of a retrain, in order (journal entries and the resume test's kill points; register and promote are
# inside `train`)
STEPS = ("collect", "ingest", "version", "train", "register", "promote", "deploy")
SUMMARY = "summary.json"  # each retrain's record under <paths.reports>/retrain/<time>/ (read by `drspot status`)
FEEDBACK_SOURCE = "feedback"  # the ingest kind (and manifest source) of the confirmed cases a retrain adds


def lock_path(root: Path) -> Path:
    return StatePaths(root).retrain_lock


@contextmanager
def one_at_a_time(root: Path, say=print):
    """One retrain per project at a time: an exclusive ``flock`` on the project's lock file, which the kernel
    releases when its holder dies however it dies (SIGKILL included), so no dead process can keep it. The file
    names its holder while held and is emptied on release: a contender says whom it waits for, and a holder
    that finds a name left behind says that the previous retrain did not finish."""
    lock = lock_path(root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:  # "a+": waiting must not erase the holder's name
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            say(f"retrain: waiting for the retrain already running ({f.read().strip() or 'holder unknown'}; {lock})")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        left = f.read().strip()
        if left:
            say(f"retrain: the previous retrain ({left}) did not finish (killed?); the kernel released its lock")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {dt.datetime.now(dt.UTC).isoformat()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def journal_path(root: Path) -> Path:
    """The running retrain's journal (beside its lock): which steps are done, so a killed or failed retrain resumes."""
    return lock_path(root).with_suffix(".journal.json")


class Journal:
    """The steps of one retrain, written (atomically) as each starts and ends. A retrain that finds one left by a
    run that did not finish resumes it: steps marked done are not run again, and the others are idempotent
    (ingest skips cases already in the dataset, ``dvc add`` of unchanged data is a no-op, DVC restores finished
    stages, registration finds weights already registered, deploy builds only when the Bento does not serve the
    champions)."""

    def __init__(self, root: Path) -> None:
        self.path = journal_path(root)
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.resuming = bool(self.data)  # a run that did not finish left it

    def begin(self, trigger: str, min_new: int) -> None:
        if not self.data:
            self.data = {"trigger": trigger, "min_new": min_new, "started": dt.datetime.now(dt.UTC).isoformat()}
            self.data["done"] = {}
            self._write()

    def done(self, step: str) -> Any:
        return self.data["done"].get(step)

    def start(self, step: str) -> None:
        self.data["running"] = step
        self._write()
        checkpoint(step)

    def finish(self, step: str, value: Any = True) -> None:
        self.data["done"][step] = value
        self.data.pop("running", None)
        self._write()

    def close(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


@task(name="collect-feedback", **DECLARED)
def collect(cfg: Config, data: str) -> tuple[list[feedback.Case], list[dict[str, str]]]:
    from serving.store import PredictionLog

    return feedback.pending(PredictionLog.from_config(cfg), data)


@task(name="ingest-feedback", **DECLARED)
def ingest_feedback(cases: list[feedback.Case], batch: str, data: str, cfg: Config) -> dict[str, Any]:
    from components.data.ingest import ingest

    feedback.export(cases, batch)
    result = ingest(FEEDBACK_SOURCE, batch, data, cfg, append=True)
    return {"rows": result.rows, "problems": result.problem_counts()}


@task(name="version-data", **DECLARED)
def version_data(root: str, data: str, push_timeout_s: float | None = None) -> dict[str, Any]:
    from components.data import versioning

    version = versioning.add(Path(data).resolve().relative_to(Path(root).resolve()), cwd=root)
    remote = versioning.default_remote(root)
    if remote:
        versioning.push(root, timeout_s=push_timeout_s)
    return {"data_version": version, "pushed_to": remote}


def challenger_config(cfg: Config, versions: dict[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    """The configuration the retrain's challengers train with, and for each kind where it starts (in words);
    ``versions`` (kind -> registered version) starts a kind from that version instead of its champion.

    ``retrain.init: champion``: each kind's champion is downloaded under ``<paths.models>/init/<kind>/v<N>`` and
    named in ``<kind>.init`` (path, version, weights hash) with ``retrain.finetune``'s schedule; a kind without a
    champion, or whose champion another backbone / input size / class list / architecture made, starts as ``train``
    does. A champion trained on the data version in force is not fine-tuned on the same data again: the challenger
    starts where that champion started (its parent version, or as ``train`` does), so a nightly run with unchanged
    data, params and code is DVC's cache hit and registers nothing. The gate judges the challengers like any other
    model.
    """
    from components.data.versioning import data_version
    from components.model import registry, train_classifier, train_detector

    if cfg.retrain.init == "pretrained":
        return cfg, dict.fromkeys(("classifier", "detector"), "as `train` starts (retrain.init: pretrained)")
    ft, tree, starts = cfg.retrain.finetune, {}, {}
    schedule = {
        "classifier": {
            "epochs": ft.epochs,
            "lr": ft.lr,
            "schedule": ft.schedule,
            "imbalance": ft.imbalance,
            "source_share": {FEEDBACK_SOURCE: ft.new_share} if ft.new_share else {},
        },
        "detector": {"epochs": ft.detector_epochs, "lr0": ft.detector_lr0, "warmup_epochs": 0},
    }
    checks = {"classifier": train_classifier.check_init, "detector": train_detector.check_init}
    current = data_version(cfg.home / "data.dvc")
    for kind in ("classifier", "detector"):
        name = registry.model_name(kind)
        version = (versions or {}).get(kind) or registry.champion(name)
        if version is None:
            starts[kind] = "as `train` starts: there is no champion yet"
            continue
        note, what = "", "champion"
        if kind not in (versions or {}):
            tags = registry.client().get_model_version(name, version).tags
            version, note = _start_of_champion(tags, version, current)
            what = "its parent" if note else what
            if version is None:
                starts[kind] = f"{note}as `train` starts, as it did"
                continue
        folder = registry.download(name, version, cfg.resolve(cfg.paths.models) / "init" / kind / f"v{version}")
        weights = folder / ("model.pt" if kind == "classifier" else "detector.pt")
        where = os.path.relpath(folder, cfg.home) if folder.is_relative_to(cfg.home) else str(folder)
        init = {"path": where, "version": version, "sha256": registry.file_hash(weights)}
        candidate = cfg.updated({kind: {"init": init, **schedule[kind]}})
        problem = checks[kind](candidate)
        if problem:
            starts[kind] = f"as `train` starts: {what} v{version} cannot be fine-tuned ({problem})"
            continue
        tree[kind] = {"init": init, **schedule[kind]}
        n = schedule[kind]["epochs"]
        starts[kind] = f"{note}fine-tunes {what} v{version} for {n} epoch(s)"
    return (cfg.updated(tree) if tree else cfg), starts


def _start_of_champion(tags: dict[str, str], version: str, current: str | None) -> tuple[str | None, str]:
    """Which version a challenger fine-tunes, from the champion ``version``'s registry ``tags``: the champion, or,
    when it was trained on the ``current`` data version, the version it was itself fine-tuned from (None: it started
    as ``train`` does), with the reason said in words ("" for the champion itself)."""
    if current is None or tags.get("data_version") != current:
        return version, ""
    return tags.get("init.parent_version"), f"champion v{version} was trained on this data ({current[:8]}): "


@task(name="deploy", **DECLARED)
def deploy_task(cfg: Config) -> dict[str, Any]:
    from serving.deploy import deploy

    return deploy(cfg)


def _markdown(s: dict[str, Any]) -> str:
    lines = [f"# Retrain ({s['trigger']}): {s['status']}", "", s["reason"], ""]
    if s.get("fate_counts"):
        lines += ["| where the confirmed cases went | cases |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in s["fate_counts"].items()]
    for r in s.get("gate", []):
        lines.append(f"- {r['kind']} v{r['version']}: {decision(r)}: {r['reason']}")
    if s.get("deployed"):
        lines.append(f"- deployed: Bento `{s['deployed']}`")
    if s.get("skipped_cases"):
        lines += ["", f"{len(s['skipped_cases'])} confirmed case(s) could not be used:"]
        lines += [f"- `{x['request_id']}`: {x['reason']}" for x in s["skipped_cases"][:50]]
    return "\n".join(lines)


def _record(cfg: Config, started: dt.datetime, summary: dict[str, Any]) -> None:
    """Keep the run's summary and configuration under ``<paths.reports>/retrain/<time>/`` (``drspot status``)."""
    import json

    out = cfg.resolve(cfg.paths.reports) / "retrain" / started.strftime("%Y%m%dT%H%M%S%fZ")
    out.mkdir(parents=True, exist_ok=True)
    cfg.write(out / "config.yaml")
    keep = {k: v for k, v in summary.items() if k not in ("fate",)}
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(keep, indent=2, default=str))
    tmp.replace(out / SUMMARY)


def _resuming(journal: Journal, trigger: str, logger) -> str:
    """The run's trigger; when the journal holds a stopped run, said in the log and named in the trigger."""
    if not journal.resuming:
        return trigger
    d = journal.data
    logger.warning(
        "retrain: resuming the retrain (%s) started at %s, stopped during %s; done: %s",
        d.get("trigger"),
        d.get("started"),
        d.get("running") or "-",
        ", ".join(d.get("done", {})) or "nothing",
    )
    return f"{trigger}; resumes the run ({d.get('trigger')}) of {d.get('started')}"


def _outcome(trained: dict[str, Any], case_ids: list[str]) -> dict[str, Any]:
    """What the training made of the run (the summary's part): the gate's decisions, the metrics, the promoted
    versions, and where each confirmed case went (train, val, test, or dropped and why), printed too."""
    prepared = trained.get("prepared_dir")
    fates = feedback.fate(prepared, case_ids) if prepared else {}
    out = {
        "status": "retrained",
        "reason": "; ".join(f"{r['kind']}: {r['reason']}" for r in trained["results"]),
        "fate": fates,
        "fate_counts": dict(Counter(f["where"] for f in fates.values())),
        "gate": trained["results"],
        "metrics": trained["metrics"],
        "promoted": [f"{r['kind']} v{r['version']}" for r in trained["results"] if r.get("promote")],
    }
    print(f"where the confirmed cases went: {out['fate_counts'] or 'none were new'}")
    for iid, f in fates.items():
        if f["where"] not in ("train", "val"):
            print(f"  {iid}: {f['where']}: {f['why']}")
    return out


@flow(name="retrain", log_prints=True, **HOOKS)
def retrain_flow(
    trigger: str = "by hand",
    min_new: int = 1,
    profile: str | None = None,
    root: str | None = None,
    deploy: bool | None = None,
    cfg: Config | None = None,
) -> dict[str, Any]:
    """Take the new confirmed cases into the dataset and retrain; returns what happened.

    ``cfg`` is the run's resolved configuration (resolved here from ``profile`` when not given); ``root`` moves its
    state home to another project folder.
    """
    from components.data.versioning import data_version
    from flows.train import train_flow

    cfg = run_config(cfg, profile, root)
    root_path = cfg.home
    data = cfg.resolve(cfg.paths.data)
    started = dt.datetime.now(dt.UTC)
    logger = get_run_logger()
    with one_at_a_time(root_path, logger.info):
        journal = Journal(root_path)
        trigger = _resuming(journal, trigger, logger)
        journal.begin(trigger, min_new)
        summary: dict[str, Any] = {"trigger": trigger, "skipped_cases": []}
        summary["data_version_before"] = journal.data.setdefault(
            "data_version_before", data_version(root_path / "data.dvc")
        )
        ingested = journal.done("ingest")
        if ingested is None:
            journal.start("collect")
            cases, skipped = bound(collect, cfg, "data")(cfg, str(data))
            journal.finish("collect", len(cases))
            for x in skipped:
                logger.warning("confirmed case %s not usable: %s", x["request_id"], x["reason"])
            case_ids = [c.image_id for c in cases]
            summary["skipped_cases"] = skipped
        else:  # a resumed run: the cases are in the dataset already
            cases, case_ids = [], ingested["cases"]
            summary |= {"ingest": ingested["ingest"], "feedback_batch": ingested["batch"]}
        summary["new_cases"] = len(case_ids)
        if ingested is None and len(cases) < min_new:
            summary |= {
                "status": "skipped",
                "reason": f"{len(cases)} new confirmed case(s) with a stored image; at least {min_new} needed",
            }
        else:
            if cases:
                journal.start("ingest")
                batch = cfg.resolve(cfg.retrain.feedback_dir) / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
                summary["ingest"] = bound(ingest_feedback, cfg, "data")(cases, str(batch), str(data), cfg)
                summary["feedback_batch"] = str(batch)
                journal.finish("ingest", {"cases": case_ids, "batch": str(batch), "ingest": summary["ingest"]})
                problems = summary["ingest"]["problems"] or "no problems"
                print(f"{len(cases)} confirmed case(s) added to {data} ({problems})")
            if (root_path / "data.dvc").is_file():
                if journal.done("version") is None:
                    journal.start("version")
                    versioned = bound(version_data, cfg, "data")(str(root_path), str(data), cfg.flows.timeout_s.push)
                    journal.finish("version", versioned)
                summary |= journal.done("version")
            journal.start("train")  # register and promote are checkpoints inside it
            challenger_cfg, starts = challenger_config(cfg)
            summary["start"] = starts
            for kind, how in starts.items():
                print(f"{kind} challenger: {how}")
            trained = train_flow(dataset=str(data), cfg=challenger_cfg)
            journal.finish("train", [{k: r.get(k) for k in ("kind", "version", "promote")} for r in trained["results"]])
            summary |= _outcome(trained, case_ids)
            promoted = summary["promoted"]
            if cfg.retrain.deploy if deploy is None else deploy:
                from serving.deploy import serves_champions

                # a promotion, or one an earlier run made without getting to deploy it (killed, failed)
                if promoted or (journal.resuming and not serves_champions(cfg)):
                    journal.start("deploy")
                    summary["deployed"] = bound(deploy_task, cfg, "deploy")(cfg).get("bento")
                    journal.finish("deploy", summary["deployed"])
        summary["data_version"] = data_version(root_path / "data.dvc")
        journal.close()
    summary |= {"at": started.isoformat(), "config_digest": cfg.digest(), "profile": cfg.profile}
    _record(cfg, started, summary)
    create_markdown_artifact(markdown=_markdown(summary), key="retrain-summary", description="the flywheel")
    print(f"retrain ({trigger}): {summary['status']}: {summary['reason']}")
    return summary
