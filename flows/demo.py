"""``drspot demo``: the whole loop on the embedded defaults, start to finish, on one machine.

synthetic data with planted faults -> DVC version -> data gate (what was quarantined and
de-duplicated) -> train flow (train, evaluate, register, gate/promote) -> deploy and serve ->
normal traffic -> monitor -> shifted traffic ("another camera") -> monitor finds drift -> clinicians
confirm cases (/feedback) -> retrain (the flywheel; the gate promotes or rejects, with the reason)
-> redeploy if promoted -> a closing summary with the numbers and where to look.

Every step is the real component: the Prefect flows, DVC stages, MLflow registry, the BentoML
service over HTTP (``drspot serve`` in a subprocess), Evidently. The demo starts from nothing: an
earlier run's registry, models, reports and prediction log are moved to ``.drspot/previous/<time>``
(not deleted). It serves with ``serving.store_images`` on, which the flywheel needs (``DRSPOT_SET``);
the synthetic photos carry no personal data.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import random
import secrets
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from infra.config import Config

TRAFFIC = 120  # photos per traffic phase (normal, shifted)


class Steps:
    """Numbered steps with their duration, and the lines the closing summary repeats."""

    def __init__(self) -> None:
        self.n = 0
        self.t0 = time.monotonic()
        self.rows: list[tuple[str, float, str]] = []
        self._start = 0.0
        self._title = ""

    def start(self, title: str) -> None:
        self.n += 1
        self._title, self._start = title, time.monotonic()
        print(f"\n== [{self.n}] {title}", flush=True)

    def done(self, outcome: str) -> None:
        took = time.monotonic() - self._start
        self.rows.append((self._title, took, outcome))
        print(f"   -> {outcome}  ({took:.0f}s; {time.monotonic() - self.t0:.0f}s so far)", flush=True)


def begin(cfg: Config, title: str) -> Steps:
    """A demo's start: on the embedded defaults only, its title, and an earlier run's state moved aside
    (:func:`_fresh_start`); returns the numbered steps."""
    if os.environ.get("DRSPOT_DATABASE_URL"):
        raise RuntimeError("the demo runs on the embedded defaults: unset DRSPOT_DATABASE_URL")
    print(title)
    kept = _fresh_start(cfg)
    if kept:
        print(f"an earlier run's registry, models, reports and prediction log were moved to {kept}")
    return Steps()


def _photos(out: Path, cfg: Config, seed: int, shifted: bool) -> list[tuple[Path, str]]:
    """New lesions (not in the dataset) photographed by the usual or the shifted camera."""
    from components.data.synthetic import Spec, generate

    faults = dict.fromkeys(("exact_duplicates", "near_duplicates", "corrupt", "unknown_labels", "tiny"), 0)
    # the class mix and views per lesion of the training data: a per-class floor on a small set, or one
    # view per lesion, would change the colour distribution, and the monitor would rightly call it drift
    spec = Spec.from_config(cfg, shifted=shifted, seed=seed, n_lesions=TRAFFIC, min_lesions_per_class=0, **faults)
    generate(out, spec)
    with open(out / "labels.csv") as f:
        photos = [(out / r["file"], r["label"]) for r in csv.DictReader(f)]
    random.Random(seed).shuffle(photos)
    return photos[:TRAFFIC]


def _send(url: str, photos: list[tuple[Path, str]], label: str) -> list[dict[str, Any]]:
    """POST each photo to /predict (4 clients at once); returns the answers with the true label."""
    import httpx

    done = {"n": 0}
    every = max(30, len(photos) // 10)

    def one(item: tuple[Path, str]) -> dict[str, Any]:
        path, truth = item
        r = httpx.post(f"{url}/predict", files={"image": (path.name, path.read_bytes(), "image/jpeg")}, timeout=120)
        r.raise_for_status()
        done["n"] += 1
        if done["n"] % every == 0 or done["n"] == len(photos):
            print(f"   {label}: {done['n']}/{len(photos)} photos answered", flush=True)
        return {**r.json(), "truth": truth, "file": str(path)}

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, photos))


def _confirm(url: str, key: str, request_id: str, label: str) -> int:
    """A clinician's confirmation through POST /feedback; returns the HTTP status."""
    import httpx

    body = {"request_id": request_id, "confirmed_label": label, "reviewer": "demo clinician"}
    return httpx.post(f"{url}/feedback", json=body, headers={"X-API-Key": key}, timeout=30).status_code


