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
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
)

from components.config import Config
from components.env import runtime_dir

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
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), ForeignKey("predictions.request_id"), nullable=False, index=True),
    Column("confirmed_label", String(32), nullable=False),
    Column("reviewer", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def database_url(cfg: Config) -> str:
    """``$DRSPOT_DATABASE_URL``, else ``serving.database_url``, else SQLite under ``.drspot/``."""
    return (
        os.environ.get("DRSPOT_DATABASE_URL")
        or cfg.serving.database_url
        or f"sqlite:///{runtime_dir() / 'predictions.db'}"
    )


class PredictionLog:
    def __init__(self, url: str, images_dir: Path | None = None) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":

            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _):  # concurrent readers while the service writes; FKs enforced
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=5000")
                cur.close()

        metadata.create_all(self.engine)
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
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(path)
        return str(path)

    def record(self, row: dict[str, Any]) -> None:
        row = {"created_at": dt.datetime.now(dt.UTC), **row}
        with self.engine.begin() as conn:
            conn.execute(insert(predictions).values(**row))

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(predictions).where(predictions.c.request_id == request_id)).mappings().first()
        return dict(r) if r else None

    def add_feedback(self, request_id: str, label: str, reviewer: str) -> int:
        with self.engine.begin() as conn:
            res = conn.execute(
                insert(feedback).values(
                    request_id=request_id,
                    confirmed_label=label,
                    reviewer=reviewer,
                    created_at=dt.datetime.now(dt.UTC),
                )
            )
            return int(res.inserted_primary_key[0])

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
            predictions.c.image_sha256,
            predictions.c.image_path,
            predictions.c.lesions,
        ).join(predictions, predictions.c.request_id == feedback.c.request_id)
        if since is not None:
            q = q.where(feedback.c.created_at >= since)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(q.order_by(feedback.c.id)).mappings()]
        latest = {r["request_id"]: r for r in rows}
        return list(latest.values())
