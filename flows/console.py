"""What the ``drspot`` commands and the demos print: progress lines, an ingest result, the monitor's quality verdict."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def progress(label: str, total: int | None = None):
    state = {"last": 0.0}
    tty = sys.stderr.isatty()

    def show(done: int, total_: int | None = total) -> None:
        now = time.monotonic()
        final = total_ is not None and done >= total_
        if not final and now - state["last"] < (0.2 if tty else 5.0):
            return
        state["last"] = now
        text = f"{label}: {done}/{total_}" if total_ else f"{label}: {done}"
        print(("\r" if tty else "") + text, end="" if tty and not final else "\n", file=sys.stderr, flush=True)

    return show


def report_rows(result, limit: int) -> None:
    """Print an ingest result: counts, then problems grouped by check (up to ``limit`` each)."""
    s = result.summary
    print(f"ingested {result.rows} rows ({result.kind}) into {result.out}")
    print(f"  lesions {s['lesions']}, images with boxes {s['images_with_boxes']}, boxes {s['boxes']}")
    print(f"  labels  {s['labels']}")
    if s["splits"]:
        print(f"  splits  {s['splits']}")
    counts = result.problem_counts()
    if counts:
        print(f"  problems {counts} (every row listed in {Path(result.out) / 'ingest_report.json'})")
        for check in counts:
            rows = [p for p in result.problems if p.check == check]
            kept = "kept for the data gate" if rows[0].kept else "not ingested"
            print(f"  - {check} ({len(rows)}, {kept}):")
            for p in rows[:limit]:
                print(f"      {p.row}: {p.detail}")
            if len(rows) > limit:
                print(f"      ... and {len(rows) - limit} more")


def quality_lines(q: dict) -> str:
    """The monitor's quality verdict as printed: the label rule, then the label-free estimate."""
    from components.monitoring.quality import ESTIMATED

    r, est = q["rule"], q["estimate"]
    figures = ", ".join(f"{k.replace('_', ' ')} {est[k]:.3f}" for k in ESTIMATED if k in est)
    return (
        f"model quality: {r['status'].upper()} ({q['confirmed_cases']} confirmed case(s) in the log)\n"
        f"  - {r['reason']}\n"
        f"  estimated without labels (CBPE, {est.get('rows', 0)} predictions of {est.get('version', '-')}): "
        f"{figures or est.get('note', '')}\n"
        f"  report: {q['report']}"
    )
