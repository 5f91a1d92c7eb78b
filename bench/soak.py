"""Soak: mixed traffic against `drspot serve` while it is hurt, and whether every answer was logged exactly once.

Run:  .venv/bin/drspot deploy && .venv/bin/python bench/soak.py [--minutes 10] [--concurrency 16]

`drspot serve` of the deployed Bento logs to the stack's PostgreSQL (``infra.stack.start_postgres``: a fresh cluster
in a temporary folder, scram-sha-256, the non-superuser ``drspot`` role) with ``serving.store_images`` on. For
``--minutes``, ``--concurrency`` clients send a mix: good photos to ``/predict``, bad inputs (corrupt, truncated, a
WebP that claims 40 MP, a wrong content type), confirmations to ``/feedback``, ``/predict/stream``,
``/predict/frames`` sequences and ``/report`` PDFs. Every POST carries an ``Idempotency-Key``; a client that gets a
5xx or loses its connection sends the same request again (with the same key) until it is answered, as a careful
client would. Meanwhile, at fixed points of the run: the backend is SIGKILLed (all its processes) at 15% and 75%,
PostgreSQL is stopped and started again at 35%, and `drspot deploy` builds a new Bento at 55%, which the running
front switches to. The service's resident memory (front and everything under it) is sampled throughout.

Writes bench/results/soak.json: ``answered_200`` (distinct predictions answered), ``rows_logged``, ``lost``
(answered but not logged), ``duplicated`` (logged twice for one client request), ``errors_5xx`` (and how many fell
outside the fault windows), ``peak_rss_mib``, ``p99_ms`` (per answered attempt), and the events with their times.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import components  # noqa: E402,F401
from infra.config import load_config  # noqa: E402

KEY = "soak-" + uuid.uuid4().hex  # the reviewer key of this run's service
FAULT_GRACE_S = 5  # a 5xx this long after a fault's end still counts as the fault's


def photos(n: int) -> list[bytes]:
    """bench/serving.py's photos (the project's data/images, else synthetic ones)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.images(n)


def bad_inputs() -> list[tuple[str, bytes, str]]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8000, 5000), (180, 120, 100)).save(buf, format="WEBP", lossless=True, method=0)
    jpeg = io.BytesIO()
    Image.new("RGB", (640, 480), (150, 100, 90)).save(jpeg, format="JPEG")
    return [
        ("noise.jpg", os.urandom(4096), "image/jpeg"),
        ("truncated.jpg", jpeg.getvalue()[:600], "image/jpeg"),
        ("bomb.webp", buf.getvalue(), "image/webp"),
        ("notes.txt", b"not a photo", "text/plain"),
    ]


