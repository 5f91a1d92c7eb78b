"""``drspot`` commands: ingest and the data gate (validate, dedup, split, prepare)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.console import progress, report_rows


def _kv(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected NAME=CLASS pairs separated by commas, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_ingest(args: argparse.Namespace) -> int:
    from components.data.ingest import ingest

    cfg = args.cfg
    opts: dict = {
        "images": args.images,
        "class_map": args.class_map,
        "ham_metadata": args.ham_metadata,
        "label_source": args.label_source,
        "lesion_csv": args.lesion_csv,
        "boxes": args.boxes,
        "id_prefix": args.id_prefix,
    }
    if args.kind == "synthetic":
        opts.update(
            generate=not args.no_generate,
            shifted=args.shifted,
            gen_progress=progress("generate"),
            overrides={
                "seed": args.seed,
                "n_lesions": args.n_lesions,
                "exact_duplicates": args.exact_duplicates,
                "near_duplicates": args.near_duplicates,
                "corrupt": args.corrupt,
                "unknown_labels": args.unknown_labels,
                "tiny": args.tiny,
            },
        )
    result = ingest(args.kind, args.source, args.out, cfg, append=args.append, progress=progress("ingest"), **opts)
    report_rows(result, cfg.ingest.max_report_rows)
    return 0


def _gate_step(step: str):
    def run(args: argparse.Namespace) -> int:
        from components.data import gate

        cfg = args.cfg
        prepared = gate.prepared_dir(args.dataset, cfg, args.prepared)
        fn = {"validate": gate.run_validate, "dedup": gate.run_dedup, "split": gate.run_split}[step]
        fn(args.dataset, prepared, cfg)
        s = gate.summary(prepared)
        out = gate.step_dirs(prepared)[step]
        if step == "validate":
            print(
                f"validated {s['rows_in']} rows: {s['rows_valid']} passed, "
                f"quarantined by check {s['quarantined_by_check']}"
            )
        elif step == "dedup":
            print(
                f"de-duplicated: {s['exact_pairs']} exact and {s['near_pairs']} near-duplicate pairs, "
                f"{s['duplicate_groups']} groups with several images, dropped {s['dropped_by_reason']}, "
                f"{s['label_conflicts']} label conflicts"
            )
        else:
            print(f"split: rows {s['rows_per_split']}, held out {s['held_out']}, leakage {s['leakage']}")
            if s["source_split_leakage"]:
                print(f"  the source's own split had: {s['source_split_leakage']}")
            if s["warning"]:
                print(f"WARNING: {s['warning']}", file=sys.stderr)
        print(f"  outputs in {out}")
        return 0

    return run


def cmd_prepare(args: argparse.Namespace) -> int:
    from flows.prepare import prepare_flow

    result = prepare_flow(str(args.dataset), str(args.prepared) if args.prepared else None, cfg=args.cfg)
    from components.data import gate

    print(gate.markdown(Path(result["prepared"]), args.dataset))
    print(f"\nsteps: {result['steps']}; outputs in {result['prepared']}")
    return 0


def register(sub) -> None:
    """Add this group's commands to the ``drspot`` parser's sub-commands."""
    i = sub.add_parser("ingest", help="turn a data source into a dataset (images + manifest.parquet)")
    i.add_argument("kind", choices=["synthetic", "ham10000", "isic", "medmnist", "yolo", "imagefolder", "feedback"])
    i.add_argument("source", type=Path, help="the source file or folder (synthetic: where the set is generated)")
    i.add_argument("--out", type=Path, required=True, help="the dataset folder to write")
    i.add_argument("--append", action="store_true", help="keep the rows already in --out and add these")
    i.add_argument("--images", type=Path, action="append", help="image folder (ham10000, isic; repeatable)")
    i.add_argument("--class-map", type=_kv, help="rename source classes, e.g. AKIEC=akiec,BCC=bcc (yolo)")
    i.add_argument("--ham-metadata", type=Path, help="HAM10000 metadata CSV to join by ISIC id (yolo)")
    i.add_argument(
        "--boxes", type=Path, help="lesion boxes CSV: image_id,x_min,y_min,x_max,y_max, normalised (ham10000)"
    )
    i.add_argument("--label-source", choices=["yolo", "metadata"], help="which label wins when joined (yolo)")
    i.add_argument("--lesion-csv", type=Path, help="CSV with image,lesion_id columns (isic)")
    i.add_argument("--id-prefix", help="image id prefix (medmnist; default from the file name)")
    g = i.add_argument_group("synthetic")
    g.add_argument("--no-generate", action="store_true", help="ingest SOURCE as it is; do not (re)generate it")
    g.add_argument("--shifted", action="store_true", help="render through the shifted 'other camera'")
    g.add_argument("--seed", type=int, help="generator seed (default: params seed)")
    g.add_argument("--n-lesions", type=int, help="lesions to draw (default: params)")
    for fault in ("exact-duplicates", "near-duplicates", "corrupt", "unknown-labels", "tiny"):
        g.add_argument(f"--{fault}", type=int, metavar="N", help=f"planted {fault.replace('-', ' ')} (default: params)")
    i.set_defaults(func=cmd_ingest)

    for step, text in (
        ("validate", "GX suite over the manifest + image checks; quarantine bad rows"),
        ("dedup", "exact + near-duplicate groups (pHash, verified), lesion links, label conflicts"),
        ("split", "stratified, grouped, leakage-free split with a frozen test set"),
        ("prepare", "validate -> dedup -> split as a Prefect flow (DVC stages for the project dataset)"),
    ):
        s = sub.add_parser(step, help=text)
        s.add_argument("dataset", type=Path, help="dataset folder (images + manifest.parquet)")
        s.add_argument("--prepared", type=Path, help="output folder (default: paths.prepared/<dataset name>)")
        s.set_defaults(func=cmd_prepare if step == "prepare" else _gate_step(step))
