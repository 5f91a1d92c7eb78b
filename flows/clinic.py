"""``drspot demo --clinic``: the flywheel on a real second clinic (BCN20000, Hospital Clínic de Barcelona).

The HAM10000 champion of ``drspot demo --real`` (trained in the same run; DVC restores it when cached) is served,
then a new clinic's photos arrive. The Barcelona lesions are split once, by lesion (:func:`lesion_split`, kept in
``<paths.raw>/bcn20000/lesion_split.csv``), into *incoming* photos that reach the endpoint and a frozen *Barcelona
test* split that joins the frozen test set and never trains. Then, as numbered steps: HAM10000 test photos over HTTP
and the monitor (no drift expected); the incoming photos and the monitor (drift, with its reasons); clinicians
confirm a budget of cases chosen by the review queue (``GET /review`` with the reviewer key, ``POST /feedback`` with
the metadata's label, unknown to the system until then); the monitor's quality on the confirmed cases; both test
splits over HTTP (before); ``retrain`` (the challenger fine-tunes the champion; the gate judges it on both clinics'
test rows, ``gate.slices.sources``); the same photos over HTTP again (after), side by side.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import random
import secrets
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.demo import (
    Steps,
    _confirm,
    _loop_start,
    _monitor,
    _send,
    _serves,
    _start_serving,
    begin,
    ham_ingest_step,
)
from infra.config import Config

SHARED_BCN = "bcn20000_84"  # ../shared/data/<this>: 10,461 BCN20000 photos of 3,038 lesions, 84x84
TEST_SHARE = 0.2  # share of the Barcelona lesions in its frozen test split
SPLIT_FILE = "lesion_split.csv"
HAM_WINDOW = 300  # HAM10000 test photos the monitor compares with the reference (no drift expected)
QUEUE_PAGE = 200  # the most GET /review gives at once


@dataclass
class ClinicPhoto:
    image_id: str
    lesion_id: str
    label: str | None  # the metadata's class through the class map (what a clinician would confirm)
    file: Path


def clinic_source(cfg: Config, folder: str | Path | None) -> Path:
    """The BCN20000 folder (``metadata.csv`` + ``images/``): the one given, else ``../shared/data/bcn20000_84``."""
    path = Path(folder) if folder else cfg.home.parent / "shared" / "data" / SHARED_BCN
    missing = [n for n in ("metadata.csv", "images") if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} lacks {' and '.join(missing)}: give the BCN20000 folder with `drspot demo --clinic DIR` "
            "(metadata.csv and images/)"
        )
    return path


def read_clinic(cfg: Config, source: Path, lesions: int | None = None) -> list[ClinicPhoto]:
    """The photos of ``source`` as its ingest reads them (:func:`components.data.sources.adapt_bcn20000`: labels
    through ``ingest.class_map.bcn20000``, photos without a file left out); with ``lesions``, those of the first N
    lesions (by id) only."""
    from components.data.sources import Candidate, adapt_bcn20000

    read = [c for c in adapt_bcn20000(source, cfg) if isinstance(c, Candidate)]
    keep = set(sorted({c.lesion_id for c in read})[:lesions]) if lesions else None
    return [
        ClinicPhoto(c.image_id, c.lesion_id, cfg.classes.normalise(c.label), c.file)
        for c in read
        if keep is None or c.lesion_id in keep
    ]


def lesion_split(cfg: Config, photos: list[ClinicPhoto]) -> dict[str, str]:
    """Lesion id -> ``incoming`` | ``test``: ``TEST_SHARE`` of each class's lesions (by the lesion's most common label)
    to test, seeded; made once and kept in ``<paths.raw>/bcn20000/lesion_split.csv``, reused while it covers the same
    lesions (a second run measures on the same frozen photos)."""
    path = cfg.resolve(cfg.paths.raw) / "bcn20000" / SPLIT_FILE
    lesions = sorted({p.lesion_id for p in photos})
    if path.is_file():
        with open(path, newline="") as f:
            kept = {r["lesion_id"]: r["part"] for r in csv.DictReader(f)}
        if sorted(kept) == lesions:
            return kept
    labels: dict[str, Counter] = defaultdict(Counter)
    for p in photos:
        labels[p.lesion_id][p.label] += 1
    by_class: dict[str, list[str]] = defaultdict(list)
    for lesion in lesions:
        by_class[str(labels[lesion].most_common(1)[0][0])].append(lesion)
    rng = random.Random(cfg.seed)
    part = {}
    for cls in sorted(by_class):
        group = by_class[cls]
        rng.shuffle(group)
        n_test = max(1, round(len(group) * TEST_SHARE)) if len(group) > 1 else 0
        part |= {lesion: ("test" if i < n_test else "incoming") for i, lesion in enumerate(group)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SPLIT_FILE}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "part"])
        w.writerows(sorted(part.items()))
    tmp.replace(path)
    return part


def ham_window(test_rows: list[dict[str, Any]], n: int = HAM_WINDOW) -> list[dict[str, Any]]:
    """``n`` HAM10000 test rows spread over the split (every k-th by image id): a window of the clinic the model knows,
    not one class's photos (the split's own order is by class)."""
    rows = sorted(test_rows, key=lambda r: r["image_id"])
    return rows[:: max(1, len(rows) // n)][:n]


def figures(answers: list[dict[str, Any]], cfg: Config) -> dict[str, float]:
    """What the served answers are worth on photos whose truth is known: BMCA, malignant AUC, melanoma sensitivity,
    and how often the answer abstained, fell back to the whole photo or warned about the photo's quality."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from components.monitoring.quality import reported

    truth = [a["truth"] for a in answers]
    told = [reported(a) for a in answers]
    pred = [t.get("label") for t in told]
    malignant = set(cfg.classes.malignant)
    y_mal = [t in malignant for t in truth]
    p_mal = [float(t.get("malignant_probability", 0.0)) for t in told]
    mel = [p == "mel" for p, t in zip(pred, truth, strict=True) if t == "mel"]
    n = len(answers)
    return {
        "photos": n,
        "bmca": round(float(balanced_accuracy_score(truth, pred)), 4),
        "malignant_auc": round(float(roc_auc_score(y_mal, p_mal)), 4) if 0 < sum(y_mal) < n else float("nan"),
        "mel_sensitivity": round(sum(mel) / len(mel), 4) if mel else float("nan"),
        "abstained": round(sum(bool(a.get("abstain")) for a in answers) / n, 4),
        "fallback": round(sum(bool(a.get("fallback")) for a in answers) / n, 4),
        "quality_warned": round(sum(not a["image"]["quality"]["ok"] for a in answers) / n, 4),
    }


