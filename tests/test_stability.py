"""The camera's stability window (serving/stability.py): a class is confirmed only when it holds long enough, over
enough frames, each confident enough, without a gap; otherwise the reason says what broke the run."""

from __future__ import annotations

from infra.config import Stability
from serving.stability import Reading, window

S = Stability(hold_s=3, min_frames=5, min_confidence=0.6, max_gap_s=1.0, max_frames=120)


def _frames(labels: str, every: float = 0.5, p: float = 0.9, start: float = 0.0) -> list[Reading]:
    return [Reading(start + i * every, lab, p) for i, lab in enumerate(labels.split())]


def test_a_class_held_three_seconds_over_five_frames_is_confirmed_at_the_frame_that_completes_it():
    out = window(_frames("nv nv nv nv nv nv nv nv nv"), S)  # t = 0 .. 4 s
    assert out["confirmed"] and out["label"] == "nv"
    assert out["run"] == {
        "label": "nv",
        "first_frame": 0,
        "last_frame": 6,  # t = 3.0 s: the first frame at which the hold is reached
        "frames": 7,
        "held_s": 3.0,
        "min_probability": 0.9,
    }
    assert out["reason"] == "nv held 3.00 s over 7 frames"


def test_too_short_a_hold_or_too_few_frames_is_not_confirmed_and_says_how_far_it_got():
    short = window(_frames("nv nv nv nv"), S)  # 1.5 s
    assert not short["confirmed"] and short["label"] is None
    assert short["reason"] == "nv held only 1.50 of 3 s and 4 of 5 frames"
    sparse = window(_frames("nv nv nv nv", every=1.0), S)  # 3 s over 4 frames
    assert not sparse["confirmed"] and sparse["reason"] == "nv held only 4 of 5 frames"


def test_a_change_of_class_restarts_the_run():
    out = window(_frames("mel mel mel mel nv nv nv nv nv nv nv"), S)
    assert out["confirmed"] and out["label"] == "nv" and out["run"]["first_frame"] == 4
    broken = window(_frames("nv nv nv nv nv mel nv nv"), S)
    assert not broken["confirmed"] and broken["run"]["first_frame"] == 6
    assert (
        broken["reason"]
        == "nv held only 0.50 of 3 s and 2 of 5 frames (before it, the class changed at frame 6 (mel -> nv))"
    )


def test_a_gap_between_frames_breaks_the_run_and_is_named():
    frames = _frames("nv nv nv nv") + _frames("nv nv nv", start=3.5)  # 1.5 s, then nothing for 2 s
    out = window(frames[:5], S)
    assert not out["confirmed"] and out["run"]["first_frame"] == 4
    assert out["reason"] == (
        "nv held only 0.00 of 3 s and 1 of 5 frames (before it, a gap of 2.00 s between frames 3 and 4 (more than "
        "1 s) broke the run)"
    )
    only_gap = window([Reading(0, "nv", 0.9), Reading(2.5, "nv", 0.9)], S)
    assert not only_gap["confirmed"] and only_gap["run"]["first_frame"] == 1
    # the reason of a run that never restarts counting: the gap itself
    gone = window([Reading(0, "nv", 0.9), Reading(2.5, "nv", 0.3)], S)
    assert gone == {
        "confirmed": False,
        "label": None,
        "run": None,
        "reason": "a gap of 2.50 s between frames 0 and 1 (more than 1 s) broke the run",
    }


def test_unconfident_or_abstaining_frames_never_count():
    low = window(_frames("nv nv nv nv nv nv nv nv", p=0.55), S)
    assert low == {"confirmed": False, "label": None, "run": None, "reason": low["reason"]}
    assert low["reason"] == "no frame had a class at the minimum confidence"
    frames = _frames("nv nv nv nv nv nv nv nv")
    frames[3] = Reading(frames[3].t, "nv", 0.95, abstain="not_dermoscopic_lesion")
    out = window(frames, S)
    assert not out["confirmed"] and out["run"]["first_frame"] == 4
    dip = window(_frames("nv nv nv") + [Reading(1.5, "nv", 0.4)], S)
    assert dip["reason"] == "frame 3 was nv at 0.40, below the 0.6 minimum: the run broke"
