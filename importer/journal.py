"""The durable journal: what was sent, what came back, in SQLite.

The journal is what makes a run safe to kill. It is written *before* a create
leaves (so a crash right after sending is remembered as "maybe created") and as
soon as anything is learned (image id, each status, the outcome). Each write is
one SQLite transaction in WAL mode: a ``kill -9`` at any instant leaves either
the state before the write or the state after it, never half of it.

Rows are keyed by the entry tag (see :mod:`importer.identity`), so one state file
can serve several manifests, and a rerun of a manifest finds its entries again.
Each row remembers the version its creates were for: a row of another version is
history. The journal is never the truth about the account (the set's listing is,
see :mod:`importer.converge`); it tells what a listing cannot: which creates may
have left unanswered, and the ids of images a listing may hide.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from importer.errors import StateFileError, StateLockedError

MEMORY = ":memory:"
#: A journal no other run will read, kept in a private temporary file that SQLite deletes
#: when it is closed: a run of 50,000 images without ``--state`` does not hold its rows
#: in memory (some 40 MB), only SQLite's page cache.
PRIVATE = ""
_SCHEMA_VERSION = 3
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
    version       TEXT,
    last_sent_at  REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deletions (
    image_id   INTEGER PRIMARY KEY,
    tag        TEXT NOT NULL,
    reason     TEXT NOT NULL,
    state      TEXT NOT NULL,
    error      TEXT,
    updated_at REAL,
    -- Whether a run's final report named it (a killed run's report never was).
    reported   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS deletions_by_tag ON deletions(tag);
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    ended       INTEGER NOT NULL DEFAULT 0,
    header      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_images (
    run_id      INTEGER NOT NULL,
    idx         INTEGER NOT NULL,
    image       TEXT NOT NULL,
    PRIMARY KEY (run_id, idx)
);
"""
#: Runs whose record is kept (``importer status`` shows the last one).
_RUNS_KEPT = 10
#: Schema 1 (before versions): its rows are keyed by tags of the URL-based identity,
#: which no entry has any more; they are kept, and never match.
#: Whether a create is for the row's version (a row without one, written by a test or
#: an older schema, is taken to be about it).
_SAME_VERSION = " COALESCE(version, excluded.version) IS excluded.version "
_MIGRATIONS = {
    1: "ALTER TABLE entries ADD COLUMN version TEXT",
    # Schema 3: when the latest create left, which reconciliation waits from.
    2: "ALTER TABLE entries ADD COLUMN last_sent_at REAL",
}
#: Transfers of an entry's image to its other regions, one row per (entry, region): the
#: last one sent. Added beside the entries (a state file without it gains it unchanged).
_TRANSFERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
    tag        TEXT NOT NULL,
    region     TEXT NOT NULL,
    image_id   INTEGER NOT NULL,
    action_id  INTEGER,
    state      TEXT NOT NULL,
    error      TEXT,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tag, region)
);
"""


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
    #: Whether the final report of a run named it.
    reported: bool = False


class TransferPhase(StrEnum):
    """Where the last transfer of an entry's image to one region stands."""

    #: About to leave, or left and its answer is not known: the copy may have started.
    SENDING = "sending"
    #: The API answered with an action id: the copy is under way.
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    #: The action errored, or the API refused the transfer; another may be sent.
    ERRORED = "errored"
    #: Given up for this run (see ``error``); the next run tries again.
    FAILED = "failed"

    @property
    def in_flight(self) -> bool:
        return self in (TransferPhase.SENDING, TransferPhase.IN_PROGRESS)


@dataclass(frozen=True)
class TransferState:
    """One row of the journal's transfers."""

    tag: str
    region: str
    image_id: int
    action_id: int | None
    phase: TransferPhase
    error: str | None
    #: When the transfer was sent (wall time).
    started_at: float


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
    #: The version tag of the source this row's creates were for
    #: (:func:`importer.identity.version_tag`); a row of another version is history.
    version: str | None = None
    #: When the latest create for this entry left (wall time): what reconciling
    #: an uncertain create waits from, across runs.
    last_sent_at: float | None = None


@dataclass(frozen=True)
class RunRecord:
    """What the journal holds of one run: its report as last recorded, in pieces."""

    run_id: int
    started_at: float
    #: When the run last recorded itself (wall time).
    updated_at: float
    #: Whether the run recorded its end; if not, it is still running, or was killed.
    ended: bool
    #: The report's JSON text without its images (the run's own fields).
    header: str
    #: Each image's JSON text, in manifest order.
    images: tuple[str, ...]