def confirm_from_queue(url: str, key: str, truth: dict[str, str], budget: int, since: str) -> dict[str, Any]:
    """A reviewer's session: take the review queue of the cases logged since ``since`` (``GET /review``, best
    first) page by page and confirm each case with its true label (``POST /feedback``), until ``budget`` cases are
    confirmed or the queue is empty. ``truth``: request id -> label (known to the reviewer, not to the system)."""
    import httpx

    confirmed: list[str] = []
    drawn = 0
    while len(confirmed) < budget:
        limit = min(QUEUE_PAGE, budget - len(confirmed))
        params = {"limit": limit, "since": since}
        r = httpx.get(f"{url}/review", params=params, headers={"X-API-Key": key}, timeout=120)
        r.raise_for_status()
        items = [i for i in r.json()["items"] if i["request_id"] in truth and i["request_id"] not in confirmed]
        if not items:
            break
        for item in items:
            status = _confirm(url, key, item["request_id"], truth[item["request_id"]])
            if status != 201:
                raise RuntimeError(f"POST /feedback answered {status} for {item['request_id']}")
            confirmed.append(item["request_id"])
            drawn += bool(item.get("random"))
        print(f"   confirmed {len(confirmed)}/{budget} cases from the review queue", flush=True)
    return {"confirmed": confirmed, "random_picks": drawn}


