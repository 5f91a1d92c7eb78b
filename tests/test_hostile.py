"""The endpoint as an attacker and a fault meet it (issue 24), against the real `drspot serve` of the test Bento,
with the service's memory watched by psutil throughout: decompression bombs in every lossless format, a phone-size
JPEG, a camera's 120 frames, identical uploads at the same moment. And the model stage's batcher on its own: what
it merges, what it drops when a client leaves, what it refuses when the queue is over its budget."""

from __future__ import annotations

import asyncio
import base64
import io
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

# the service's resident memory may grow by at most this over its idle size while these requests run: what one
# photo at the working size (serving.work_side 2048) and a batch of frames take, not what an upload claims
RSS_BOUND_MIB = 300


class Watch:
    """The peak resident memory of the front and every process under it (the Bento's workers), sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.idle = self.peak = self.rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def rss(self) -> int:
        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def sample(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def grew_mib(self) -> float:
        return (self.peak - self.idle) / 2**20


def _photo(size: tuple[int, int], fmt: str, **save) -> bytes:
    """A smooth skin-coloured picture with a dark lesion in the middle (compresses to little in any format)."""
    w, h = size
    small = np.zeros((64, 64 * w // h, 3), np.uint8) + np.array([190, 140, 120], np.uint8)
    cy, cx = 32, small.shape[1] // 2
    yy, xx = np.ogrid[:64, : small.shape[1]]
    small[(yy - cy) ** 2 + (xx - cx) ** 2 < 12**2] = (80, 50, 40)
    im = Image.fromarray(small).resize(size, Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def _post(url: str, data: bytes, name: str = "x.jpg") -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"image": (name, data, "application/octet-stream")}, timeout=120)


def test_bombs_and_large_photos_cost_what_the_configuration_allows(server):
    """A lossless WebP or PNG a few KB long that decodes to 40 MP is refused from its header (it decoded whole before:
    +921 MiB for one request); a 24 MP JPEG decodes at reduced size (draft) and is answered with its boxes in its own
    size; the service's memory stays within the bound throughout."""
    webp = _photo((8000, 5000), "WEBP", lossless=True, method=0)
    png = _photo((7000, 5000), "PNG", compress_level=1)
    jpeg = _photo((6000, 4000), "JPEG", quality=90)
    assert len(webp) < 200_000 and len(png) < 2_000_000, (len(webp), len(png))
    with Watch(server.proc.pid) as watch:
        refused = [_post(server.url, webp, "bomb.webp"), _post(server.url, png, "bomb.png")]
        big = _post(server.url, jpeg, "phone.jpg")
    for r, what in zip(refused, ("8000x5000 WEBP", "7000x5000 PNG"), strict=True):
        assert r.status_code == 422 and r.json()["error"] == "image has too many pixels", r.text
        assert what in r.json()["detail"] and "serving.max_decode_pixels" in r.json()["detail"], r.text
    assert big.status_code == 200, big.text
    answer = big.json()
    assert (answer["image"]["width"], answer["image"]["height"]) == (6000, 4000)
    boxes = [les["box"] for les in answer["lesions"] if les["box"] is not None]
    assert all(0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 for x1, y1, x2, y2 in boxes), boxes  # normalised
    print(f"service RSS: idle {watch.idle / 2**20:.0f} MiB, peak +{watch.grew_mib:.0f} MiB")
    assert watch.grew_mib < RSS_BOUND_MIB, f"the service grew by {watch.grew_mib:.0f} MiB"


def test_a_sequence_of_120_frames_is_analysed_a_batch_at_a_time(server):
    """120 frames of 640x480 (36.9 MP together, inside the sequence's 40 MP budget) are decoded, analysed and released
    a batch at a time: answered, every frame read, the memory bounded."""
    frame = base64.b64encode(_photo((640, 480), "JPEG", quality=90)).decode()
    body = {"frames": [{"image": frame, "t": i / 10} for i in range(120)]}
    with Watch(server.proc.pid) as watch:
        r = httpx.post(f"{server.url}/predict/frames", json=body, timeout=300)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["frames"] == 120 and len(r.json()["readings"]) == 120
    print(f"service RSS: idle {watch.idle / 2**20:.0f} MiB, peak +{watch.grew_mib:.0f} MiB")
    assert watch.grew_mib < RSS_BOUND_MIB, f"the service grew by {watch.grew_mib:.0f} MiB"


def test_sixteen_identical_uploads_at_once_are_sixteen_rows_and_one_file(server, deployed):
    """With `store_images` on, identical photos stored at the same moment: every answer 200, every answer logged
    exactly once, one stored file (each writer its own temporary name; an identical file already there is success)."""
    photo = _photo((1200, 900), "JPEG", quality=95, comment=str(time.time()).encode())
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: _post(server.url, photo), range(16)))
    assert [r.status_code for r in answers] == [200] * 16, [r.text[:200] for r in answers if r.status_code != 200]
    ids = [r.json()["request_id"] for r in answers]
    sha = answers[0].json()["image"]["sha256"]
    root = deployed["root"] / ".drspot"
    with sqlite3.connect(root / "predictions.db") as db:
        rows = db.execute(
            f"SELECT request_id FROM predictions WHERE request_id IN ({','.join('?' * len(ids))})", ids
        ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids)
    stored = [p for p in (root / "images").rglob(f"{sha}*") if p.is_file()]
    assert len(stored) == 1 and not list((root / "images").rglob("*.part*")), stored


