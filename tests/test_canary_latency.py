"""How the serving check times a candidate against the champions (serving/canary.py): in turns, photo by photo, so a
load that comes and goes on the machine does not fail a sound candidate."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from serving.canary import _latency, pipeline_latencies


class Stand:
    """Something that analyses a photo in ``ms`` milliseconds times the machine's load at the moment."""

    def __init__(self, ms: float, load):
        self.ms, self.load, self.calls = ms, load, 0

    def analyse(self, rgb):
        self.calls += 1
        time.sleep(self.ms * self.load() / 1000)


def _photos(n: int) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (180, 120, 100)).save(buf, format="PNG")
    return [(f"p{i}", buf.getvalue()) for i in range(n)]


def _busy_midway():
    """The machine's load: 4x slower from the 13th photo analysed on (halfway through the check)."""
    calls = []

    def load():
        calls.append(1)
        return 1 if len(calls) <= 12 else 4

    return load


def test_a_load_that_comes_midway_weighs_on_both_pipelines_alike():
    load = _busy_midway()
    same = {"candidate": Stand(2, load), "champion": Stand(2, load)}
    result = {}
    assert _latency(result, same, _photos(10), [0.01], budget=2.0) is None
    assert result["latency_ratio"] == pytest.approx(1.0, abs=0.25)
    assert same["candidate"].calls == same["champion"].calls == 11  # a warm-up and the ten photos each
    # one after the other, the same two would have differed by the load alone
    load = _busy_midway()
    first = pipeline_latencies({"candidate": Stand(2, load)}, _photos(10))["candidate"]
    second = pipeline_latencies({"champion": Stand(2, load)}, _photos(10))["champion"]
    assert sum(second) / sum(first) > 2.5


def test_a_slower_candidate_is_named_with_its_ratio_and_the_champions_time():
    result = {}
    why = _latency(
        result, {"candidate": Stand(6, lambda: 1), "champion": Stand(1, lambda: 1)}, _photos(6), [0.01], budget=2.0
    )
    assert why.startswith("the candidate takes ") and "x the champions' time per photo" in why
    assert result["latency_ratio"] > 3 and result["latency_ms"]["candidate"] > result["latency_ms"]["champion"]
    assert "budget 2x" in why and result["latency_ms"]["candidate_http"] == 10.0
    alone = {}
    assert _latency(alone, {"candidate": Stand(1, lambda: 1)}, _photos(2), [0.01], 2.0) is None  # no champion yet
    assert "latency_ratio" not in alone and "champion" not in alone["latency_ms"]