def _traffic_summary(answers: list[dict[str, Any]]) -> str:
    labels = [a["lesions"][0]["label"] for a in answers]  # the detector's most confident lesion
    right = sum(label == a["truth"] for label, a in zip(labels, answers, strict=True))
    fallback = sum(bool(a["fallback"]) for a in answers)
    top = Counter(labels).most_common(3)
    return (
        f"{len(answers)} answered; top-1 agrees with the truth for {right} ({right / len(answers):.0%}); "
        f"whole-image fallback {fallback}; most predicted {', '.join(f'{k} {v}' for k, v in top)}"
    )


def _monitor(cfg: Config, last: int) -> dict[str, Any]:
    from flows.monitor import monitor_flow

    s = monitor_flow(last=last, cfg=cfg)
    print(f"   drift monitor: {s['status'].upper()}")
    for r in s.get("reasons", []):
        print(f"     - {r}")
    if s.get("drifted"):
        print(f"     drifted: {', '.join(s['drifted'])}")
    from flows.console import quality_lines

    print("\n".join(f"   {line}" for line in quality_lines(s["quality"]).splitlines()))
    return s


def _empty_log(path: Path) -> bool:
    """Whether the SQLite prediction log at ``path`` holds no prediction (or does not exist)."""
    import sqlite3

    if not path.is_file():
        return True
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            return con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 0
    except sqlite3.Error:
        return False


def _fresh_start(cfg: Config) -> str | None:
    """Move an earlier run's state aside (never delete it), so the loop starts from nothing: the local
    MLflow store, the gate's and the evaluation's outputs, the models, the prediction log and stored
    photos. DVC's cache and remote stay (content addressed: an unchanged stage is restored, not re-run)."""
    from components.model import registry
    from serving.store import database_url

    root = cfg.home
    paths = [cfg.resolve(cfg.paths.prepared), cfg.resolve(cfg.paths.models), cfg.resolve(cfg.paths.reports)]
    log = Path(database_url(cfg).removeprefix("sqlite:///"))
    if not _empty_log(log):  # the command's own check of the log made an empty one: nothing of an earlier run
        paths += [log.with_name(log.name + x) for x in ("", "-wal", "-shm")]
    paths += [cfg.resolve(cfg.serving.images_dir), cfg.runtime.demo_traffic]
    if registry.tracking_uri() == f"sqlite:///{root / 'mlflow' / 'mlflow.db'}":
        paths += [root / "mlflow" / "mlflow.db", root / "mlflow" / "artifacts"]
    present = [p for p in paths if p.exists()]
    if not present:
        return None
    keep = cfg.runtime.previous / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    for p in present:
        dest = keep / p.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        p.rename(dest)
    return str(keep)


def _loop_start(cfg: Config, steps: Steps, ingest_step) -> tuple[dict, dict, str] | None:
    """Steps 1-4 of both demos: ingest (``ingest_step(data)``, printing its own figures), version with DVC, the data
    gate and the train flow. Returns (gate summary, train result, data version), or None when no model could be
    promoted to serve."""
    from components.data import gate, versioning
    from flows.console import decision
    from flows.prepare import prepare_flow
    from flows.train import train_flow

    root, data = cfg.home, cfg.resolve(cfg.paths.data)
    ingest_step(data)

    steps.start("version the dataset with DVC (dvc add + push to the default remote)")
    version = versioning.add(data.relative_to(root), cwd=root)
    versioning.push(root, timeout_s=cfg.flows.timeout_s.push)
    steps.done(f"data.dvc md5 {version}")

    steps.start("data gate: the `prepare` flow runs the DVC stages validate -> dedup -> split")
    gated = prepare_flow(str(data), cfg=cfg)
    print(gate.markdown(Path(gated["prepared"]), data.relative_to(root)))
    q = ", ".join(f"{k} {v}" for k, v in gated["quarantined_by_check"].items()) or "none"
    steps.done(
        f"{gated['rows_valid']} of {gated['rows_in']} rows valid (quarantined: {q}); {gated['exact_pairs']} exact + "
        f"{gated['near_pairs']} near duplicate pairs; splits {gated['rows_per_split']}; leakage {gated['leakage']}"
    )

    steps.start("train: detector + classifier (DVC stages), evaluate on the frozen test split, register, gate")
    trained = train_flow(cfg=cfg)
    clf, det = trained["results"]
    m = trained["metrics"]
    steps.done(
        f"classifier v{clf['version']} {decision(clf)} (macro AUC {m.get('macro_auc', float('nan')):.3f}, "
        f"balanced accuracy {m.get('balanced_accuracy', float('nan')):.3f}, malignant AUC "
        f"{m.get('malignant_auc', float('nan')):.3f}, malignant sensitivity "
        f"{m.get('malignant_sensitivity', float('nan')):.3f}); detector v{det['version']} {decision(det)}; "
        f"champions: classifier v{clf['champion']}, detector v{det['champion']}"
    )
    if clf["champion"] is None or det["champion"] is None:
        print("\nno champion to serve: the first model did not clear the gate's floors (see the reason above)")
        return None
    return gated, trained, version


