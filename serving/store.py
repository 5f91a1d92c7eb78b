"""The prediction log and clinician feedback, through SQLAlchemy: SQLite by default, PostgreSQL by URL.

Every prediction is a row: request id, time, image sha256, size, quality features, the
classifier's embedding (for drift monitoring), the outputs, model versions and the fallback flag.
Images themselves are kept, content addressed (``<images_dir>/<sha[:2]>/<sha>.<ext>``), only when
the ``serving.store_images`` consent setting is on. Feedback rows link a request to the label a
clinician confirmed; the retraining flywheel reads them.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from infra.config import Config
from infra.env import StateError, inside_code

metadata = MetaData()

predictions = Table(
    "predictions",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("image_sha256", String(64), nullable=False, index=True),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("format", String(16)),
    Column("quality", JSON, nullable=False),
    Column("embedding", JSON, nullable=False),
    Column("lesions", JSON, nullable=False),
    Column("label", String(32)),
    Column("confidence", Float),
    Column("malignant_probability", Float),
    Column("risk", String(16)),
    Column("fallback", Boolean, nullable=False),
    Column("fallback_reason", String(500)),
    Column("preprocess", String(32)),
    Column("classifier_version", String(128)),
    Column("detector_version", String(128)),
    Column("image_path", String(500)),
    # with `compare`: the class each preprocessing variant's answer named ({"none": "nv", "color_constancy": "mel"})
    Column("variants", JSON, nullable=True),
    # the client's Idempotency-Key header: a request sent again with it is answered under its first request id and
    # not logged twice (unique where given)
    Column("idempotency_key", String(128), nullable=True),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), ForeignKey("predictions.request_id"), nullable=False, index=True),
    Column("confirmed_label", String(32), nullable=False),
    Column("reviewer", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # the lesion box as the reviewer drew or confirmed it (normalised [x1, y1, x2, y2]); null = label only
    Column("box", JSON, nullable=True),
    Column("idempotency_key", String(128), nullable=True),
)

# patient fields a clinician entered for a report (serving/patient_report.py), kept only when the request gave the
# patient's consent; a prediction's report without consent prints them and stores nothing
patients = Table(
    "patients",
    metadata,
    Column("request_id", String(64), ForeignKey("predictions.request_id"), primary_key=True),
    Column("fields", JSON, nullable=False),
    Column("consented_at", DateTime(timezone=True), nullable=False),
)

# columns added after a log could have been created: (table, column, SQL type), added by _migrate when missing
ADDED = [
    ("feedback", "box", "JSON"),
    ("predictions", "variants", "JSON"),
    ("predictions", "idempotency_key", "VARCHAR(128)"),
    ("feedback", "idempotency_key", "VARCHAR(128)"),
]
# one row per idempotency key (several NULLs are allowed by SQLite and PostgreSQL alike)
KEYED = [Index(f"uq_{t.name}_idempotency_key", t.c.idempotency_key, unique=True) for t in (predictions, feedback)]


class KeyReused(ValueError):
    """An Idempotency-Key already used for a different request (another photo, another confirmation)."""


DB_ENV = "DRSPOT_DATABASE_URL"
CONNECT_TIMEOUT_S = 5  # a database that does not answer is reported within this, not waited on
WRITE_RETRY_S = 20  # a log write is tried again for this long while the database cannot be reached (a restart)


def database_url(cfg: Config) -> str:
    """``$DRSPOT_DATABASE_URL``, else ``serving.database_url``, else SQLite in the state home's ``.drspot/``."""
    return os.environ.get(DB_ENV) or cfg.serving.database_url or f"sqlite:///{cfg.runtime.predictions_db}"


def _setting(cfg: Config) -> str:
    """Which setting chose the database (for error messages)."""
    if os.environ.get(DB_ENV):
        return DB_ENV
    return (
        "serving.database_url" if cfg.serving.database_url else "DRSPOT_HOME (the log is <home>/.drspot/predictions.db)"
    )


