"""A new clinic's learning curve: the HAM10000 champion meets BCN20000 (Barcelona), and fine-tunes on N cases a
clinician confirmed, chosen by the review queue or at random.

Run (in a project where `make demo-real` served a champion; DVC restores it):

    .venv/bin/python bench/clinic.py [--budgets 0,250,1000,2000] [--lesions N] [--no-pretrained]

What it does, with the pieces `drspot demo --clinic` uses:

1. The Barcelona lesions split once into incoming and a frozen test split (`flows/clinic.py::lesion_split`, kept in
   `raw/bcn20000/lesion_split.csv`: the demo and this benchmark measure on the same test photos).
2. The served pair (champion classifier + champion detector, `serving/pipeline.py`, in process) answers every
   incoming photo; the review queue (`components/monitoring/review.py::rank`, `monitor.review`) ranks them as it
   ranks the log. The drift monitor (`components/monitoring/monitor.py::compare`) judges a window of `--window`
   Barcelona answers and one of as many HAM10000 test answers against the champion's reference.
3. For each budget and selection (`review_queue`: the queue's first N; `random`: N drawn with `--seed`), the
   confirmed photos (labels from the metadata, through `ingest.class_map.bcn20000`) join the HAM10000 training and
   validation rows (split 85/15 by lesion, seeded) and the champion is fine-tuned with the retrain's schedule
   (`retrain.finetune`, as `flows/retrain.py::challenger_config` sets it). Budget 0 is the champion itself.
4. Each model answers the frozen Barcelona test photos and the HAM10000 test photos through the pipeline with the
   champion detector: balanced multi-class accuracy (BMCA), malignant AUC, melanoma sensitivity.
5. With the review queue's budget 1,000 (`--after`), a retrain that starts as `drspot train` does (`retrain.init:
   pretrained`: ImageNet weights, the full `classifier` schedule) on the same rows, for the time ratio.

Writes bench/results/clinic.json (keys of issue 23: bcn_bmca_before/after, bcn_malignant_auc_before/after,
bcn_mel_sensitivity_before/after, ham_bacc_before/after, budget, drift_detected_bcn, drift_detected_ham,
retrain_s_champion_init, retrain_s_pretrained_init, curve) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import components  # noqa: E402,F401
from flows.clinic import ClinicPhoto, clinic_source, figures, ham_window, lesion_split, read_clinic  # noqa: E402
from infra.config import Config, load_config  # noqa: E402

VAL_SHARE = 0.15  # of the confirmed lesions, for the fine-tune's early stopping
KEYS = ("bmca", "malignant_auc", "mel_sensitivity")


def ham_rows(cfg: Config) -> list[dict[str, Any]]:
    """The HAM10000 rows of the project's split manifest (the champion's data version), paths made absolute."""
    import pyarrow.parquet as pq

    split = cfg.resolve(cfg.paths.prepared) / Path(cfg.paths.data).name / "split" / "split.parquet"
    if not split.is_file():
        sys.exit(f"no split manifest at {split}: run `make demo-real` first (it trains the HAM10000 champion)")
    data = cfg.resolve(cfg.paths.data)
    cols = ["image_id", "path", "label", "boxes", "split", "source"]
    rows = [r for r in pq.read_table(split, columns=cols).to_pylist() if r["source"] == "ham10000"]
    for r in rows:
        r["path"] = str(data / r["path"])
    return rows


def serve(pipeline, files: list[Path], batch: int = 16) -> list[dict[str, Any]]:
    """The served answers (as /predict gives them, less guidance) for photo files, in process."""
    from serving.inputs import read_image

    out = []
    s = pipeline.serving
    for i in range(0, len(files), batch):
        ups = [read_image(f.read_bytes(), s) for f in files[i : i + batch]]
        for up, res in zip(ups, pipeline.analyse_many([u.decoded.rgb for u in ups]), strict=True):
            worst = max(res["lesions"], key=lambda les: les["malignant_probability"])
            top = worst["probabilities"][worst["label"]]
            out.append(
                {
                    **res,
                    **pipeline.abstention(res["lesions"], worst),
                    "label": worst["label"],
                    "confidence": top,
                    "malignant_probability": worst["malignant_probability"],
                    "quality": up.quality,
                    "width": up.decoded.size[0],
                    "height": up.decoded.size[1],
                    "image": {"quality": {"ok": not up.warnings}},
                }
            )
    return out


def pipeline_for(cfg: Config, classifier_dir: Path, detector_dir: Path):
    from serving.pipeline import Pipeline

    return Pipeline(classifier_dir, detector_dir, cfg)


def scored(pipeline, photos: list[tuple[Path, str]], cfg: Config) -> dict[str, float]:
    answers = serve(pipeline, [p for p, _ in photos])
    for a, (_, truth) in zip(answers, photos, strict=True):
        a["truth"] = truth
    return figures(answers, cfg)


def drift(cfg: Config, classifier_dir: Path, answers: list[dict[str, Any]]) -> dict[str, Any]:
    from components.monitoring import reference
    from components.monitoring.monitor import compare, window_features

    ref, projection = reference.load(classifier_dir)
    summary, _ = compare(ref, window_features(answers, projection), cfg, report=False)
    return {"drift": bool(summary["drift"]), "reasons": summary.get("reasons", [])}


def confirmed_rows(picks: list[ClinicPhoto], seed: int) -> list[dict[str, Any]]:
    """The confirmed photos as manifest rows of the retrain's data version: source ``feedback``, split by lesion."""
    lesions = sorted({p.lesion_id for p in picks})
    random.Random(seed).shuffle(lesions)
    val = set(lesions[: round(len(lesions) * VAL_SHARE)])
    return [
        {
            "image_id": f"fb_{p.image_id}",
            "path": str(p.file),
            "label": p.label,
            "boxes": None,
            "split": "val" if p.lesion_id in val else "train",
            "source": "feedback",
        }
        for p in picks
    ]