def _serves(ready: dict[str, Any], cfg: Config) -> bool:
    """Whether the service answering /readyz serves the models the last ``drspot deploy`` deployed."""
    return ready.get("models") == json.loads(cfg.runtime.deployed.read_text()).get("registry")


def _start_serving(
    cfg: Config, steps: Steps, env: dict[str, str], serve_args: tuple[str, ...], port: int | None = None
):
    """Step 5: ``drspot deploy`` and ``drspot serve`` in a subprocess; returns the running server."""
    import httpx

    from serving.deploy import deploy
    from serving.launch import Server

    steps.start("deploy the champions (BentoML model store + Bento) and serve them over HTTP")
    built = deploy(cfg)
    print(f"   built Bento {built['bento']} with {built['registry']}")
    server = Server(env, cfg.runtime.demo_serve_log, *serve_args, port=port)
    ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
    models = ready.get("models", {})
    steps.done(f"{server.url} ready: {models.get('classifier')} + {models.get('detector')}")
    return server


def run_demo(cfg: Config) -> int:
    import httpx

    from components.data.ingest import ingest
    from flows.console import decision, progress, report_rows
    from flows.retrain import retrain_flow

    root = cfg.home
    raw = cfg.resolve(cfg.paths.raw)
    data = cfg.resolve(cfg.paths.data)
    steps = begin(cfg, f"DrSpot demo (profile {cfg.profile}) in {root}")

    def synthetic(data: Path) -> None:
        steps.start(f"generate + ingest a synthetic dataset with planted faults -> {data.relative_to(root)}")
        result = ingest("synthetic", raw / "synthetic", data, cfg, generate=True, progress=progress("ingest"))
        report_rows(result, 5)
        steps.done(f"{result.rows} images of {result.summary['lesions']} lesions; faults in raw/synthetic/faults.json")

    started = _loop_start(cfg, steps, synthetic)
    if started is None:
        return 1
    gated, _, version = started
    key = secrets.token_urlsafe(16)
    env = {**os.environ, cfg.serving.feedback_key_env: key}
    # the service gets this run's configuration, with consent to keep photos (the flywheel needs them)
    serving = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"store_images": True})})
    serve_args = ("--config", str(serving.write(cfg.runtime.run_config("demo-serve"))))
    server = _start_serving(cfg, steps, env, serve_args)
    try:
        traffic = cfg.runtime.demo_traffic
        steps.start(f"normal traffic: {TRAFFIC} photos of new lesions from the usual camera")
        normal = _send(server.url, _photos(traffic / "normal", cfg, cfg.seed + 1001, shifted=False), "normal")
        steps.done(_traffic_summary(normal))

        steps.start("monitor the normal traffic against the champion's reference (its training + validation images)")
        calm = _monitor(cfg, len(normal))
        steps.done(f"{calm['status']}")

        steps.start(f"shifted traffic: {TRAFFIC} photos from another camera (warmer cast, blur, over-exposed)")
        shifted = _send(server.url, _photos(traffic / "shifted", cfg, cfg.seed + 2002, shifted=True), "shifted")
        steps.done(_traffic_summary(shifted))

        steps.start("monitor the shifted traffic")
        drift = _monitor(cfg, len(shifted))
        steps.done(f"{drift['status']}" + (f": report {drift['report']}" if drift.get("report") else ""))

        steps.start("clinicians confirm the shifted cases (POST /feedback with the API key)")
        confirmed = sum(_confirm(server.url, key, a["request_id"], a["truth"]) == 201 for a in shifted)
        # one photo that is, byte for byte, a frozen test image: it must never reach training
        split = Path(gated["prepared"]) / "split" / "split.parquet"
        import pyarrow.parquet as pq

        test_row = next(r for r in pq.read_table(split).to_pylist() if r["split"] == "test")
        dup = _send(server.url, [(data / test_row["path"], test_row["label"])], "test-image copy")[0]
        status = _confirm(server.url, key, dup["request_id"], test_row["label"])
        if status != 201:
            raise RuntimeError(f"POST /feedback answered {status} for the test-image copy")
        steps.done(f"{confirmed} shifted cases confirmed, plus 1 copy of test image {test_row['image_id']}")

        steps.start("model quality of the served classifier on the confirmed cases (and estimated without labels)")
        judged = _monitor(cfg, len(shifted))["quality"]
        steps.done(f"{judged['rule']['status']}: {judged['rule']['reason']}")

        steps.start("retrain (the flywheel): feedback -> data gate -> new DVC version -> train -> gate -> deploy")
        fly = retrain_flow(trigger="demo: drift + confirmed cases", min_new=1, cfg=cfg)
        new_clf = fly["gate"][0] if fly.get("gate") else None
        for r in fly.get("gate", []):
            print(f"   {r['kind']} v{r['version']}: {decision(r)}: {r['reason']}")
        steps.done(
            f"data {fly['data_version_before']} -> {fly['data_version']}; "
            + (f"classifier v{new_clf['version']} {decision(new_clf)}" if new_clf else fly["reason"])
        )

        if fly.get("deployed"):
            steps.start("the running `drspot serve` switches to the new Bento (no restart)")
            t0 = time.monotonic()
            while True:  # serving/serve.py: started beside the old one, traffic moved once ready, old one drained
                ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
                if _serves(ready, cfg):
                    break
                if time.monotonic() - t0 > cfg.gate.serving_check.start_timeout_s + 30:
                    raise RuntimeError(f"drspot serve did not switch to {fly['deployed']} (see {server.log})")
                time.sleep(1)
            again = _photos(traffic / "shifted", cfg, cfg.seed + 2002, shifted=True)[:20]
            after = _send(server.url, again, "check")
            steps.done(
                f"serving {ready['models']['classifier']} + {ready['models']['detector']} "
                f"{time.monotonic() - t0:.0f} s after the deploy; "
                f"{_traffic_summary(after)}"
            )
    finally:
        server.stop()

    _summary(steps, cfg, data, version, fly, drift, judged)
    return 0


