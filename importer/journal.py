"""The durable journal: what was sent, what came back, in SQLite.

The journal is what makes a run safe to kill. It is written *before* a create
leaves (so a crash right after sending is remembered as "maybe created") and as
soon as anything is learned (image id, each status, the outcome). Each write is
one SQLite transaction in WAL mode: a ``kill -9`` at any instant leaves either
the state before the write or the state after it, never half of it.

Rows are keyed by the entry tag (see :mod:`importer.plan`), so one state file
can serve several manifests, and a rerun of a manifest finds its entries again.

Deletions are journaled the same way: the intent before the ``DELETE`` leaves
(:meth:`Journal.deleting`), the result once it is known
(:meth:`Journal.deletion_result`), so that a kill while a ``DELETE`` is on the
wire still leaves its image id for the report.

One process at a time: :class:`Journal` holds an exclusive ``flock`` on
``<state>.lock`` for as long as it is open; the kernel releases it when the
process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from importer.errors import StateFileError, StateLockedError

MEMORY = ":memory:"
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    tag           TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    region        TEXT NOT NULL,
    group_tag     TEXT,
    phase         TEXT NOT NULL,
    image_id      INTEGER,
    status        TEXT,
    outcome       TEXT,
    error         TEXT,
    creates_sent  INTEGER NOT NULL DEFAULT 0,
    uncertain     INTEGER NOT NULL DEFAULT 0,
    duplicates    TEXT NOT NULL DEFAULT '[]',
    first_sent_at REAL,
    submitted_at  REAL,
    finished_at   REAL,
    updated_at    REAL,
    last_sent_at  REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deletions (
    image_id   INTEGER PRIMARY KEY,
    tag        TEXT NOT NULL,
    reason     TEXT NOT NULL,
    state      TEXT NOT NULL,
    error      TEXT,
    updated_at REAL
);
CREATE INDEX IF NOT EXISTS deletions_by_tag ON deletions(tag);
"""
#: Columns added since schema 1 without changing its meaning: added in place to an
#: older file (an older importer reading a newer file ignores them).
_ADDED_COLUMNS = {"last_sent_at": "REAL"}


class Phase(StrEnum):
    """Where an entry stands, as far as the journal knows."""

    #: A create is about to leave, or left and its answer is not known.
    CREATING = "creating"
    #: The API answered the create: the image id is known.
    SUBMITTED = "submitted"
    #: Nothing more will be done for this entry (see ``outcome``).
    FINISHED = "finished"


class DeletionState(StrEnum):
    """Where one ``DELETE`` of an image stands."""

    #: Journaled before the request left: the image may be deleted or not.
    SENDING = "sending"
    #: The API answered 204.
    DELETED = "deleted"
    #: The API answered 404: gone already (perhaps by an earlier attempt of ours).
    GONE = "gone"
    #: The API refused it (a 4xx such as 422 while the image still imports): not deleted.
    REFUSED = "refused"

    @property
    def may_be_deleted(self) -> bool:
        """Whether the image may be gone by our hand: the report must name it."""
        return self is not DeletionState.REFUSED


@dataclass(frozen=True)
class Deletion:
    """One image an entry set out to delete, and what became of the ``DELETE``."""

    image_id: int
    tag: str
    #: Why: ``duplicate`` (an extra copy made by a create whose answer was lost).
    reason: str
    state: DeletionState
    error: str | None


@dataclass(frozen=True)
class EntryState:
    """One row of the journal."""

    tag: str
    name: str
    region: str
    #: The group tag the entry's creates carried (group membership can shift
    #: between runs when the manifest grows; the image keeps its tag).
    group: str | None
    phase: Phase
    image_id: int | None
    status: str | None
    outcome: str | None
    error: str | None
    creates_sent: int
    uncertain: int
    #: Extra copies deleted, or being deleted (a ``DELETE`` journaled and not
    #: refused): every one the report must name.
    duplicates: tuple[int, ...]
    #: When the first create for this entry left (wall time): no image of the
    #: entry's created before then can be one of ours.
    first_sent_at: float | None
    submitted_at: float | None
    finished_at: float | None
    #: When the latest create for this entry left (wall time): what reconciling
    #: an uncertain create waits from, across runs.
    last_sent_at: float | None = None