class Memory(threading.Thread):
    """Peak resident memory of a process and everything under it, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root, self.peak, self.done = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(0.05):
            total = 0
            for p in [self.root, *self.root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)


class Run:
    """What the clients saw."""

    def __init__(self) -> None:
        self.answered: dict[str, str] = {}  # request id -> the client's idempotency key
        self.latencies: list[float] = []
        self.errors_5xx: list[tuple[float, int, str]] = []  # (time, status, endpoint)
        self.retried_ok = 0
        self.counts: dict[str, int] = {}
        self.unexpected: list[str] = []
        self.feedback_keys: set[str] = set()
        self.t0 = time.monotonic()

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


async def until_answered(run: Run, http, method: str, url: str, endpoint: str, deadline_s: float = 120, **kw):
    """The request (``http.request(method, url, **kw)``) sent again, same body and key, after a 5xx or a lost
    connection, until it is answered."""
    import httpx

    start, tries = time.monotonic(), 0
    while True:
        tries += 1
        t = time.monotonic()
        try:
            r = await http.request(method, url, **kw)
        except httpx.TransportError:
            run.errors_5xx.append((time.monotonic() - run.t0, 0, endpoint))
            r = None
        if r is not None and r.status_code < 500:
            run.latencies.append(time.monotonic() - t)
            if tries > 1:
                run.retried_ok += 1
            return r
        if r is not None:
            run.errors_5xx.append((time.monotonic() - run.t0, r.status_code, f"{endpoint}: {r.text[:120]}"))
        if time.monotonic() - start > deadline_s:
            run.unexpected.append(f"{endpoint}: not answered within {deadline_s:g} s")
            return r
        await asyncio.sleep(min(0.5 * tries, 3))


async def client(run: Run, url: str, imgs: list[bytes], bad: list, end: float, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < end:
            kind = rng.choices(["predict", "bad", "feedback", "stream", "frames", "report"], [50, 10, 10, 10, 10, 10])[
                0
            ]
            key = {"Idempotency-Key": uuid.uuid4().hex}
            run.count(kind)
            if kind == "predict":
                files = {"image": ("p.jpg", rng.choice(imgs), "image/jpeg")}
                r = await until_answered(run, http, "POST", f"{url}/predict", kind, files=files, headers=key)
                if r is not None and r.status_code == 200:
                    run.answered[r.json()["request_id"]] = key["Idempotency-Key"]
            elif kind == "bad":
                name, data, ctype = rng.choice(bad)
                files = {"image": (name, data, ctype)}
                r = await until_answered(run, http, "POST", f"{url}/predict", kind, files=files, headers=key)
                if r is not None and not 400 <= r.status_code < 500:
                    run.unexpected.append(f"bad input {name}: {r.status_code}")
            elif kind == "feedback" and run.answered:
                rid = rng.choice(list(run.answered))
                body = {"request_id": rid, "confirmed_label": rng.choice(["nv", "mel", "bkl"]), "reviewer": "soak"}
                headers = {**key, "X-API-Key": KEY}
                r = await until_answered(run, http, "POST", f"{url}/feedback", kind, json=body, headers=headers)
                if r is not None and r.status_code in (200, 201):
                    run.feedback_keys.add(key["Idempotency-Key"])
            elif kind == "stream":
                body = {"image": base64.b64encode(rng.choice(imgs)).decode()}
                await stream(run, http, url, body, key)
            elif kind == "frames":
                frame = base64.b64encode(rng.choice(imgs)).decode()
                body = {"frames": [{"image": frame, "t": 0.6 * i} for i in range(6)]}
                r = await until_answered(run, http, "POST", f"{url}/predict/frames", kind, json=body, headers=key)
                if r is not None and r.status_code == 200 and r.json().get("request_id"):
                    run.answered[r.json()["request_id"]] = key["Idempotency-Key"]
            elif kind == "report" and run.answered:
                rid = rng.choice(list(run.answered))
                r = await until_answered(run, http, "GET", f"{url}/report/{rid}.pdf", kind)
                if r is not None and r.status_code != 200:
                    run.unexpected.append(f"report {rid}: {r.status_code}")


async def stream(run: Run, http, url: str, body: dict, key: dict) -> None:
    """A streamed prediction, sent again with its key until its ``done`` event arrives."""
    for _ in range(60):
        t = time.monotonic()
        try:
            async with http.stream("POST", f"{url}/predict/stream", json=body, headers=key) as r:
                if r.status_code >= 500:
                    run.errors_5xx.append((time.monotonic() - run.t0, r.status_code, "stream"))
                    await asyncio.sleep(1)
                    continue
                text = (await r.aread()).decode()
        except Exception:  # noqa: BLE001 - a lost connection: sent again
            run.errors_5xx.append((time.monotonic() - run.t0, 0, "stream"))
            await asyncio.sleep(1)
            continue
        done = [line for line in text.split("\n\n") if line.startswith("event: done")]
        if done:
            run.latencies.append(time.monotonic() - t)
            answer = json.loads(done[0].split("data: ", 1)[1])
            run.answered[answer["request_id"]] = key["Idempotency-Key"]
            return
        said = [line for line in text.split("\n\n") if line.startswith("event: error")]
        run.errors_5xx.append((time.monotonic() - run.t0, 200, f"stream error event: {said[:1]}"[:200]))
        await asyncio.sleep(1)
    run.unexpected.append("stream: never done")


def backend_processes(front_pid: int) -> list:
    """Every process under the front: the backend's BentoML server and its API workers."""
    import psutil

    return psutil.Process(front_pid).children(recursive=True)


def kill_backend(front_pid: int) -> int:
    """SIGKILL every process of the current backend (as a crash would)."""
    procs = backend_processes(front_pid)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - already gone
            pass
    return len(procs)


def wait_ready(url: str, timeout: float = 300) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready within {timeout:g} s")


def faults(run: Run, server, pg: dict, pg_restart, minutes: float, events: list) -> None:
    """The run's faults at fixed fractions of it, each with its window [start, end] in seconds from the start."""
    import httpx

    total = minutes * 60
    plan = [(0.15, "kill"), (0.35, "postgres"), (0.55, "deploy"), (0.75, "kill")]
    for at, what in plan:
        time.sleep(max(0.0, run.t0 + at * total - time.monotonic()))
        start = time.monotonic() - run.t0
        if what == "kill":
            n = kill_backend(server.proc.pid)
            time.sleep(3)  # the front notices within serving.follow_s
            wait_ready(server.url)
            detail = f"SIGKILL to {n} backend processes; a new backend ready"
        elif what == "postgres":
            pg_restart()
            detail = "PostgreSQL stopped (fast) and started again"
        else:
            switches = server.log.read_text(errors="replace").count("  stopped ")
            out = subprocess.run(
                [str(Path(sys.executable).parent / "drspot"), "deploy"], capture_output=True, text=True
            )
            detail = f"drspot deploy exit {out.returncode}"
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # the switch: the front serves the new Bento, the old one is stopped
                if server.log.read_text(errors="replace").count("  stopped ") > switches:
                    break
                time.sleep(1)
            now = httpx.get(f"{server.url}/readyz", timeout=5).json().get("bento_models")
            detail += f"; the front switched to {now}"
        events.append(
            {"what": what, "start_s": round(start, 1), "end_s": round(time.monotonic() - run.t0, 1), "detail": detail}
        )
        print(f"  [{start:6.1f} s] {what}: {detail}", flush=True)


