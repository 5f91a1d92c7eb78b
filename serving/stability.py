"""The stability window of ``/predict/frames`` and the page's camera mode: a class is confirmed only when the same
class holds, frame after frame, for ``serving.stability.hold_s`` seconds over at least ``min_frames`` frames, each
with the class's calibrated probability at least ``min_confidence``; frames further apart than ``max_gap_s`` break
the run (a camera that stalled proves nothing about the seconds it did not see)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.config import Stability


@dataclass
class Reading:
    """One frame's answer: its time (seconds), the reported class, that class's probability, and whether the answer
    held the class back (an abstaining frame never counts towards a run)."""

    t: float
    label: str
    probability: float
    abstain: str | None = None


def window(readings: list[Reading], s: Stability) -> dict[str, Any]:
    """The run of frames that decides: the first run that reaches the hold (then ``confirmed``), else the run that
    ends the sequence. ``reason`` says, in words, why a class was or was not confirmed."""
    start = None  # index of the current run's first frame
    why = None  # what broke the last run that broke
    for i, r in enumerate(readings):
        counts = r.abstain is None and r.probability >= s.min_confidence
        if start is not None:
            prev = readings[i - 1]
            gap = r.t - prev.t
            if gap > s.max_gap_s:
                why = f"a gap of {gap:.2f} s between frames {i - 1} and {i} (more than {s.max_gap_s:g} s) broke the run"
                start = None
            elif not counts or r.label != readings[start].label:
                if not counts:
                    what = f"abstained ({r.abstain})" if r.abstain else f"{r.label} at {r.probability:.2f}"
                    why = f"frame {i} was {what}, below the {s.min_confidence:g} minimum: the run broke"
                else:
                    why = f"the class changed at frame {i} ({readings[start].label} -> {r.label})"
                start = None
        if start is None and counts:
            start = i
        if start is not None:
            held, n = r.t - readings[start].t, i - start + 1
            if held >= s.hold_s and n >= s.min_frames:
                return _run(readings, start, i, True, f"{r.label} held {held:.2f} s over {n} frames")
    if start is None:
        why = why or "no frame had a class at the minimum confidence"
        return {"confirmed": False, "label": None, "run": None, "reason": why}
    end = len(readings) - 1
    held, n = readings[end].t - readings[start].t, end - start + 1
    need = []
    if held < s.hold_s:
        need.append(f"{held:.2f} of {s.hold_s:g} s")
    if n < s.min_frames:
        need.append(f"{n} of {s.min_frames} frames")
    before = f" (before it, {why})" if why else ""
    return _run(readings, start, end, False, f"{readings[start].label} held only {' and '.join(need)}{before}")


def _run(readings: list[Reading], start: int, end: int, confirmed: bool, reason: str) -> dict[str, Any]:
    return {
        "confirmed": confirmed,
        "label": readings[start].label if confirmed else None,
        "run": {
            "label": readings[start].label,
            "first_frame": start,
            "last_frame": end,
            "frames": end - start + 1,
            "held_s": round(readings[end].t - readings[start].t, 3),
            "min_probability": round(min(r.probability for r in readings[start : end + 1]), 5),
        },
        "reason": reason,
    }