def redact(url: str) -> str:
    """A database URL without its password (for /readyz, status lines and logs)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse: show only its scheme
        return url.split(":", 1)[0] + ":…"


def describe(cfg: Config) -> str:
    """Where predictions are logged: a file path for SQLite, else the URL without credentials."""
    url = database_url(cfg)
    return url[len("sqlite:///") :] if url.startswith("sqlite:///") else redact(url)


def check_log(cfg: Config) -> str:
    """Refuse, before any work, a prediction log or image store that would be lost or cannot be reached.

    Raises:
        StateError: the SQLite file or the images folder lies inside a Bento's or a package's own folder (a
            redeploy would strand it), or the database does not answer within ``CONNECT_TIMEOUT_S``; the
            message names the setting to change.
    """
    url = database_url(cfg)
    images = cfg.resolve(cfg.serving.images_dir)
    if url.startswith("sqlite:///") and inside_code(url[len("sqlite:///") :]):
        raise StateError(
            f"the prediction log {url[len('sqlite:///') :]} would sit inside this copy of the code (a Bento or a "
            f"package), which the next deploy replaces: set {_setting(cfg)} to a place outside it"
        )
    if inside_code(images):
        raise StateError(
            f"stored images would go to {images}, inside this copy of the code (a Bento or a package): "
            "set DRSPOT_HOME or serving.images_dir to a place outside it"
        )
    try:
        PredictionLog(url).engine.dispose()
    except Exception as e:  # noqa: BLE001 - any driver error: say which setting and why
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
        raise StateError(f"the prediction log at {redact(url)} ({_setting(cfg)}) cannot be used: {reason}") from None
    return url


def _private_dir(folder: Path) -> None:
    """``folder`` and the parents it needs, created owner-only (0700): stored photos are health data."""
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` at ``path``, owner-only, all or nothing: each writer its own temporary file (two identical uploads
    at once must not share one), synced, then renamed over; a rename that lands on the same content is success."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PredictionLog:
    def __init__(self, url: str, images_dir: Path | None = None) -> None:
        self.url = url
        if url.startswith("sqlite:///"):  # health data: the log and its WAL files are the owner's alone
            db = Path(url[len("sqlite:///") :])
            db.parent.mkdir(parents=True, exist_ok=True)
            if not db.exists():
                db.touch(mode=0o600)
            for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                if f.exists():
                    f.chmod(0o600)
        # a server that does not answer fails within CONNECT_TIMEOUT_S instead of hanging the caller
        args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") else {}
        self.engine = create_engine(url, pool_pre_ping=True, connect_args=args)
        if self.engine.dialect.name == "sqlite":

            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _):  # concurrent readers while the service writes; FKs enforced
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=5000")
                cur.close()

        metadata.create_all(self.engine)
        _migrate(self.engine)
        self.images_dir = images_dir

    @classmethod
    def from_config(cls, cfg: Config) -> PredictionLog:
        return cls(database_url(cfg), cfg.resolve(cfg.serving.images_dir))

    def store_image(self, sha256: str, data: bytes, fmt: str) -> str:
        """Content-addressed copy of an upload (written once); returns its path."""
        assert self.images_dir is not None
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}.get(fmt, "bin")
        path = self.images_dir / sha256[:2] / f"{sha256}.{ext}"
        if not path.is_file():
            _private_dir(self.images_dir)
            _private_dir(path.parent)
            _write_atomically(path, data)
        return str(path)

    def record_many(self, rows: list[dict[str, Any]]) -> list[str | Exception]:
        """Log predictions in one transaction (a group commit: the service's concurrent answers share one write and
        one sync of the log); per row, what :meth:`record` returns or raises. A transaction refused for a constraint
        (an idempotency key sent before) or for one bad row is done again row by row, so one row's answer never decides
        another's."""
        now = dt.datetime.now(dt.UTC)
        # every column in every row: a multi-row INSERT takes its columns from the first row and would drop the others'
        blank = dict.fromkeys(predictions.columns.keys())
        rows = [{**blank, "created_at": now, **row} for row in rows]
        try:
            self._insert(rows)
        except OperationalError as e:  # still out of reach after the retries: none is logged
            return [e] * len(rows)
        except Exception:  # noqa: BLE001 - a constraint (a key sent before) or one bad row: each row on its own
            out: list[str | Exception] = []
            for row in rows:
                try:
                    out.append(self.record(row))
                except Exception as e:  # noqa: BLE001 - this row's answer is this error, the others' their own
                    out.append(e)
            return out
        return [row["request_id"] for row in rows]

    def record(self, row: dict[str, Any]) -> str:
        """Log a prediction; returns the request id it is logged under: its own, or, for an ``idempotency_key``
        already logged with the same photo, the first request's (nothing is written twice).

        Raises:
            KeyReused: the key was logged with another photo.
        """
        row = {"created_at": dt.datetime.now(dt.UTC), **row}
        try:
            self._insert([row])
        except IntegrityError:
            first = self._keyed(predictions, row.get("idempotency_key"))
            if first is None:
                raise
            if first["image_sha256"] != row["image_sha256"]:
                raise KeyReused(
                    f"Idempotency-Key {row['idempotency_key']!r} was used for another photo (request "
                    f"{first['request_id']}): a new request needs a new key"
                ) from None
            return first["request_id"]
        return row["request_id"]

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        """``rows`` into the prediction log in one transaction, retried while the database is out of reach
        (:meth:`_retrying`); a retry after a connection that broke once the transaction had committed writes nothing."""
        tries = []

        def write() -> None:
            tries.append(1)
            if len(tries) > 1 and self.get(rows[0]["request_id"]) is not None:
                return  # the connection broke after an earlier try had committed: they are logged
            with self.engine.begin() as conn:
                conn.execute(insert(predictions), rows)

        self._retrying(write)

    @staticmethod
    def _retrying(write):
        """``write()``, tried again for up to :data:`WRITE_RETRY_S` while the database cannot be reached (a
        PostgreSQL restart, a locked SQLite file): a prediction is answered only once it is logged, so a short outage
        delays answers instead of failing them. Raises the last OperationalError after that."""
        deadline, delay = time.monotonic() + WRITE_RETRY_S, 0.2
        while True:
            try:
                return write()
            except OperationalError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _keyed(self, table: Table, key: str | None) -> dict[str, Any] | None:
        if key is None:
            return None
        with self.engine.connect() as conn:
            r = conn.execute(select(table).where(table.c.idempotency_key == key)).mappings().first()
        return dict(r) if r else None

    def get(self, request_id: str) -> dict[str, Any] | None:
        def read() -> dict[str, Any] | None:
            with self.engine.connect() as conn:
                r = conn.execute(select(predictions).where(predictions.c.request_id == request_id)).mappings().first()
            return dict(r) if r else None

        return self._retrying(read)  # a report or a confirmation during a database restart waits for it

    def rows(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The logged predictions of these request ids (those that exist), by id."""
        with self.engine.connect() as conn:
            found = conn.execute(select(predictions).where(predictions.c.request_id.in_(request_ids))).mappings()
            return {r["request_id"]: dict(r) for r in found}

    def keep_patient(self, request_id: str, fields: dict[str, str]) -> None:
        """Store a report's patient fields for a prediction (the caller has the patient's consent); replaces any."""
        from sqlalchemy import delete

        with self.engine.begin() as conn:
            conn.execute(delete(patients).where(patients.c.request_id == request_id))
            conn.execute(
                insert(patients).values(request_id=request_id, fields=fields, consented_at=dt.datetime.now(dt.UTC))
            )

    def patient(self, request_id: str) -> dict[str, str] | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(patients.c.fields).where(patients.c.request_id == request_id)).first()
        return dict(r[0]) if r else None

    def add_feedback(
        self, request_id: str, label: str, reviewer: str, box: list[float] | None = None, key: str | None = None
    ) -> tuple[int, bool]:
        """Record a confirmation; returns its id and whether it was recorded before under the same idempotency
        ``key`` (then nothing is written).

        Raises:
            KeyReused: the key was recorded with another confirmation.
        """
        values = {"request_id": request_id, "confirmed_label": label, "reviewer": reviewer, "box": box}

        def write() -> int:
            with self.engine.begin() as conn:
                res = conn.execute(
                    insert(feedback).values(**values, idempotency_key=key, created_at=dt.datetime.now(dt.UTC))
                )
                return int(res.inserted_primary_key[0])

        try:
            return self._retrying(write), False
        except IntegrityError:
            first = self._keyed(feedback, key)
            if first is None:
                raise
            if any(first[k] != v for k, v in values.items() if k != "box"):
                raise KeyReused(
                    f"Idempotency-Key {key!r} was used for another confirmation (feedback {first['id']}): a new "
                    "confirmation needs a new key"
                ) from None
            return int(first["id"]), True

    def unconfirmed(self, limit: int, since: dt.datetime | None = None) -> tuple[list[dict[str, Any]], int]:
        """The newest ``limit`` predictions (logged at or after ``since``, when given) nobody confirmed yet whose photo
        was stored (what a reviewer can see and the flywheel can use), and how many unconfirmed ones have no stored
        photo."""
        from sqlalchemy import func

        confirmed = select(feedback.c.request_id)
        open_ = predictions.c.request_id.not_in(confirmed)
        if since is not None:
            open_ = open_ & (predictions.c.created_at >= since)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(predictions)
                .where(open_, predictions.c.image_path.is_not(None))
                .order_by(predictions.c.created_at.desc())
                .limit(limit)
            ).mappings()
            rows = [dict(r) for r in rows]
            blind = conn.execute(
                select(func.count()).select_from(predictions).where(open_, predictions.c.image_path.is_(None))
            ).scalar_one()
        return rows, int(blind)

    def count(self, since: dt.datetime | None = None, after: bool = False) -> int:
        """How many predictions are logged (at or, with ``after``, strictly after ``since``, when given)."""
        from sqlalchemy import func

        q = select(func.count()).select_from(predictions)
        if since is not None:
            q = q.where(predictions.c.created_at > since if after else predictions.c.created_at >= since)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def window(self, since: dt.datetime | None = None, last: int | None = None) -> list[dict[str, Any]]:
        """Logged predictions, oldest first: those after ``since``, or the ``last`` N."""
        q = select(predictions)
        if since is not None:
            q = q.where(predictions.c.created_at >= since)
        q = q.order_by(predictions.c.created_at.desc())
        if last is not None:
            q = q.limit(last)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        return rows[::-1]

    def confirmed(self, since: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Feedback joined with its prediction (latest confirmation per request), oldest first."""
        q = select(
            feedback.c.id,
            feedback.c.request_id,
            feedback.c.confirmed_label,
            feedback.c.reviewer,
            feedback.c.created_at,
            feedback.c.box,
            predictions.c.image_sha256,
            predictions.c.image_path,
            predictions.c.lesions,
            predictions.c.label,
            predictions.c.risk,
            predictions.c.classifier_version,
            predictions.c.created_at.label("predicted_at"),
        ).join(predictions, predictions.c.request_id == feedback.c.request_id)
        if since is not None:
            q = q.where(feedback.c.created_at >= since)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(q.order_by(feedback.c.id)).mappings()]
        latest = {r["request_id"]: r for r in rows}
        return list(latest.values())


def _migrate(engine) -> None:
    """Add the nullable columns of :data:`ADDED` to a log created before them (rows keep null there)."""
    from sqlalchemy import inspect, text

    have = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in {t for t, _, _ in ADDED}}
    missing = [(t, c, kind) for t, c, kind in ADDED if c not in have[t]]
    if missing:
        with engine.begin() as conn:
            for t, c, kind in missing:
                conn.execute(text(f"ALTER TABLE {t} ADD COLUMN {c} {kind}"))
        for index in KEYED:
            index.create(engine, checkfirst=True)
