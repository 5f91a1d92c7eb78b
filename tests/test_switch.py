"""`drspot serve` follows `drspot deploy` without downtime (serving/serve.py), under load, for real: a new Bento
is started beside the old one, traffic moves once it is ready, the old one is drained and stopped; a Bento that
cannot start leaves the old one serving."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serving_fixtures import Server

pytestmark = pytest.mark.slow


def _load(url: str, photo: bytes, stop: threading.Event, answers: list, failures: list) -> None:
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            try:
                r = c.post(f"{url}/predict", files={"image": ("p.jpg", photo, "image/jpeg")})
                if r.status_code == 200:
                    answers.append((time.monotonic(), r.json()["models"]["classifier"]))
                else:
                    failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                failures.append(f"{type(e).__name__}: {e}")


def _wait_for(url: str, classifier: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
        if ready["models"]["classifier"] == classifier:
            return ready
        time.sleep(0.5)
    raise AssertionError(f"/readyz did not name {classifier} within {timeout} s")


def _bentos_running() -> set[str]:
    """The Bentos a backend process serves now (serving/backend.py's command line: ``... serve <bento> --host``)."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        words = proc.info["cmdline"] or []
        if any(w.endswith("serving/backend.py") for w in words) and "serve" in words:
            found.add(words[words.index("serve") + 1])
    return found


def test_a_new_champion_reaches_the_running_service_without_a_failed_request(deployed, monkeypatch, tmp_path):
    from components.model import registry
    from tests.serving_fixtures import drspot

    root, env = deployed["root"], deployed["env"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    state = root / ".drspot" / "deployed.json"
    before_state = state.read_text()
    old_bento = json.loads(before_state)["bento"]
    photo = sorted((root / "ds" / "images").glob("*.jpg"))[0].read_bytes()
    server = Server(env, tmp_path / "serve.log")
    old = httpx.get(f"{server.url}/readyz").json()["models"]["classifier"]
    champion = registry.champion(registry.CLASSIFIER)
    stop, answers, failures = threading.Event(), [], []
    threads = [threading.Thread(target=_load, args=(server.url, photo, stop, answers, failures)) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        # a promotion and a deploy, as a retrain does: deployed.json names a new Bento
        from infra.config import load_config

        tags = registry.lineage(load_config("test"), root / "prep" / "split" / "split.parquet", "v-switch")
        new_version = registry.register("classifier", root / "clf", {"macro_auc": 0.9}, tags, root / "eval")
        registry.set_champion(registry.CLASSIFIER, new_version)
        out = drspot("deploy", env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        new_bento = json.loads(state.read_text())["bento"]
        assert new_bento != old_bento
        new = f"drspot-classifier/{new_version}"
        switched_at = time.monotonic()
        ready = _wait_for(server.url, new)
        time.sleep(3)  # traffic keeps flowing after the switch
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    try:
        assert failures == [], failures[:5]
        seen = {v for _, v in answers}
        assert seen == {old, new}, seen  # every answer names one of the two versions, and both were seen
        assert any(t > switched_at and v == new for t, v in answers)
        assert ready["data_version"] == "v-switch"
        log = (tmp_path / "serve.log").read_text()
        assert f"switched to {new_bento}" in log and f"stopped {old_bento}" in log
        running = _bentos_running()
        assert new_bento in running and old_bento not in running, running  # the new one serves, the old one is gone
        assert len(answers) >= 10

        # a Bento that cannot start: the old one keeps serving, and says why in its log
        broken = tmp_path / "broken"
        import shutil

        shutil.copytree(root / "clf", broken)
        (broken / "model.pt").write_bytes(b"not weights" * 100)
        bad_version = registry.register("classifier", broken, {"macro_auc": 0.9}, tags, root / "eval")
        build = (
            "import json, components; from serving.deploy import to_bento_store, build_bento;"
            "from infra.config import load_config; cfg = load_config();"
            f"c, _ = to_bento_store('classifier', cfg, '{bad_version}'); d, _ = to_bento_store('detector', cfg);"
            f"refs = {{'classifier': 'x/{bad_version}', 'detector': 'y'}};"
            "print(build_bento({'classifier': c, 'detector': d}, refs))"
        )
        done = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        bad_bento = done.stdout.strip().splitlines()[-1]
        state.write_text(json.dumps({"bento": bad_bento}))
        deadline = time.monotonic() + 120
        while f"{bad_bento} did not start" not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        said = next(x for x in (tmp_path / "serve.log").read_text().splitlines() if f"{bad_bento} did not start" in x)
        assert "its startup failed: " in said and "Error" in said and f"still serving {new_bento}" in said
        assert "next try in 30 s" in said  # tried again with backoff, not given up on
        failed = httpx.get(f"{server.url}/readyz").json()["front"]["failed_bentos"][bad_bento]
        assert failed["attempts"] == 1 and 0 <= failed["next_try_in_s"] <= 30 and "startup failed" in failed["reason"]
        alerts = root / ".drspot" / "alerts.jsonl"
        deadline = time.monotonic() + 60  # raised from a thread of the front's
        while not (
            alerts.is_file() and any(bad_bento in x and '"serving"' in x for x in alerts.read_text().split("\n"))
        ):
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        r = httpx.post(f"{server.url}/predict", files={"image": ("p.jpg", photo, "image/jpeg")}, timeout=60)
        assert r.status_code == 200 and r.json()["models"]["classifier"] == new
        assert bad_bento not in _bentos_running()
    finally:
        server.stop()
        state.write_text(before_state)
        registry.set_champion(registry.CLASSIFIER, champion)
