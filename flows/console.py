"""What the ``drspot`` commands and the demos print: progress lines, an ingest result, the monitor's quality verdict."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _console(stream=None):
    """A rich console on ``stream`` (stdout): styled on a terminal, plain text elsewhere (CI logs, pipes, files),
    where lines are not wrapped at 80 columns."""
    from rich.console import Console

    stream = stream or sys.stdout
    tty = stream.isatty()
    return Console(file=stream, highlight=False, width=None if tty else 200, no_color=not tty, soft_wrap=not tty)


def table(headers: list[str], rows: list[list], title: str | None = None) -> None:
    """Print ``rows`` under ``headers`` as aligned columns (rich): boxed on a terminal, plain columns elsewhere."""
    from rich import box
    from rich.table import Table

    console = _console()
    t = Table(
        *headers,
        title=title,
        box=box.SIMPLE_HEAD if console.is_terminal else None,
        show_header=True,
        header_style="bold" if console.is_terminal else "",
        pad_edge=False,
    )
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    if console.is_terminal:
        console.print(t)
        return
    with console.capture() as captured:  # plain columns: no padding left at the ends of the lines
        console.print(t)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()))


def progress(label: str, total: int | None = None):
    """A progress callback ``show(done, total=None)``: a rich progress bar on a terminal; elsewhere a plain line
    at most every 5 s and at the end, so CI logs stay readable."""
    state: dict = {"last": 0.0, "bar": None}
    tty = sys.stderr.isatty()

    def show(done: int, total_: int | None = total) -> None:
        final = total_ is not None and done >= total_
        if tty:
            _bar(state, label, done, total_, final)
            return
        now = time.monotonic()
        if not final and now - state["last"] < 5.0:
            return
        state["last"] = now
        print(f"{label}: {done}/{total_}" if total_ else f"{label}: {done}", file=sys.stderr, flush=True)

    return show


def _bar(state: dict, label: str, done: int, total: int | None, final: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if state["bar"] is None:
        bar = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=_console(sys.stderr),
            auto_refresh=False,  # refreshed by each call: no thread left behind by a run that stops early
            redirect_stdout=False,  # what the command prints goes where it would without the bar
            redirect_stderr=False,
        )
        bar.start()
        state["bar"], state["task"] = bar, bar.add_task(label, total=total)
    bar = state["bar"]
    bar.update(state["task"], completed=done, total=total)
    bar.refresh()
    if final:
        bar.stop()
        state["bar"] = None


def decision(r: dict) -> str:
    """A word for a gate result: PROMOTED, rejected, WAITING FOR APPROVAL, or unchanged (the champion's weights)."""
    if r.get("approval"):
        return "WAITING FOR APPROVAL"
    return {True: "PROMOTED", False: "rejected", None: "unchanged"}[r["promote"]]


def report_rows(result, limit: int) -> None:
    """Print an ingest result: counts, then problems grouped by check (up to ``limit`` each)."""
    s = result.summary
    print(f"ingested {result.rows} rows ({result.kind}) into {result.out}")
    print(f"  lesions {s['lesions']}, images with boxes {s['images_with_boxes']}, boxes {s['boxes']}")
    print(f"  labels  {s['labels']}")
    if result.class_map:
        pairs = ", ".join(f"{k} -> {v}" for k, v in sorted(result.class_map.items()))
        print(f"  class map ({result.kind}): {pairs}; any other class outside classes.names is quarantined")
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