class Journal:
    """An open journal. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock_fd: int | None = None
        if self.path != MEMORY:
            self._lock_fd = _lock(Path(self.path))
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against a killed process (the WAL is in the OS's
            # hands before commit returns); only a power cut can lose the last writes,
            # and reconciliation by tag covers those.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._check_version()
            self._add_columns()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StateFileError(
                f"{self.path} is not a usable importer state file ({exc}); "
                "pass another --state path, or move this file away"
            ) from None

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema', ?)", (str(_SCHEMA_VERSION),)
            )
        elif row["value"] != str(_SCHEMA_VERSION):
            raise sqlite3.DatabaseError(
                f"schema version {row['value']}, expected {_SCHEMA_VERSION}"
            )

    def _add_columns(self) -> None:
        present = {row["name"] for row in self._db.execute("PRAGMA table_info(entries)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE entries ADD COLUMN {name} {kind}")

    # -- reading --------------------------------------------------------------------

    def get(self, tag: str) -> EntryState | None:
        row = self._db.execute("SELECT * FROM entries WHERE tag = ?", (tag,)).fetchone()
        if row is None:
            return None
        named = {d.image_id for d in self.deletions(tag) if d.state.may_be_deleted}
        return EntryState(
            tag=row["tag"],
            name=row["name"],
            region=row["region"],
            group=row["group_tag"],
            phase=Phase(row["phase"]),
            image_id=row["image_id"],
            status=row["status"],
            outcome=row["outcome"],
            error=row["error"],
            creates_sent=row["creates_sent"],
            uncertain=row["uncertain"],
            duplicates=tuple(sorted({*json.loads(row["duplicates"]), *named})),
            first_sent_at=row["first_sent_at"],
            submitted_at=row["submitted_at"],
            finished_at=row["finished_at"],
            last_sent_at=row["last_sent_at"],
        )

    def deletions(self, tag: str) -> tuple[Deletion, ...]:
        """The images ``tag``'s entry set out to delete, by id."""
        rows = self._db.execute(
            "SELECT * FROM deletions WHERE tag = ? ORDER BY image_id", (tag,)
        ).fetchall()
        return tuple(
            Deletion(
                image_id=row["image_id"],
                tag=row["tag"],
                reason=row["reason"],
                state=DeletionState(row["state"]),
                error=row["error"],
            )
            for row in rows
        )

    # -- writing --------------------------------------------------------------------

    def creating(
        self, tag: str, name: str, region: str, now: float, group: str | None = None
    ) -> None:
        """A create for ``tag`` is about to leave: from here on it may exist."""
        self._db.execute(
            "INSERT INTO entries(tag, name, region, group_tag, phase, creates_sent,"
            " first_sent_at, last_sent_at, updated_at)"
            " VALUES (?, ?, ?, ?, 'creating', 1, ?, ?, ?)"
            " ON CONFLICT(tag) DO UPDATE SET phase='creating', image_id=NULL, status=NULL,"
            " outcome=NULL, error=NULL, creates_sent=creates_sent+1,"
            " group_tag=COALESCE(excluded.group_tag, group_tag),"
            " first_sent_at=COALESCE(first_sent_at, excluded.first_sent_at),"
            " last_sent_at=excluded.last_sent_at, updated_at=excluded.updated_at",
            (tag, name, region, group, now, now, now),
        )

    def not_sent(self, tag: str) -> None:
        """The create just recorded was certainly not processed (a 429, no connection).

        If nothing before it can have made an image either, the entry is as if
        never touched: a stop now must not leave it to be reconciled.
        """
        self._db.execute(
            "DELETE FROM entries WHERE tag=? AND phase='creating' AND uncertain=0",
            (tag,),
        )
        # Else an earlier create is still unaccounted for; this one is not.
        self._db.execute(
            "UPDATE entries SET creates_sent=creates_sent-1 WHERE tag=? AND creates_sent>0",
            (tag,),
        )

    def uncertain(self, tag: str, now: float) -> None:
        """The create's answer was lost: the image may or may not exist."""
        self._update(tag, now, "uncertain = uncertain + 1")

    def submitted(self, tag: str, image_id: int, status: str, now: float) -> None:
        self._update(
            tag,
            now,
            "phase='submitted', image_id=?, status=?, submitted_at=COALESCE(submitted_at, ?)",
            image_id,
            status,
            now,
        )

    def status(self, tag: str, status: str, now: float) -> None:
        self._update(tag, now, "status=?", status)

    def duplicates(self, tag: str, image_ids: tuple[int, ...], now: float) -> None:
        self._update(tag, now, "duplicates=?", json.dumps(sorted(image_ids)))

    def deleting(self, tag: str, image_id: int, now: float, reason: str = "duplicate") -> None:
        """A ``DELETE`` of ``image_id`` is about to leave: from here on it may be gone."""
        self._db.execute(
            "INSERT INTO deletions(image_id, tag, reason, state, error, updated_at)"
            " VALUES (?, ?, ?, 'sending', NULL, ?)"
            " ON CONFLICT(image_id) DO UPDATE SET state='sending', error=NULL,"
            " updated_at=excluded.updated_at",
            (image_id, tag, reason, now),
        )

    def deletion_result(
        self, image_id: int, state: DeletionState, now: float, error: str | None = None
    ) -> None:
        """What the API answered to the ``DELETE`` of ``image_id``."""
        self._db.execute(
            "UPDATE deletions SET state=?, error=?, updated_at=? WHERE image_id=?",
            (state.value, error, now, image_id),
        )

    def finished(
        self,
        tag: str,
        name: str,
        region: str,
        outcome: str,
        error: str | None,
        now: float,
    ) -> None:
        self._db.execute(
            "INSERT INTO entries(tag, name, region, phase, outcome, error, finished_at, updated_at)"
            " VALUES (?, ?, ?, 'finished', ?, ?, ?, ?)"
            " ON CONFLICT(tag) DO UPDATE SET phase='finished', outcome=excluded.outcome,"
            " error=excluded.error, finished_at=excluded.finished_at,"
            " updated_at=excluded.updated_at",
            (tag, name, region, outcome, error, now, now),
        )

    def _update(self, tag: str, now: float, assignments: str, *values: object) -> None:
        self._db.execute(
            f"UPDATE entries SET {assignments}, updated_at=? WHERE tag=?",  # noqa: S608 - constant SQL
            (*values, now, tag),
        )

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(AttributeError, sqlite3.Error):
            self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateFileError(
            f"cannot open the state lock {lock_path}: {exc.strerror or exc}; "
            "check the directory exists and is writable, or pass another --state"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateLockedError(
            f"another importer (pid {holder}) is using the state file {path}; "
            "wait for it to finish, or give this run another --state"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