# --- the model stage's batcher, in process --------------------------------------------------------------------------


def _batcher(seen: list, max_size: int = 4, max_latency_ms: int = 10_000, delay: float = 0.05):
    from serving.batcher import Batcher

    def double(items):
        seen.append(list(items))
        time.sleep(delay)
        return [2 * i for i in items]

    return Batcher({"double": double}, max_size, max_latency_ms)


def test_the_batcher_merges_concurrent_requests_and_answers_each_its_own():
    seen: list = []

    async def main():
        b = _batcher(seen)
        return await asyncio.gather(*(b.submit("double", [i]) for i in range(10)))

    assert asyncio.run(main()) == [[2 * i] for i in range(10)]
    assert sum(map(len, seen)) == 10 and len(seen) < 10 and max(map(len, seen)) <= 4, seen


def test_a_request_whose_client_left_is_not_computed():
    """A cancelled request (its client went away: the stream route cancels its task) never reaches the model."""
    seen: list = []

    async def main():
        b = _batcher(seen, delay=0.2)
        first = asyncio.create_task(b.submit("double", [1]))
        await asyncio.sleep(0.05)  # the first batch is running: the next two wait
        gone = asyncio.create_task(b.submit("double", [99]))
        kept = asyncio.create_task(b.submit("double", [3]))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await first, await kept

    assert asyncio.run(main()) == ([2], [6])
    assert [1] in seen and not any(99 in batch for batch in seen), seen


def test_a_queue_over_its_latency_budget_refuses_instead_of_waiting():
    from serving.batcher import Overloaded

    seen: list = []

    async def main():
        b = _batcher(seen, max_size=1, max_latency_ms=100, delay=0.3)
        return await asyncio.gather(*(b.submit("double", [i]) for i in range(3)), return_exceptions=True)

    out = asyncio.run(main())
    assert out[0] == [0] and any(isinstance(o, Overloaded) for o in out[1:]), out
    assert "budget is 100 ms" in str(next(o for o in out if isinstance(o, Overloaded)))


@pytest.mark.parametrize("fmt,size,ok", [("JPEG", (8000, 5000), True), ("WEBP", (8000, 5000), False)])
def test_the_decode_budget_counts_what_each_format_decodes_to(fmt, size, ok):
    """From the header alone: a JPEG decodes at the DCT scale serving.work_side allows (8000x5000 at 1/2 = 10 MP), a
    WebP whole (40 MP): the budget (16 MP) passes the first and refuses the second before anything is decoded."""
    from infra.config import load_config
    from serving.inputs import InputError, check_decode, decoded_pixels

    s = load_config("test").serving
    assert decoded_pixels(fmt, *size, s) == (10_000_000 if fmt == "JPEG" else 40_000_000)
    if ok:
        check_decode(fmt, *size, s)
    else:
        with pytest.raises(InputError, match="decodes to 40,000,000 pixels"):
            check_decode(fmt, *size, s)


def test_a_post_sent_again_with_its_idempotency_key_is_answered_once_and_logged_once(server, deployed):
    """A client that did not see its answer (a 503 while the backend restarted, a dropped connection) sends the same
    request again with the same `Idempotency-Key`: the same request id comes back (`replayed`), one row is logged;
    a confirmation likewise (201, then 200); a malformed key is a 400."""
    from tests.serving_fixtures import API_KEY

    photo = _photo((800, 600), "JPEG", quality=92, comment=f"idem {time.time()}".encode())
    key = {"Idempotency-Key": f"retry-{time.time_ns()}"}
    files = {"image": ("x.jpg", photo, "image/jpeg")}
    first = httpx.post(f"{server.url}/predict", files=files, headers=key, timeout=60)
    again = httpx.post(f"{server.url}/predict", files=files, headers=key, timeout=60)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    rid = first.json()["request_id"]
    assert again.json()["request_id"] == rid and again.json()["replayed"] is True and "replayed" not in first.json()
    other = httpx.post(
        f"{server.url}/predict", files={"image": ("y.jpg", _photo((640, 480), "PNG"), "image/png")}, headers=key
    )
    assert other.status_code == 422 and f"used for another photo (request {rid})" in other.json()["detail"]
    bad = httpx.post(f"{server.url}/predict", files=files, headers={"Idempotency-Key": "k" * 129}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid idempotency key"
    body = {"request_id": rid, "confirmed_label": "mel", "reviewer": "dr.idem"}
    fkey = {"X-API-Key": API_KEY, "Idempotency-Key": f"fb-{time.time_ns()}"}
    confirmations = [httpx.post(f"{server.url}/feedback", json=body, headers=fkey, timeout=30) for _ in range(2)]
    assert [r.status_code for r in confirmations] == [201, 200], [r.text for r in confirmations]
    assert confirmations[0].json()["feedback_id"] == confirmations[1].json()["feedback_id"]
    with sqlite3.connect(deployed["root"] / ".drspot" / "predictions.db") as db:
        rows = db.execute("SELECT count(*) FROM predictions WHERE idempotency_key = ?", (key["Idempotency-Key"],))
        feedback = db.execute("SELECT count(*) FROM feedback WHERE request_id = ?", (rid,))
        assert rows.fetchone()[0] == 1 and feedback.fetchone()[0] == 1
