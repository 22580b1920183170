"""The projection store: a snapshot of a service's state and the stream
sequence it covers, in SQLite through SQLAlchemy.

On start a service loads its snapshot and replays the rest of the log; a
snapshot is written atomically (one transaction), so a crash leaves either
the old one or the new one, never half of each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    select,
)
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.engine import Engine

metadata = MetaData()

snapshots = Table(
    "snapshots",
    metadata,
    Column("service", String, primary_key=True),
    Column("sequence", Integer, nullable=False),
    Column("state_type", String, nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("events_handled", Integer, nullable=False),
    Column("saved_at", Float, nullable=False),
)


@dataclass(frozen=True)
class Snapshot:
    sequence: int
    state_type: str
    state: bytes
    events_handled: int


class ProjectionStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.engine: Engine = create_engine(f"sqlite:///{path}")
        event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    def load(self, service: str) -> Snapshot | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(snapshots).where(snapshots.c.service == service)).first()
        if row is None:
            return None
        return Snapshot(row.sequence, row.state_type, row.state, row.events_handled)

    def save(self, service: str, snap: Snapshot) -> None:
        values = {
            "service": service,
            "sequence": snap.sequence,
            "state_type": snap.state_type,
            "state": snap.state,
            "events_handled": snap.events_handled,
            "saved_at": time.time(),
        }
        stmt = insert(snapshots).values(**values)
        stmt = stmt.on_conflict_do_update(index_elements=["service"], set_=values)
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