def _side_by_side(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    keys = ("bmca", "malignant_auc", "mel_sensitivity", "abstained", "fallback", "quality_warned")
    lines = [f"   {'':<24}" + "".join(f"{k:>17}" for k in keys)]
    for name in before:
        for when, fig in (("before", before[name]), ("after", after.get(name, {}))):
            cells = "".join(f"{fig.get(k, float('nan')):>17.3f}" for k in keys)
            lines.append(f"   {name + ' ' + when:<24}{cells}")
    return lines


def _freeze_test(cfg: Config, steps: Steps, bcn: Path, test: list[ClinicPhoto], incoming: list[ClinicPhoto]) -> str:
    """Ingest the Barcelona test lesions into the dataset as test rows (they join the frozen test set and never
    train) and version it; returns the data version."""
    from components.data import versioning
    from components.data.ingest import ingest
    from flows.console import progress, report_rows

    root, data = cfg.home, cfg.resolve(cfg.paths.data)
    steps.start("freeze a Barcelona test split (by lesion) into the dataset: test rows that never train")
    lesions = {p.lesion_id for p in test}
    result = ingest("bcn20000", bcn, data, cfg, append=True, lesions=lesions, split="test", progress=progress("ingest"))
    report_rows(result, 5)
    version = versioning.add(data.relative_to(root), cwd=root)
    versioning.push(root, timeout_s=cfg.flows.timeout_s.push)
    steps.done(
        f"{len(test)} photos of {len(lesions)} Barcelona lesions frozen as test (data.dvc {version}); "
        f"incoming: {len(incoming)} photos of {len({p.lesion_id for p in incoming})} other lesions"
    )
    return version


def _both_tests(url: str, bcn_test: list, ham_test: list, cfg: Config) -> dict[str, dict[str, float]]:
    """Both clinics' test photos over HTTP, and what the answers are worth (:func:`figures`)."""
    return {
        "Barcelona test": figures(_send(url, bcn_test, "Barcelona test"), cfg),
        "HAM10000 test": figures(_send(url, ham_test, "HAM10000 test"), cfg),
    }


def _wait_for_switch(server, cfg: Config, bento: str) -> None:
    """Until the running ``drspot serve`` answers with the models the last deploy deployed."""
    import httpx

    t0 = time.monotonic()
    while not _serves(httpx.get(f"{server.url}/readyz", timeout=10).json(), cfg):
        if time.monotonic() - t0 > cfg.gate.serving_check.start_timeout_s + 60:
            raise RuntimeError(f"drspot serve did not switch to {bento} (see {server.log})")
        time.sleep(1)


def _confirm_step(steps: Steps, url: str, key: str, answers: list[dict], budget: int, since: str) -> int:
    """Clinicians confirm ``budget`` of the answered Barcelona cases, as the review queue chooses them (all of them
    when the budget is larger, which is said); returns how many were confirmed."""
    truth = {a["request_id"]: a["truth"] for a in answers if a["truth"]}
    asked = budget
    if budget > len(truth):
        print(f"   the budget ({budget}) is larger than the incoming photos ({len(truth)}): all are confirmed")
        asked = len(truth)
    steps.start(f"clinicians confirm {asked} Barcelona cases chosen by the review queue (GET /review, POST /feedback)")
    session = confirm_from_queue(url, key, truth, asked, since)
    mix = Counter(truth[r] for r in session["confirmed"])
    steps.done(
        f"{len(session['confirmed'])} confirmed ({session['random_picks']} of them the queue's random share); "
        f"classes {dict(sorted(mix.items()))}"
    )
    return len(session["confirmed"])


def _retrain_step(cfg: Config, steps: Steps, out: dict[str, Any]) -> dict[str, Any]:
    """The flywheel: the confirmed cases through the data gate into a new data version, the champion fine-tuned, the
    per-source gate; its decisions and timing go into ``out``."""
    from flows.console import decision
    from flows.retrain import retrain_flow

    steps.start("retrain: confirmed cases -> data gate -> new data version -> fine-tune the champion -> gate")
    t0 = time.monotonic()
    fly = retrain_flow(trigger="demo --clinic: Barcelona drift + confirmed cases", min_new=1, cfg=cfg)
    out["retrain_s"] = round(time.monotonic() - t0, 1)
    for r in fly.get("gate", []):
        print(f"   {r['kind']} v{r['version']}: {decision(r)}: {r['reason']}")
    out["gate"] = [{k: r.get(k) for k in ("kind", "version", "promote", "reason")} for r in fly.get("gate", [])]
    out["start"] = fly.get("start")
    steps.done(f"data {fly['data_version_before']} -> {fly['data_version']}; {fly['reason']}")
    return fly


def run_clinic_demo(
    cfg: Config,
    ham: Path,
    bcn: Path,
    budget: int = 1000,
    lesions: int | None = None,
    ham_rows: int | None = None,
) -> dict[str, Any]:
    """``drspot demo --clinic``; returns its figures (``bench/clinic.py`` keeps them). ``lesions`` / ``ham_rows``
    sample the two sources (the CI test's plumbing run)."""
    import pyarrow.parquet as pq

    steps = begin(
        cfg,
        f"DrSpot on a second clinic (profile {cfg.profile}): the HAM10000 champion meets Barcelona's photos "
        f"({bcn}); {budget} confirmations",
    )
    started = _loop_start(cfg, steps, ham_ingest_step(cfg, steps, ham, ham_rows))
    if started is None:
        raise RuntimeError("no HAM10000 champion to serve: the first model did not clear the gate's floors")
    gated, trained, version = started
    data = cfg.resolve(cfg.paths.data)

    photos = read_clinic(cfg, bcn, lesions)
    part = lesion_split(cfg, photos)
    test = [p for p in photos if part[p.lesion_id] == "test"]
    incoming = [p for p in photos if part[p.lesion_id] == "incoming"]
    version = _freeze_test(cfg, steps, bcn, test, incoming)

    key = secrets.token_urlsafe(16)
    env = {**os.environ, cfg.serving.feedback_key_env: key}
    serving = cfg.updated({"serving": {"store_images": True}})  # consent: the flywheel needs the photos
    server = _start_serving(cfg, steps, env, ("--config", str(serving.write(cfg.runtime.run_config("demo-serve")))))
    out: dict[str, Any] = {"budget": budget, "lesions_sampled": lesions, "data_version_before": version}
    try:
        split = pq.read_table(Path(gated["prepared"]) / "split" / "split.parquet").to_pylist()
        ham_test = [r for r in split if r["split"] == "test"]
        window = ham_window(ham_test)
        steps.start(f"{len(window)} HAM10000 test photos over HTTP, then the monitor (the clinic the model knows)")
        _send(server.url, [(data / r["path"], r["label"]) for r in window], "HAM10000")
        calm = _monitor(cfg, len(window))
        out["drift_detected_ham"] = calm["status"] == "drift"
        steps.done(calm["status"].upper())

        steps.start(f"{len(incoming)} incoming Barcelona photos over HTTP (another dermatoscope, other patients)")
        arrived = dt.datetime.now(dt.UTC).isoformat()
        answers = _send(server.url, [(p.file, p.label) for p in incoming], "Barcelona")
        steps.done(f"answered {len(answers)}; served figures {figures(answers, cfg)}")

        steps.start("monitor the Barcelona traffic against the champion's reference")
        drift = _monitor(cfg, min(len(answers), 2000))
        out["drift_detected_bcn"] = drift["status"] == "drift"
        out["drift_reasons"] = drift.get("reasons", [])
        steps.done(f"{drift['status'].upper()}: {'; '.join(drift.get('reasons', [])) or 'no reason given'}")

        out["confirmed"] = _confirm_step(steps, server.url, key, answers, budget, arrived)

        steps.start("model quality on the confirmed Barcelona cases (measured, and estimated without labels)")
        judged = _monitor(cfg, min(len(answers), 2000))["quality"]
        steps.done(f"{judged['rule']['status']}: {judged['rule']['reason']}")

        bcn_test = [(p.file, p.label) for p in test]
        ham_all = [(data / r["path"], r["label"]) for r in ham_test]
        steps.start(f"before: the {len(bcn_test)} Barcelona and {len(ham_all)} HAM10000 test photos over HTTP")
        before = _both_tests(server.url, bcn_test, ham_all, cfg)
        steps.done(
            f"Barcelona BMCA {before['Barcelona test']['bmca']:.3f}, HAM10000 {before['HAM10000 test']['bmca']:.3f}"
        )

        fly = _retrain_step(cfg, steps, out)

        after = before
        if fly.get("deployed"):
            steps.start("the running service switches to the new Bento; the same test photos over HTTP again")
            _wait_for_switch(server, cfg, fly["deployed"])
            after = _both_tests(server.url, bcn_test, ham_all, cfg)
            print("\n".join(_side_by_side(before, after)))
            steps.done(
                f"Barcelona BMCA {before['Barcelona test']['bmca']:.3f} -> {after['Barcelona test']['bmca']:.3f}; "
                f"HAM10000 {before['HAM10000 test']['bmca']:.3f} -> {after['HAM10000 test']['bmca']:.3f}"
            )
        out |= {"before": before, "after": after, "promoted": fly.get("promoted", [])}
    finally:
        server.stop()
    report = cfg.resolve(cfg.paths.reports) / "clinic" / "clinic.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(out, indent=2, default=str))
    _summary(steps, cfg, out, fly, drift, judged)
    print(f"   figures       {report}")
    return out


def _summary(steps: Steps, cfg: Config, out: dict, fly: dict, drift: dict, judged: dict) -> None:
    print("\n== summary")
    width = max(len(t) for t, _, _ in steps.rows)
    for i, (title, took, outcome) in enumerate(steps.rows, 1):
        print(f" {i:>2}. {title:<{width}}  {took:5.0f}s\n     {outcome}")
    print(f"\n total {time.monotonic() - steps.t0:.0f}s")
    print("\n".join(_side_by_side(out["before"], out["after"])))
    print("\n where to look")
    print("   status        .venv/bin/drspot status   (champions, the last retrain and its gate decision)")
    print(f"   gate report   {cfg.resolve(cfg.paths.reports) / 'evaluation' / 'report.html'}   (slices by source)")
    if drift.get("report"):
        print(f"   drift report  {drift['report']}")
    print(f"   quality       {judged['report']}   (on the confirmed Barcelona cases)")
    print(f"   lesion split  {cfg.resolve(cfg.paths.raw) / 'bcn20000' / SPLIT_FILE}")
    if fly.get("feedback_batch"):
        print(f"   feedback in   {fly['feedback_batch']}")