class Memo:
    """Finished points kept in a JSON file by key (champion, recipe, seed, selection, budget): a stopped run goes on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, compute):
        if key not in self.done:
            self.done[key] = compute()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.done, indent=1, default=float))
            tmp.replace(self.path)
        else:
            print(f"kept from an earlier run: {key}")
        return self.done[key]


def fine_tune(cfg: Config, rows: list[dict[str, Any]], out: Path) -> tuple[Path, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.model.train_classifier import train_classifier

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "split.parquet")
    t0 = time.monotonic()
    train_classifier(out / "split.parquet", Path("/"), out / "model", cfg, resume=False)
    return out / "model", time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0,250,1000,2000", help="confirmed cases per run")
    ap.add_argument("--selections", default="review_queue,random")
    ap.add_argument("--after", type=int, default=1000, help="the budget whose review-queue run is 'after'")
    ap.add_argument("--lesions", type=int, help="only the first N Barcelona lesions (a quick look)")
    ap.add_argument("--ham-photos", type=int, help="only N HAM10000 photos per split (a quick look)")
    ap.add_argument("--classifier-version", help="the registered classifier the clinic meets (default: the champion)")
    ap.add_argument("--detector-version", help="the registered detector (default: the champion)")
    ap.add_argument("--window", type=int, default=300, help="photos in each drift window")
    ap.add_argument("--no-pretrained", action="store_true", help="skip the pretrained-init retrain")
    ap.add_argument("--bcn", help="the BCN20000 folder (default ../shared/data/bcn20000_84)")
    ap.add_argument("--work", default="bench/results/clinic-work", help="fine-tuned models go here")
    ap.add_argument("--out", default="clinic", help="write bench/results/<out>.json (a partial curve: another name)")
    args = ap.parse_args()
    from flows.retrain import challenger_config

    t_start = time.monotonic()
    cfg = load_config("ham10000")
    seed = cfg.seed
    versions = {"classifier": args.classifier_version, "detector": args.detector_version}
    tuned_cfg, starts = challenger_config(cfg, versions)
    if not tuned_cfg.classifier.init.path or not tuned_cfg.detector.init.path:
        sys.exit(f"no champion to fine-tune ({starts}): run `make demo-real` first")
    champ_c = cfg.resolve(tuned_cfg.classifier.init.path)
    champ_d = cfg.resolve(tuned_cfg.detector.init.path)
    print(f"champion: classifier v{tuned_cfg.classifier.init.version}, detector v{tuned_cfg.detector.init.version}")

    photos = read_clinic(cfg, clinic_source(cfg, args.bcn), args.lesions)
    part = lesion_split(cfg, photos)
    test = [p for p in photos if part[p.lesion_id] == "test"]
    incoming = [p for p in photos if part[p.lesion_id] == "incoming"]
    ham = ham_rows(cfg)
    if args.ham_photos:
        ham = [
            r for part in ("train", "val", "test") for r in [x for x in ham if x["split"] == part][: args.ham_photos]
        ]
    ham_test = [(Path(r["path"]), r["label"]) for r in ham if r["split"] == "test"]
    ham_fit = [r for r in ham if r["split"] in ("train", "val")]
    bcn_test = [(p.file, p.label) for p in test]
    print(f"Barcelona: {len(test)} test photos, {len(incoming)} incoming; HAM10000: {len(ham_test)} test photos")

    champion = pipeline_for(cfg, champ_c, champ_d)
    work = ROOT / args.work
    memo = Memo(work / "points.json")
    champ_key = f"champion {tuned_cfg.classifier.init.sha256[:12]} lesions {args.lesions} ham {args.ham_photos}"
    budgets = [int(b) for b in args.budgets.split(",")]
    selections = args.selections.split(",")
    r = cfg.monitor.review

    def traffic() -> dict[str, Any]:
        """The champion's answers to every incoming photo: the drift windows and the review queue over them."""
        from components.monitoring import review

        t0 = time.monotonic()
        answers = serve(champion, [p.file for p in incoming])
        serve_s = time.monotonic() - t0
        rows = [{**a, "request_id": p.image_id, "created_at": None} for a, p in zip(answers, incoming, strict=True)]
        limits = (champion.threshold, champion.ood_threshold)
        queues = {
            str(b): [it["request_id"] for it in review.rank(rows, *limits, b, r.random_share, r.spread)]
            for b in budgets
            if b
        }
        return {
            "queue": queues,
            "drift_bcn": drift(cfg, champ_c, answers[-args.window :]),
            "drift_ham": drift(cfg, champ_c, serve(champion, [Path(r["path"]) for r in calm])),
            "serve_photos_per_s": round(len(incoming) / serve_s, 1),
        }

    calm = ham_window([r for r in ham if r["split"] == "test"], args.window)  # as the demo's HAM10000 window
    seen = memo.get(f"{champ_key} traffic {r.model_dump()} budgets {budgets} windows {args.window} by id", traffic)
    drift_bcn, drift_ham = seen["drift_bcn"], seen["drift_ham"]
    print(f"drift: Barcelona {drift_bcn['drift']}, HAM10000 {drift_ham['drift']}")
    by_id = {p.image_id: p for p in incoming}
    drawn = random.Random(seed).sample(incoming, min(max(budgets), len(incoming)))  # each budget a prefix of one draw

    def chosen(selection: str, budget: int) -> list[ClinicPhoto]:
        if selection == "random":
            return drawn[:budget]
        return [by_id[i] for i in seen["queue"][str(budget)]]  # the queue a reviewer of this budget gets

    before = memo.get(
        champ_key, lambda: {"bcn": scored(champion, bcn_test, cfg), "ham": scored(champion, ham_test, cfg)}
    )
    recipe = f"{champ_key} recipe {tuned_cfg.updated({'classifier': {'init': {'path': None}}}).digest()} seed {seed}"

    def point(selection: str, budget: int, start: Config, tag: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            picks = chosen(selection, budget)
            model, secs = fine_tune(start, ham_fit + confirmed_rows(picks, seed), work / f"{tag}{selection}-{budget}")
            p = pipeline_for(cfg, model, champ_d)
            return {"bcn": scored(p, bcn_test, cfg), "ham": scored(p, ham_test, cfg), "secs": secs}

        if budget == 0:
            return {**before, "secs": 0.0}
        return memo.get(f"{recipe} {tag}{selection} {budget}", run)

    # the figures that answer the issue first (a run stopped early keeps every point it finished: rerun to go on)
    # then the pretrained-init retrain for the time ratio, then the rest of the curve
    plan = [(s, args.after, "") for s in selections if args.after in budgets]
    if not args.no_pretrained and "review_queue" in selections and args.after in budgets:
        plan.append(("review_queue", args.after, "pretrained-"))
    plan += [(s, b, "") for b in budgets for s in selections if (s, b, "") not in plan]
    runs = {}
    for selection, budget, tag in plan:
        runs[(tag + selection, budget)] = res = point(selection, budget, cfg if tag else tuned_cfg, tag)
        print(json.dumps({"selection": tag + selection, "budget": budget, **{k: res["bcn"][k] for k in KEYS}}))
    curve = [
        {
            "budget": b,
            "selection": s,
            "bcn_bmca": runs[(s, b)]["bcn"]["bmca"],
            "bcn_malignant_auc": runs[(s, b)]["bcn"]["malignant_auc"],
            "bcn_mel_sensitivity": runs[(s, b)]["bcn"]["mel_sensitivity"],
            "ham_bacc": runs[(s, b)]["ham"]["bmca"],
            "fine_tune_s": round(runs[(s, b)]["secs"], 1),
        }
        for s in selections
        for b in budgets
    ]
    after = runs.get(("review_queue", args.after))
    champ_s = after["secs"] if after else None
    pre_s, pre_bmca = None, None
    pre = runs.get(("pretrained-review_queue", args.after))
    if pre is not None:
        pre_s, pre_bmca = pre["secs"], pre["bcn"]["bmca"]

    after = after or before
    result = {
        "budget": args.after,
        "seed": seed,
        "bcn_bmca_before": before["bcn"]["bmca"],
        "bcn_bmca_after": after["bcn"]["bmca"],
        "bcn_malignant_auc_before": before["bcn"]["malignant_auc"],
        "bcn_malignant_auc_after": after["bcn"]["malignant_auc"],
        "bcn_mel_sensitivity_before": before["bcn"]["mel_sensitivity"],
        "bcn_mel_sensitivity_after": after["bcn"]["mel_sensitivity"],
        "ham_bacc_before": before["ham"]["bmca"],
        "ham_bacc_after": after["ham"]["bmca"],
        "drift_detected_bcn": drift_bcn["drift"],
        "drift_detected_ham": drift_ham["drift"],
        "drift_reasons_bcn": drift_bcn["reasons"],
        "drift_reasons_ham": drift_ham["reasons"],
        "retrain_s_champion_init": round(champ_s, 1) if champ_s else None,
        "retrain_s_pretrained_init": round(pre_s, 1) if pre_s else None,
        "bcn_bmca_pretrained_init": pre_bmca,
        "curve": curve,
        "before": before,
        "after": after,
        "recipe": {
            "finetune": cfg.retrain.finetune.model_dump(),
            "review": r.model_dump(),
            "classifier_source_share": tuned_cfg.classifier.source_share,
        },
        "photos": {"bcn_test": len(bcn_test), "bcn_incoming": len(incoming), "ham_test": len(ham_test)},
        "serve_photos_per_s": seen["serve_photos_per_s"],
        "wall_s": round(time.monotonic() - t_start, 1),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    result["bcn_bmca_gain"] = round(result["bcn_bmca_after"] - result["bcn_bmca_before"], 4)
    result["required"] = {
        "bcn_bmca_gain >= 0.15": result["bcn_bmca_gain"] >= 0.15,
        "ham_bacc_after >= ham_bacc_before - 0.02": result["ham_bacc_after"] >= result["ham_bacc_before"] - 0.02,
        "bcn_mel_sensitivity_after >= 0.60": result["bcn_mel_sensitivity_after"] >= 0.60,
        "drift on Barcelona, not on HAM10000": drift_bcn["drift"] and not drift_ham["drift"],
    }
    out = ROOT / "bench" / "results" / f"{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"\n{'budget':>6} {'selection':<13} {'bcn bmca':>8} {'mal auc':>8} {'mel sens':>8} {'ham bacc':>8} {'s':>6}")
    for p in curve:
        print(
            f"{p['budget']:>6} {p['selection']:<13} {p['bcn_bmca']:>8.3f} {p['bcn_malignant_auc']:>8.3f} "
            f"{p['bcn_mel_sensitivity']:>8.3f} {p['ham_bacc']:>8.3f} {p['fine_tune_s']:>6.0f}"
        )
    for k, ok in result["required"].items():
        print(f"{'met' if ok else 'NOT met'}: {k}")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