class Journal:
    """An open journal. Use as a context manager, or call :meth:`close`.

    ``read_only`` opens an existing journal to read it (``importer status``): no
    lock is taken, so it works while a run holds the state, and nothing is written.
    """

    def __init__(self, path: Path | str, *, read_only: bool = False) -> None:
        self.path = str(path)
        self._lock_fd: int | None = None
        if read_only:
            self._open_read_only()
            return
        if self.path not in (MEMORY, PRIVATE):
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
            self._db.executescript(_TRANSFERS_SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StateFileError(
                f"{self.path} is not a usable importer state file ({exc}); "
                "pass another --state path, or move this file away"
            ) from None

    def _open_read_only(self) -> None:
        if self.path in (MEMORY, PRIVATE) or not Path(self.path).is_file():
            raise StateFileError(
                f"there is no state file at {self.path}; pass --state the file a run was given"
            )
        try:
            uri = f"{Path(self.path).resolve().as_uri()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("SELECT count(*) FROM entries").fetchone()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StateFileError(
                f"{self.path} is not a usable importer state file ({exc}); "
                "pass --state the file a run was given"
            ) from None

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema', ?)", (str(_SCHEMA_VERSION),)
            )
        elif row["value"] != str(_SCHEMA_VERSION):
            found = int(row["value"]) if row["value"].isdigit() else -1
            if found not in _MIGRATIONS:
                raise sqlite3.DatabaseError(
                    f"schema version {row['value']}, expected {_SCHEMA_VERSION}"
                )
            for version in range(found, _SCHEMA_VERSION):
                self._db.execute(_MIGRATIONS[version])
            self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(_SCHEMA_VERSION),))

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
            version=row["version"],
            # A file of an older schema, read without being migrated (read_only).
            last_sent_at=row["last_sent_at"] if "last_sent_at" in row.keys() else None,  # noqa: SIM118 - sqlite3.Row
        )

    def deletions(self, tag: str) -> tuple[Deletion, ...]:
        """The images ``tag``'s entry set out to delete, by id."""
        try:
            rows = self._db.execute(
                "SELECT * FROM deletions WHERE tag = ? ORDER BY image_id", (tag,)
            ).fetchall()
        except sqlite3.OperationalError:  # an older file, read without being migrated
            return ()
        return tuple(
            Deletion(
                image_id=row["image_id"],
                tag=row["tag"],
                reason=row["reason"],
                state=DeletionState(row["state"]),
                error=row["error"],
                reported=bool(row["reported"]),
            )
            for row in rows
        )

    def unreported_deletions(self, tag: str) -> tuple[Deletion, ...]:
        """``tag``'s deletions that may have happened and no run's final report named yet."""
        return tuple(d for d in self.deletions(tag) if d.state.may_be_deleted and not d.reported)

    def changed_since(self, since: float) -> tuple[EntryState, ...]:
        """Rows written at or after ``since`` (wall time)."""
        rows = self._db.execute("SELECT tag FROM entries WHERE updated_at >= ?", (since,))
        states = (self.get(row["tag"]) for row in rows.fetchall())
        return tuple(state for state in states if state is not None)

    def last_run(self) -> RunRecord | None:
        """The latest run recorded in this journal, if any."""
        try:
            row = self._db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        except sqlite3.OperationalError:  # a state file from before runs were recorded
            return None
        if row is None:
            return None
        images = self._db.execute(
            "SELECT image FROM run_images WHERE run_id=? ORDER BY idx", (row["id"],)
        )
        return RunRecord(
            run_id=row["id"],
            started_at=row["started_at"],
            updated_at=row["updated_at"],
            ended=bool(row["ended"]),
            header=row["header"],
            images=tuple(image["image"] for image in images.fetchall()),
        )

    # -- writing --------------------------------------------------------------------

    def creating(
        self,
        tag: str,
        name: str,
        region: str,
        now: float,
        group: str | None = None,
        version: str | None = None,
    ) -> None:
        """A create for ``tag`` is about to leave: from here on it may exist.

        A row about another version is history: it starts afresh, and so do its
        deletions, but for those no report has named yet.
        """
        with self._transaction():
            self._db.execute(
                "DELETE FROM deletions WHERE tag=? AND reported=1 AND EXISTS (SELECT 1"
                " FROM entries WHERE tag=? AND version IS NOT NULL AND version IS NOT ?)",
                (tag, tag, version),
            )
            self._creating(tag, name, region, now, group, version)

    def _creating(
        self, tag: str, name: str, region: str, now: float, group: str | None, version: str | None
    ) -> None:
        self._db.execute(
            "INSERT INTO entries(tag, name, region, group_tag, phase, creates_sent,"  # noqa: S608 - constant SQL
            " first_sent_at, updated_at, version, last_sent_at)"
            " VALUES (?, ?, ?, ?, 'creating', 1, ?, ?, ?, ?)"
            " ON CONFLICT(tag) DO UPDATE SET phase='creating', image_id=NULL, status=NULL,"
            " outcome=NULL, error=NULL, finished_at=NULL,"
            " group_tag=COALESCE(excluded.group_tag, group_tag),"
            " creates_sent=CASE WHEN" + _SAME_VERSION + "THEN creates_sent+1 ELSE 1 END,"
            " uncertain=CASE WHEN" + _SAME_VERSION + "THEN uncertain ELSE 0 END,"
            " duplicates=CASE WHEN" + _SAME_VERSION + "THEN duplicates ELSE '[]' END,"
            " submitted_at=CASE WHEN" + _SAME_VERSION + "THEN submitted_at ELSE NULL END,"
            " first_sent_at=CASE WHEN" + _SAME_VERSION + "THEN"
            " COALESCE(first_sent_at, excluded.first_sent_at) ELSE excluded.first_sent_at END,"
            " version=excluded.version, updated_at=excluded.updated_at,"
            " last_sent_at=excluded.last_sent_at",
            (tag, name, region, group, now, now, version, now),
        )

    def watching(
        self,
        tag: str,
        name: str,
        region: str,
        image_id: int,
        status: str,
        *,
        submitted_at: float,
        now: float,
        group: str | None,
        version: str | None,
    ) -> None:
        """An image an earlier run created (found in the account) is watched as the entry's."""
        self._db.execute(
            "INSERT INTO entries(tag, name, region, group_tag, phase, image_id, status,"
            " submitted_at, updated_at, version) VALUES (?, ?, ?, ?, 'submitted', ?, ?, ?, ?, ?)"
            " ON CONFLICT(tag) DO UPDATE SET phase='submitted', image_id=excluded.image_id,"
            " status=excluded.status, outcome=NULL, error=NULL, finished_at=NULL,"
            " group_tag=COALESCE(excluded.group_tag, group_tag),"
            " submitted_at=excluded.submitted_at, version=excluded.version,"
            " updated_at=excluded.updated_at",
            (tag, name, region, group, image_id, status, submitted_at, now, version),
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
        with self._transaction():
            self._db.execute(
                "INSERT INTO deletions(image_id, tag, reason, state, error, updated_at)"
                " VALUES (?, ?, ?, 'sending', NULL, ?)"
                " ON CONFLICT(image_id) DO UPDATE SET state='sending', error=NULL,"
                " updated_at=excluded.updated_at",
                (image_id, tag, reason, now),
            )
            self._db.execute("UPDATE entries SET updated_at=? WHERE tag=?", (now, tag))

    def deletions_reported(self, image_ids: Iterable[int]) -> None:
        """A run's final report named these deletions."""
        with self._transaction():
            self._db.executemany(
                "UPDATE deletions SET reported=1 WHERE image_id=?", ((i,) for i in image_ids)
            )

    def deletion_result(
        self, image_id: int, state: DeletionState, now: float, error: str | None = None
    ) -> None:
        """What the API answered to the ``DELETE`` of ``image_id``."""
        with self._transaction():
            self._db.execute(
                "UPDATE deletions SET state=?, error=?, updated_at=? WHERE image_id=?",
                (state.value, error, now, image_id),
            )
            self._db.execute(
                "UPDATE entries SET updated_at=? WHERE tag=(SELECT tag FROM deletions"
                " WHERE image_id=?)",
                (now, image_id),
            )

    def finished(
        self,
        tag: str,
        name: str,
        region: str,
        outcome: str,
        error: str | None,
        now: float,
        *,
        image_id: int | None = None,
        version: str | None = None,
    ) -> None:
        """The entry's outcome; ``image_id``/``version`` fill a row this run had not written."""
        self._db.execute(
            "INSERT INTO entries(tag, name, region, phase, outcome, error, finished_at,"
            " updated_at, image_id, version) VALUES (?, ?, ?, 'finished', ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(tag) DO UPDATE SET phase='finished', outcome=excluded.outcome,"
            " error=excluded.error, finished_at=excluded.finished_at,"
            " image_id=COALESCE(excluded.image_id, image_id),"
            " version=COALESCE(excluded.version, version),"
            " updated_at=excluded.updated_at",
            (tag, name, region, outcome, error, now, now, image_id, version),
        )

    def run_started(self, header: str, images: Iterable[tuple[int, str]], now: float) -> int:
        """Record a run that starts: its report's own fields, and every image's row by index.

        Returns the run's id. Older runs beyond the last few are forgotten.
        """
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO runs(started_at, updated_at, header) VALUES (?, ?, ?)",
                (now, now, header),
            )
            run_id = cursor.lastrowid
            assert run_id is not None
            self._db.executemany(
                "INSERT INTO run_images(run_id, idx, image) VALUES (?, ?, ?)",
                ((run_id, index, image) for index, image in images),
            )
            self._db.execute("DELETE FROM runs WHERE id <= ?", (run_id - _RUNS_KEPT,))
            self._db.execute("DELETE FROM run_images WHERE run_id <= ?", (run_id - _RUNS_KEPT,))
        return run_id

    def run_recorded(
        self,
        run_id: int,
        header: str,
        images: Iterable[tuple[int, str]],
        now: float,
        *,
        ended: bool,
    ) -> None:
        """The run's own fields now, and the rows of the images that changed since the last record.

        One transaction: a reader sees the record before or after, never half of it.
        ``ended`` once the run is over.
        """
        with self._transaction():
            self._db.execute(
                "UPDATE runs SET header=?, updated_at=?, ended=? WHERE id=?",
                (header, now, int(ended), run_id),
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO run_images(run_id, idx, image) VALUES (?, ?, ?)",
                ((run_id, index, image) for index, image in images),
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _update(self, tag: str, now: float, assignments: str, *values: object) -> None:
        self._db.execute(
            f"UPDATE entries SET {assignments}, updated_at=? WHERE tag=?",  # noqa: S608 - constant SQL
            (*values, now, tag),
        )

    # -- transfers ------------------------------------------------------------------

    def transfer(self, tag: str, region: str) -> TransferState | None:
        """The last transfer of ``tag``'s image to ``region``, if any was journaled."""
        row = self._db.execute(
            "SELECT * FROM transfers WHERE tag=? AND region=?", (tag, region)
        ).fetchone()
        if row is None:
            return None
        return TransferState(
            tag=row["tag"],
            region=row["region"],
            image_id=row["image_id"],
            action_id=row["action_id"],
            phase=TransferPhase(row["state"]),
            error=row["error"],
            started_at=row["started_at"],
        )

    def transfer_sending(self, tag: str, region: str, image_id: int, now: float) -> None:
        """A transfer is about to leave: from now on the copy may be under way."""
        self._db.execute(
            "INSERT INTO transfers(tag, region, image_id, action_id, state, error, started_at,"
            " updated_at) VALUES (?, ?, ?, NULL, 'sending', NULL, ?, ?)"
            " ON CONFLICT(tag, region) DO UPDATE SET image_id=excluded.image_id,"
            " action_id=NULL, state='sending', error=NULL, started_at=excluded.started_at,"
            " updated_at=excluded.updated_at",
            (tag, region, image_id, now, now),
        )

    def transfer_not_sent(self, tag: str, region: str) -> None:
        """The transfer just journaled was certainly not processed (a 429, no connection)."""
        self._db.execute(
            "DELETE FROM transfers WHERE tag=? AND region=? AND state='sending'", (tag, region)
        )

    def transfer_started(self, tag: str, region: str, action_id: int, now: float) -> None:
        self._set_transfer(tag, region, now, "state='in-progress', action_id=?", action_id)

    def transfer_ended(
        self, tag: str, region: str, phase: TransferPhase, error: str | None, now: float
    ) -> None:
        self._set_transfer(tag, region, now, "state=?, error=?", phase.value, error)

    def _set_transfer(
        self, tag: str, region: str, now: float, assignments: str, *values: object
    ) -> None:
        self._db.execute(
            f"UPDATE transfers SET {assignments}, updated_at=? WHERE tag=? AND region=?",  # noqa: S608 - constant SQL
            (*values, now, tag, region),
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