def logged(url: str) -> tuple[list[tuple[str, str | None]], list[str | None]]:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.connect() as c:
        preds = [tuple(r) for r in c.execute(text("SELECT request_id, idempotency_key FROM predictions"))]
        fb = [r[0] for r in c.execute(text("SELECT idempotency_key FROM feedback"))]
    eng.dispose()
    return preds, fb


def summarise(run: Run, preds, fb, events, peak: int, minutes: float, concurrency: int) -> dict:
    ids = {rid for rid, _ in preds}
    keys = [k for _, k in preds]
    answered = set(run.answered)
    windows = [(e["start_s"], e["end_s"] + FAULT_GRACE_S) for e in events if e["what"] in ("kill",)]
    outside = [e for e in run.errors_5xx if not any(a <= e[0] <= b for a, b in windows)]
    lat = np.asarray(run.latencies) * 1000
    return {
        "minutes": minutes,
        "concurrency": concurrency,
        "requests": run.counts,
        "answered_200": len(answered),
        "rows_logged": len(preds),
        "lost": len(answered - ids),
        "duplicated": len(keys) - len(set(keys)),
        "logged_not_answered": len(ids - answered),
        "feedback_rows": len(fb),
        "feedback_duplicated": len(fb) - len(set(fb)),
        "errors_5xx": len(run.errors_5xx),
        "errors_5xx_outside_faults": len(outside),
        "errors_5xx_outside_detail": outside[:20],
        "retried_ok": run.retried_ok,
        "unexpected": run.unexpected[:20],
        "peak_rss_mib": round(peak / 2**20),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "events": events,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    from infra.net import free_port
    from infra.stack import start_postgres
    from serving.launch import Server

    cfg = load_config()
    imgs, bad = photos(24), bad_inputs()
    tmp = Path(tempfile.mkdtemp(prefix="drspot-soak-"))
    os.chmod(tmp, 0o755)  # as root the cluster runs as `postgres`, which must reach its folder
    port = free_port()
    pg = start_postgres(tmp / "pg", port, tmp / "pg.secret.json")

    def pg_restart() -> None:
        subprocess.run(pg["stop"], check=True, capture_output=True)
        time.sleep(2)
        pg.update(start_postgres(tmp / "pg", port, tmp / "pg.secret.json"))

    db = pg["url"].replace("postgresql://", "postgresql+psycopg://") + "/drspot"
    env = {
        **os.environ,
        "DRSPOT_DATABASE_URL": db,
        "DRSPOT_FEEDBACK_API_KEY": KEY,
        "DRSPOT_SET": "serving.store_images=true",
    }
    server = Server(env, tmp / "serve.log")
    print(
        f"soak: {args.minutes:g} min at concurrency {args.concurrency} against {server.url} "
        f"(profile {cfg.profile}, log on PostgreSQL :{port})",
        flush=True,
    )
    run, events = Run(), []
    memory = Memory(server.proc.pid)
    memory.start()
    hurt = threading.Thread(target=faults, args=(run, server, pg, pg_restart, args.minutes, events), daemon=True)
    try:
        end = time.monotonic() + args.minutes * 60
        hurt.start()

        async def clients():
            await asyncio.gather(*(client(run, server.url, imgs, bad, end, seed) for seed in range(args.concurrency)))

        asyncio.run(clients())
        hurt.join(timeout=600)
    finally:
        memory.done.set()
        server.stop()
    preds, fb = logged(db)
    subprocess.run(pg["stop"], capture_output=True)
    result = summarise(run, preds, fb, events, memory.peak, args.minutes, args.concurrency)
    (ROOT / "bench" / "results" / "soak.json").write_text(json.dumps(result, indent=2))
    print("\nmetric | value")
    for k in (
        "answered_200",
        "rows_logged",
        "lost",
        "duplicated",
        "logged_not_answered",
        "feedback_rows",
        "feedback_duplicated",
        "errors_5xx",
        "errors_5xx_outside_faults",
        "retried_ok",
        "peak_rss_mib",
        "p50_ms",
        "p99_ms",
    ):
        print(f"{k} | {result[k]}")
    print(f"requests | {result['requests']}")
    if result["unexpected"]:
        print(f"unexpected | {result['unexpected']}")
    ok = result["lost"] == 0 and result["duplicated"] == 0 and result["errors_5xx_outside_faults"] == 0
    print(
        f"required (lost 0, duplicated 0, 5xx only during the SIGKILLs, each retried to an answer): "
        f"{'met' if ok and not result['unexpected'] else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