SHARED_HAM = "ham10000_200x150"  # ../shared/data/<this>: the 10,015 HAM10000 photos with a real lesion box each


def real_source(cfg: Config, folder: str | Path | None) -> Path:
    """The HAM10000 folder ``drspot demo --real`` ingests (``HAM10000_metadata.csv``, ``lesion_boxes.csv``,
    ``images/``): the one given, else ``../shared/data/ham10000_200x150`` beside the project."""
    path = Path(folder) if folder else cfg.home.parent / "shared" / "data" / SHARED_HAM
    missing = [n for n in ("HAM10000_metadata.csv", "lesion_boxes.csv", "images") if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} lacks {', '.join(missing)}: give the HAM10000 folder with `drspot demo --real DIR` "
            "(HAM10000_metadata.csv, lesion_boxes.csv and images/)"
        )
    return path


def _ham_sample(cfg: Config, source: Path, rows: int) -> Path:
    """The first ``rows`` photos (by image id) of the HAM10000 folder as a metadata CSV and a box file of their own
    under ``<paths.raw>/ham10000_sample/`` (a plumbing run on a few hundred real photos); returns that folder."""
    out = cfg.resolve(cfg.paths.raw) / "ham10000_sample"
    out.mkdir(parents=True, exist_ok=True)
    keep: set[str] = set()
    for name in ("HAM10000_metadata.csv", "lesion_boxes.csv"):  # the photos chosen from the first, then their boxes
        with open(source / name, newline="") as f:
            reader = csv.DictReader(f)
            table = sorted(reader, key=lambda r: r["image_id"])
            fields = reader.fieldnames or []
        keep = keep or {r["image_id"] for r in table[:rows]}
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(r for r in table if r["image_id"] in keep)
    return out


def ham_ingest_step(cfg: Config, steps: Steps, source: Path, rows: int | None = None):
    """The step that ingests the HAM10000 folder (all of it, or its first ``rows`` photos) into the dataset, for
    :func:`_loop_start`."""
    from components.data.ingest import ingest
    from flows.console import progress, report_rows

    def step(data: Path) -> None:
        folder = _ham_sample(cfg, source, rows) if rows else source
        steps.start(f"ingest the HAM10000 photos with their lesion boxes -> {data.relative_to(cfg.home)}")
        result = ingest(
            "ham10000",
            folder / "HAM10000_metadata.csv",
            data,
            cfg,
            images=[source / "images"],
            boxes=folder / "lesion_boxes.csv",
            progress=progress("ingest"),
        )
        report_rows(result, 5)
        s = result.summary
        steps.done(f"{result.rows} images of {s['lesions']} lesions, {s['images_with_boxes']} with a lesion box")

    return step


