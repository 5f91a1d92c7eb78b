"""The prediction log on both real databases: embedded SQLite and a throwaway PostgreSQL server."""

from __future__ import annotations

import datetime as dt
import glob
import os
import shutil
import subprocess
import time

import pytest
import sqlalchemy

from serving.launch import free_port
from serving.store import PredictionLog

PG_CTL: list[str] = []  # pg_ctl of the module's server, without its action (start / stop)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server in a temporary folder (Debian's binaries; `make test` installs them as root)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL server binaries are not installed (make test installs them with apt as root)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (dev extra)")
    bindir = os.path.dirname(found[-1])
    import tempfile

    # not under pytest's temporary folder: as root the server runs as `postgres`, which cannot enter it
    data = tempfile.mkdtemp(prefix="drspot-pg-")
    os.chmod(data, 0o755)
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run(
        [*as_user, f"{bindir}/initdb", "-D", f"{data}/db", "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, f"{bindir}/pg_ctl", "-D", f"{data}/db", "-o", opts, "-l", f"{data}/log", "-w", "start"],
        check=True,
        capture_output=True,
    )
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    PG_CTL[:] = [*as_user, f"{bindir}/pg_ctl", "-D", f"{data}/db", "-o", opts, "-l", f"{data}/log", "-w"]
    yield url
    subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", f"{data}/db", "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(data, ignore_errors=True)


def _row(rid: str, label: str = "nv") -> dict:
    return {
        "request_id": rid,
        "image_sha256": "ab" * 32,
        "width": 600,
        "height": 450,
        "format": "JPEG",
        "quality": {"blur": 120.5, "brightness": 0.5},
        "embedding": [0.1, -0.2, 0.3],
        "lesions": [{"box": None, "label": label}],
        "label": label,
        "confidence": 0.8,
        "malignant_probability": 0.1,
        "risk": "low",
        "fallback": True,
        "fallback_reason": "no lesion found",
        "preprocess": "none",
        "classifier_version": "drspot-classifier/1",
        "detector_version": "drspot-detector/1",
        "image_path": f"/images/{rid}.jpg",
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def log(request, tmp_path):
    if request.param == "sqlite":
        return PredictionLog(f"sqlite:///{tmp_path / 'log.db'}")
    url = request.getfixturevalue("postgres")
    store = PredictionLog(url)
    with store.engine.begin() as c:  # each test starts empty
        c.execute(sqlalchemy.text("TRUNCATE patients, feedback, predictions"))
    return store


def test_log_round_trip_window_and_feedback(log):
    for k in range(5):
        log.record(_row(f"r{k}"))
        time.sleep(0.01)
    got = log.get("r2")
    assert got["quality"] == {"blur": 120.5, "brightness": 0.5} and got["embedding"] == [0.1, -0.2, 0.3]
    assert got["fallback"] is True and isinstance(got["created_at"], dt.datetime)
    assert [r["request_id"] for r in log.window(last=3)] == ["r2", "r3", "r4"]  # the newest 3, oldest first
    assert len(log.window(since=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))) == 0
    log.add_feedback("r1", "mel", "dr.kim")
    log.add_feedback("r1", "bcc", "dr.lee")  # a later review wins
    log.add_feedback("r3", "nv", "dr.kim")
    confirmed = {c["request_id"]: c for c in log.confirmed()}
    assert confirmed["r1"]["confirmed_label"] == "bcc" and confirmed["r1"]["reviewer"] == "dr.lee"
    assert confirmed["r3"]["image_path"] == "/images/r3.jpg" and set(confirmed) == {"r1", "r3"}


def test_feedback_for_an_unknown_request_is_refused_by_the_database(log):
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        log.add_feedback("never-logged", "mel", "dr.kim")
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        log.record(_row("dup"))
        log.record(_row("dup"))  # a request id is logged once


def test_a_request_sent_again_with_its_idempotency_key_is_logged_once(log):
    """A client (or the front after a backend died) that sends a prediction or a confirmation again with the same
    Idempotency-Key gets the first one's id back and adds no row; the key reused for another photo or another
    confirmation is refused, naming the first request."""
    from serving.store import KeyReused

    assert log.record({**_row("a1"), "idempotency_key": "k-1"}) == "a1"
    assert log.record({**_row("a2"), "idempotency_key": "k-1"}) == "a1"  # the retry: logged under the first id
    assert log.record({**_row("a3"), "idempotency_key": None}) == "a3"
    assert log.record({**_row("a4"), "idempotency_key": None}) == "a4"  # no key: each is its own request
    with pytest.raises(KeyReused, match="used for another photo \\(request a1\\)"):
        log.record({**_row("a5"), "image_sha256": "cd" * 32, "idempotency_key": "k-1"})
    assert [r["request_id"] for r in log.window(last=10)] == ["a1", "a3", "a4"]
    first = log.add_feedback("a1", "mel", "dr.kim", key="f-1")
    assert first[1] is False and log.add_feedback("a1", "mel", "dr.kim", key="f-1") == (first[0], True)
    with pytest.raises(KeyReused, match="another confirmation"):
        log.add_feedback("a1", "bcc", "dr.kim", key="f-1")
    with log.engine.connect() as c:
        assert c.execute(sqlalchemy.text("SELECT count(*) FROM feedback")).scalar() == 1


def test_answers_finishing_together_are_logged_in_one_transaction_each_row_answered_for_itself(log):
    """The service's group commit: rows written together land together; a row whose Idempotency-Key was logged
    before gets the first request's id, one whose key was used for another photo its own error, and neither stops the
    other rows of its group from being logged."""
    from serving.store import KeyReused

    assert log.record_many([_row("g1"), _row("g2"), {**_row("g3"), "idempotency_key": "k-9"}]) == ["g1", "g2", "g3"]
    again = log.record_many(
        [
            _row("g4"),
            {**_row("g5"), "idempotency_key": "k-9"},  # a retry of g3
            {**_row("g6"), "image_sha256": "cd" * 32, "idempotency_key": "k-9"},  # the key for another photo
            _row("g7"),
        ]
    )
    assert again[0] == "g4" and again[1] == "g3" and again[3] == "g7", again
    assert isinstance(again[2], KeyReused) and "request g3" in str(again[2])
    assert sorted(r["request_id"] for r in log.window(last=10)) == ["g1", "g2", "g3", "g4", "g7"]
    bad = log.record_many([_row("g8"), {**_row("g9"), "quality": {"blur": object()}}])  # one bad row fails alone
    assert bad[0] == "g8" and isinstance(bad[1], Exception) and log.get("g9") is None
    assert log.get("g1")["created_at"] == log.get("g2")["created_at"]  # no time given: the transaction's


def test_a_database_restart_delays_a_write_instead_of_failing_it(postgres):
    """PostgreSQL stops under the running service and is back 2 s later: the prediction written meanwhile waits
    for it (serving/store.py retries while the server cannot be reached) and is logged once; nothing fails."""
    import threading

    log = PredictionLog(postgres)
    log.record(_row("before-restart"))
    subprocess.run([*PG_CTL, "-m", "fast", "stop"], check=True, capture_output=True)
    back = threading.Timer(2.0, lambda: subprocess.run([*PG_CTL, "start"], check=True, capture_output=True))
    back.start()
    t0 = time.monotonic()
    try:  # the service's group commit: the answers that finished together wait together, each logged once
        assert log.record_many([_row("during-restart"), _row("beside-it")]) == ["during-restart", "beside-it"]
    finally:
        back.join()
    waited = time.monotonic() - t0
    assert log.get("during-restart")["label"] == "nv" and 1.5 < waited < 20, waited
    assert set(log.rows(["before-restart", "during-restart", "beside-it"])) == {
        "before-restart",
        "during-restart",
        "beside-it",
    }


def test_identical_photos_stored_at_once_give_one_owner_only_file_and_no_failure(tmp_path):
    """16 writers of the same 8 MB photo at the same moment (two identical uploads with `store_images` on): each
    writes its own temporary file and renames it over, so none fails and one whole file remains, owner-only."""
    import hashlib
    import stat
    from concurrent.futures import ThreadPoolExecutor

    store = PredictionLog(f"sqlite:///{tmp_path / 'state' / 'log.db'}", tmp_path / "state" / "images")
    data = os.urandom(8 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    with ThreadPoolExecutor(16) as pool:
        paths = list(pool.map(lambda _: store.store_image(sha, data, "JPEG"), range(16)))
    assert len(set(paths)) == 1
    folder = tmp_path / "state" / "images" / sha[:2]
    assert [p.name for p in folder.iterdir()] == [f"{sha}.jpg"]  # no temporary file left
    stored = folder / f"{sha}.jpg"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == sha
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    for d in (folder, tmp_path / "state" / "images"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((tmp_path / "state" / "log.db").stat().st_mode) == 0o600  # the log is health data too


def test_a_log_written_before_the_variants_and_box_columns_imports_with_its_patients(tmp_path):
    """`drspot import-logs` (and so every `drspot deploy`) reads a log of an earlier schema: predictions without
    ``variants``, feedback without ``box``; its ``patients`` rows come along; a second import copies nothing."""
    import sqlite3

    from serving.log_import import import_log

    old = tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.executescript(
        """
        CREATE TABLE predictions (request_id VARCHAR(64) PRIMARY KEY, created_at DATETIME NOT NULL,
          image_sha256 VARCHAR(64) NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, format VARCHAR(16),
          quality JSON NOT NULL, embedding JSON NOT NULL, lesions JSON NOT NULL, label VARCHAR(32), confidence FLOAT,
          malignant_probability FLOAT, risk VARCHAR(16), fallback BOOLEAN NOT NULL, fallback_reason VARCHAR(500),
          preprocess VARCHAR(32), classifier_version VARCHAR(128), detector_version VARCHAR(128),
          image_path VARCHAR(500));
        CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id VARCHAR(64) NOT NULL,
          confirmed_label VARCHAR(32) NOT NULL, reviewer VARCHAR(200) NOT NULL, created_at DATETIME NOT NULL);
        CREATE TABLE patients (request_id VARCHAR(64) PRIMARY KEY, fields JSON NOT NULL,
          consented_at DATETIME NOT NULL);
        INSERT INTO predictions VALUES ('r-old', '2026-11-20 10:00:00', 'ab', 64, 48, 'JPEG', '{}', '[0.1]', '[]',
          'nv', 0.9, 0.1, 'low', 0, NULL, 'none', 'drspot-classifier/1', 'drspot-detector/1', NULL);
        INSERT INTO feedback (request_id, confirmed_label, reviewer, created_at)
          VALUES ('r-old', 'mel', 'dr.a', '2026-11-20 11:00:00');
        INSERT INTO patients VALUES ('r-old', '{"name": "A. Patient"}', '2026-11-20 10:05:00');
        """
    )
    con.commit()
    con.close()
    into = PredictionLog(f"sqlite:///{tmp_path / 'new.db'}", tmp_path / "images")
    counts = import_log(old, into)
    assert (counts["predictions"], counts["feedback"], counts["patients"]) == (1, 1, 1), counts
    row = into.get("r-old")
    assert row["label"] == "nv" and row["variants"] is None
    assert into.patient("r-old") == {"name": "A. Patient"}
    with into.engine.connect() as c:
        confirmed = c.execute(sqlalchemy.text("SELECT confirmed_label, box FROM feedback")).all()
    assert [tuple(r) for r in confirmed] == [("mel", None)]
    again = import_log(old, into)
    assert (again["predictions"], again["feedback"], again["patients"]) == (0, 0, 0)
    # the old log itself, opened by this version, gains the later columns and the idempotency keys' unique index
    reopened = PredictionLog(f"sqlite:///{old}")
    assert reopened.record({**_row("r-new"), "idempotency_key": "k"}) == "r-new"
    assert reopened.record({**_row("r-retry"), "idempotency_key": "k"}) == "r-new"
    assert (again["predictions_present"], again["feedback_present"], again["patients_present"]) == (1, 1, 1)
