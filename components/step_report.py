"""Small, dependency-free report writing: JSON next to a self-contained HTML page."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:13px}th{background:#f2f2f2}.error{color:#b00020;font-weight:600}.warn{color:#9a6700}.ok{color:#1a7f37}
code{background:#f6f8fa;padding:1px 4px}"""


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None, limit: int | None = None) -> str:
    rows = list(rows)
    if not rows:
        return "<p><em>none</em></p>"
    columns = list(columns or rows[0].keys())
    shown = rows[:limit] if limit else rows
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in shown
    )
    more = (
        f"<p>... and {len(rows) - len(shown)} more rows (all in the parquet/JSON output)</p>"
        if len(shown) < len(rows)
        else ""
    )
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_html(path: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write a page of ``(heading, html body)`` sections."""
    parts = [f"<h2>{html.escape(h)}</h2>{body}" for h, body in sections]
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>"
    )
    return path


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    return path


def kv(d: dict[str, Any]) -> str:
    return table([{"item": k, "value": v} for k, v in d.items()])


def say(message: str) -> None:
    """Progress for long work: printed and flushed at once, so a log being tailed shows it."""
    print(message, flush=True)