def run_real_demo(cfg: Config, source: Path, keep_serving: bool = False, photos: int = 200) -> int:
    """``drspot demo --real``: the shared HAM10000 (real photos, real lesion boxes) through the loop's first half,
    with the profile's pretrained backbone: ingest -> DVC version -> data gate (lesion-grouped split) -> detector
    and classifier (DVC stages) -> evaluation -> registry and gate -> deploy -> serve, then ``photos`` photos of
    the frozen test split over HTTP. With ``keep_serving`` the service stays up at ``serving.host:port``."""
    import pyarrow.parquet as pq
    from sklearn.metrics import balanced_accuracy_score

    steps = begin(
        cfg,
        f"DrSpot demo on real dermoscopy (profile {cfg.profile}, classifier {cfg.classifier.backbone}"
        f"{' pretrained' if cfg.classifier.pretrained else ''}) in {cfg.home}; data from {source}",
    )

    started = _loop_start(cfg, steps, ham_ingest_step(cfg, steps, source))
    if started is None:
        return 1
    gated, trained, version = started
    serve_args = ("--config", str(cfg.write(cfg.runtime.run_config("demo-serve"))))  # this run's config
    server = _start_serving(cfg, steps, dict(os.environ), serve_args, port=cfg.serving.port if keep_serving else None)
    try:
        steps.start(f"{photos} photos of the frozen test split over HTTP (the detector finds the lesion)")
        rows = [
            r
            for r in pq.read_table(Path(gated["prepared"]) / "split" / "split.parquet").to_pylist()
            if r["split"] == "test"
        ]
        rows = sorted(rows, key=lambda r: r["image_id"])[:: max(1, len(rows) // photos)][:photos]
        data = cfg.resolve(cfg.paths.data)
        answers = _send(server.url, [(data / r["path"], r["label"]) for r in rows], "test photos")
        labels = [a["lesions"][0]["label"] for a in answers]
        truth = [a["truth"] for a in answers]
        bacc = balanced_accuracy_score(truth, labels)
        steps.done(f"{_traffic_summary(answers)}; balanced accuracy over HTTP {bacc:.3f}")
    finally:
        if not keep_serving:
            server.stop()
    m = trained["metrics"]
    print("\n== summary")
    for i, (title, took, outcome) in enumerate(steps.rows, 1):
        print(f" {i:>2}. {title}  {took:.0f}s\n     {outcome}")
    print(f"\n total {time.monotonic() - steps.t0:.0f}s")
    print(
        f" test split: BACC {m['balanced_accuracy']:.3f}, macro AUC {m['macro_auc']:.3f}, malignant AUC "
        f"{m['malignant_auc']:.3f}, data version {version}"
    )
    if keep_serving:
        print(f" serving at {server.url} (process {server.proc.pid}; stop it with: kill -- -{server.proc.pid})")
    return 0


def _summary(steps: Steps, cfg: Config, data: Path, version: str, fly: dict, drift: dict, judged: dict) -> None:
    print("\n== summary")
    width = max(len(t) for t, _, _ in steps.rows)
    for i, (title, took, outcome) in enumerate(steps.rows, 1):
        print(f" {i:>2}. {title:<{width}}  {took:5.0f}s")
        print(f"     {outcome}")
    print(f"\n total {time.monotonic() - steps.t0:.0f}s")
    print("\n where to look")
    print("   status        .venv/bin/drspot status   (data, champions, service, prediction log, last runs)")
    print("   consoles      .venv/bin/drspot ui   (the Prefect UI and the MLflow UI on this project's stores)")
    print("   alerts        .venv/bin/drspot alerts   (drift, quality, gate decisions, failed flows)")
    print('   by hand       eval "$(.venv/bin/drspot env --export)"   (prefect, mlflow, bentoml, dvc see this project)')
    print(f"   data gate     {cfg.resolve(cfg.paths.prepared) / data.name}/{{validate,dedup,split}}/*.html")
    print(f"   evaluation    {cfg.resolve(cfg.paths.reports) / 'evaluation' / 'report.html'}")
    if drift.get("report"):
        print(f"   drift report  {drift['report']}")
    print(f"   quality       {judged['report']}   (on the confirmed cases)")
    if fly.get("feedback_batch"):
        print(f"   feedback in   {fly['feedback_batch']}")
    print(f"   data versions {version} -> {fly.get('data_version')} (data.dvc; `dvc push` went to the default remote)")
    bento = json.loads(cfg.runtime.deployed.read_text())["bento"]
    print(f"   serve again   .venv/bin/drspot serve   (Bento {bento})")
