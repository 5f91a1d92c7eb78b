"""``drspot`` commands: ingest and the data gate (validate, dedup, split, prepare)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from flows.commands import DATA, invoke
from flows.console import progress, report_rows


def _kv(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise typer.BadParameter(f"expected NAME=CLASS pairs separated by commas, got {part!r}")
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


Kind = Literal["synthetic", "ham10000", "bcn20000", "isic", "medmnist", "yolo", "imagefolder", "feedback"]
DatasetArg = Annotated[Path, typer.Argument(help="dataset folder (images + manifest.parquet)", show_default=False)]
PreparedOpt = Annotated[
    Path | None,
    typer.Option(help="the data gate's output folder", show_default="paths.prepared/<dataset name>"),
]


def _planted(what: str):
    return typer.Option(metavar="N", help=f"planted {what}", show_default="params", rich_help_panel="Synthetic")


def ingest(
    ctx: typer.Context,
    kind: Annotated[Kind, typer.Argument(help="what the source is", show_default=False)],
    source: Annotated[Path, typer.Argument(help="the source file or folder (synthetic: where the set is generated)")],
    out: Annotated[Path, typer.Option(help="the dataset folder to write")],
    append: Annotated[bool, typer.Option(help="keep the rows already in --out and add these")] = False,
    images: Annotated[
        list[Path] | None, typer.Option(metavar="DIR", help="image folder (ham10000, isic; repeatable)")
    ] = None,
    class_map: Annotated[
        dict | None,
        typer.Option(
            parser=_kv,
            metavar="A=a,B=b",
            help="rename source classes, e.g. AKIEC=akiec,BCC=bcc (yolo; bcn20000: replaces ingest.class_map.bcn20000)",
        ),
    ] = None,
    ham_metadata: Annotated[
        Path | None, typer.Option(metavar="CSV", help="HAM10000 metadata CSV to join by ISIC id (yolo)")
    ] = None,
    boxes: Annotated[
        Path | None,
        typer.Option(metavar="CSV", help="lesion boxes CSV: image_id,x_min,y_min,x_max,y_max, normalised"),
    ] = None,
    label_source: Annotated[
        Literal["yolo", "metadata"] | None, typer.Option(help="which label wins when joined (yolo)")
    ] = None,
    lesion_csv: Annotated[
        Path | None, typer.Option(metavar="CSV", help="CSV with image,lesion_id columns (isic)")
    ] = None,
    id_prefix: Annotated[
        str | None, typer.Option(help="image id prefix (medmnist)", show_default="from the file name")
    ] = None,
    no_generate: Annotated[
        bool,
        typer.Option(
            "--no-generate", help="ingest SOURCE as it is; do not (re)generate it", rich_help_panel="Synthetic"
        ),
    ] = False,
    shifted: Annotated[
        bool, typer.Option(help="render through the shifted 'other camera'", rich_help_panel="Synthetic")
    ] = False,
    seed: Annotated[
        int | None, typer.Option(help="generator seed", show_default="params seed", rich_help_panel="Synthetic")
    ] = None,
    n_lesions: Annotated[
        int | None, typer.Option(help="lesions to draw", show_default="params", rich_help_panel="Synthetic")
    ] = None,
    exact_duplicates: Annotated[int | None, _planted("exact duplicates")] = None,
    near_duplicates: Annotated[int | None, _planted("near duplicates")] = None,
    corrupt: Annotated[int | None, _planted("corrupt files")] = None,
    unknown_labels: Annotated[int | None, _planted("unknown labels")] = None,
    tiny: Annotated[int | None, _planted("tiny images")] = None,
) -> None:
    """Turn a data source into a dataset: images + manifest.parquet + ingest_report.json.

    Reads SOURCE as KIND, keeps every good row and lists every problem (by check, with the row) in the
    report; rows that only the data gate can judge are kept for it.

    **Example:** `drspot ingest synthetic raw/ --out data/` (generates a synthetic set with planted faults);
    `drspot ingest bcn20000 ../shared/data/bcn20000_84 --out bcn/` (a second clinic; ak, scc -> akiec by
    ingest.class_map)
    """
    invoke(ctx, cmd_ingest, locals())


GATE_STEPS = (
    (
        "validate",
        "Validate a dataset: the Great Expectations suite over the manifest and image checks; bad rows are "
        "quarantined, with the check and the row.",
        "drspot validate data/",
    ),
    (
        "dedup",
        "Find exact and near-duplicate groups (pHash, verified), lesion links and label conflicts, so that no "
        "lesion reaches two splits.",
        "drspot dedup data/",
    ),
    ("split", "Split stratified and grouped by lesion, leakage-free, with a frozen test set.", "drspot split data/"),
    (
        "prepare",
        "The data gate as one Prefect flow: validate -> dedup -> split (DVC stages for the project dataset).",
        "drspot prepare data/ --prepared prep/",
    ),
)


def _gate_command(handler, doc: str, example: str):
    def command(ctx: typer.Context, dataset: DatasetArg, prepared: PreparedOpt = None) -> None:
        invoke(ctx, handler, {"dataset": dataset, "prepared": prepared})

    command.__doc__ = f"{doc}\n\n**Example:** `{example}`"
    return command


PANEL = DATA
COMMANDS = (("ingest", ingest),) + tuple(
    (step, _gate_command(cmd_prepare if step == "prepare" else _gate_step(step), doc, example))
    for step, doc, example in GATE_STEPS
)
