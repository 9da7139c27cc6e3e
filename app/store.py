"""The gallery's source of truth: subjects, faces, their embeddings and the original images, in one SQLite
file.

WAL mode lets the service read while a batch enrollment in another process writes, and every write is one
transaction committed (``synchronous=FULL``) before the caller hears "done", so a kill -9 loses nothing that
was acknowledged and leaves nothing half-written. Triggers append every insert, delete or re-embedding of a
face to the ``changes`` log; its highest ``seq`` is the store's *generation*, which the FAISS cache
(``app.index``) records and replays, so no code path (or process) can change faces without the cache noticing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import FaceNotFound, NameTaken, StorageUnavailable, StoreUnreadable, SubjectNotFound
from app.files import private_dir, private_file
from app.names import canonical_name

SCHEMA_VERSION = "1"
MAX_ROW_ID = 2**63 - 1  # SQLite integers are signed 64-bit: a larger id can name no row
log = logging.getLogger("visage.store")

# SQLite's primary result codes that say the disk or another process is in the way, not the statement
STORAGE_ERRORS = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL,
})
DAMAGE_ERRORS = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})  # the file itself is bad
PASSING_ERRORS = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL})
BUSY_TIMEOUT_S = 30.0
CLOSE_WAIT_S = 30.0  # how long close() waits for running transactions
_CHUNK = 900  # bound on "?" parameters per statement

TRIGGERS = [
    """CREATE TRIGGER IF NOT EXISTS faces_added AFTER INSERT ON faces
        BEGIN INSERT INTO changes (face_id, token) VALUES (NEW.id, lower(hex(randomblob(8)))); END""",
    """CREATE TRIGGER IF NOT EXISTS faces_changed AFTER UPDATE OF embedding, model_version ON faces
        BEGIN INSERT INTO changes (face_id, token) VALUES (NEW.id, lower(hex(randomblob(8)))); END""",
    """CREATE TRIGGER IF NOT EXISTS faces_removed AFTER DELETE ON faces
        BEGIN
            INSERT INTO changes (face_id, token) VALUES (OLD.id, lower(hex(randomblob(8))));
            DELETE FROM blobs WHERE sha256 = OLD.image_sha256
                AND NOT EXISTS (SELECT 1 FROM faces WHERE image_sha256 = OLD.image_sha256);
        END""",
]

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS subjects (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS blobs (
        sha256 TEXT PRIMARY KEY,
        data BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS faces (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        subject_id INTEGER NOT NULL REFERENCES subjects(id) ON DELETE CASCADE,
        embedding BLOB NOT NULL,
        model_version TEXT NOT NULL,
        image_sha256 TEXT NOT NULL,
        box TEXT NOT NULL,
        quality REAL NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (subject_id, image_sha256))""",
    "CREATE INDEX IF NOT EXISTS faces_by_version ON faces (model_version, id)",
    "CREATE INDEX IF NOT EXISTS faces_by_image ON faces (image_sha256)",
    # token: random per change, so the same seq in two histories of one database (a copy put back, then written
    # to) can be told apart by the index saved from the other (``Store.change_token``)
    "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, face_id INTEGER NOT NULL, token TEXT)",
    *TRIGGERS,
]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SubjectRef:
    """How a caller names a subject: by id (must exist) or by name (created on enrollment if new)."""

    id: int | None = None
    name: str | None = None

    def __str__(self) -> str:
        return f"id {self.id}" if self.id is not None else repr(self.name)


@dataclass(frozen=True)
class SubjectRow:
    id: int
    name: str
    metadata: dict[str, Any]
    created_at: str
    face_count: int = 0


@dataclass(frozen=True)
class FaceRow:
    id: int
    subject_id: int
    model_version: str
    image_sha256: str
    box: tuple[float, float, float, float]
    quality: float
    created_at: str
    has_image: bool = False


@dataclass(frozen=True)
class Changes:
    """What happened to faces between two generations: rows to (re-)add and ids to drop from the index."""

    generation: int
    ids: np.ndarray
    vectors: np.ndarray
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _vectors(blobs: Sequence[bytes], dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode embedding blobs into (keep mask, matrix); rows of the wrong length are skipped."""
    rows = [np.frombuffer(b, dtype=np.float32) for b in blobs]
    keep = np.array([dim is None or len(r) == dim for r in rows], dtype=bool)
    kept = [r for r, k in zip(rows, keep, strict=True) if k]
    width = dim if dim is not None else (len(kept[0]) if kept else 0)
    matrix = np.stack(kept).astype(np.float32) if kept else np.zeros((0, width), dtype=np.float32)
    return keep, matrix


def _chunks(seq: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(seq), _CHUNK):
        yield seq[start : start + _CHUNK]


def _face(row: sqlite3.Row) -> FaceRow:
    return FaceRow(
        id=row["id"],
        subject_id=row["subject_id"],
        model_version=row["model_version"],
        image_sha256=row["image_sha256"],
        box=tuple(json.loads(row["box"])),
        quality=row["quality"],
        created_at=row["created_at"],
        has_image=bool(row["has_image"]),
    )


def new_store_id() -> str:
    """Which database a saved index was built from. Ids and generations alone cannot tell two histories apart
    (a backup restored, faces enrolled, another backup restored: the same face ids, other vectors), so every
    database, and every backup copy of one, gets its own random id."""
    return uuid.uuid4().hex


def _subject(row: sqlite3.Row) -> SubjectRow:
    # (NaN or Infinity, which versions before session 13 accepted and stored, read as null: a response cannot hold them)
    metadata = json.loads(row["metadata"], parse_constant=lambda _: None)
    return SubjectRow(row["id"], row["name"], metadata, row["created_at"], row["face_count"])


_FACE_COLS = (
    "f.id, f.subject_id, f.model_version, f.image_sha256, f.box, f.quality, f.created_at, "
    "EXISTS (SELECT 1 FROM blobs b WHERE b.sha256 = f.image_sha256) AS has_image"
)
_SUBJECT_COLS = (
    "s.id, s.name, s.metadata, s.created_at, (SELECT COUNT(*) FROM faces f WHERE f.subject_id = s.id) AS face_count"
)


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    """``begin``, then COMMIT on success or ROLLBACK on any exception, unless SQLite already ended the transaction
    itself (it does on some errors: disk full, I/O), whose error is then the one to report."""
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")

_write_deadline: ContextVar[float | None] = ContextVar("visage_write_deadline", default=None)


def may_pass(exc: BaseException) -> bool:
    """Whether opening the store again later may work: another process's lock, a full disk. A folder where the file
    should be, a file the service may not write, a read-only disk: not until someone acts."""
    cause = exc.__cause__ if isinstance(exc, StorageUnavailable) else exc
    if isinstance(cause, sqlite3.Error):
        return (getattr(cause, "sqlite_errorcode", None) or 0) & 0xFF in PASSING_ERRORS
    if isinstance(cause, OSError):
        return cause.errno in {errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EBUSY}
    return isinstance(exc, StorageUnavailable)  # (this process's own writers held the lock: it passes)


def busy_deadline() -> float:
    """A busy timeout from now, on the ``time.monotonic`` clock."""
    return time.monotonic() + BUSY_TIMEOUT_S


@contextmanager
def write_deadline(at: float) -> Iterator[None]:
    """Every ``Store.write`` inside shares the deadline ``at`` (``busy_deadline()`` taken earlier) instead of a
    busy timeout each from its own start: a request that queued for its turn to write has spent part of its wait
    already."""
    token = _write_deadline.set(at)
    try:
        yield
    finally:
        _write_deadline.reset(token)


def _busy_timeout(conn: sqlite3.Connection, seconds: float) -> None:
    conn.execute(f"PRAGMA busy_timeout={max(1, int(seconds * 1000))}")


def _add_change_tokens(conn: sqlite3.Connection) -> None:
    """Once per database made before change tokens: the column, and triggers that fill it (older changes keep
    none: an index saved at one of them is checked as before, by store id, generation and ids)."""
    if any(row[1] == "token" for row in conn.execute("PRAGMA table_info(changes)")):
        return
    conn.execute("ALTER TABLE changes ADD COLUMN token TEXT")
    for name in ("faces_added", "faces_changed", "faces_removed"):
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    for statement in TRIGGERS:
        conn.execute(statement)


# the rule ``app.names.canonical_name`` applies; a new value brings the stored names to it once more
NAMES_RULE = "nfc-trimmed-invisible"


def _canonicalise_names(conn: sqlite3.Connection) -> None:
    """Once per rule and database: bring the names stored under an earlier rule (or before ``app.names``
    existed, kept as typed) to the form every lookup now uses, so a subject enrolled as NFD "José" is still found
    by name. A name whose canonical form is already taken by another subject is left as it is, and logged: rename
    or merge it by id."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'names'").fetchone()
    if row is not None and row[0] == NAMES_RULE:
        return
    for subject_id, name in conn.execute("SELECT id, name FROM subjects").fetchall():
        canonical = canonical_name(name)
        if canonical == name or not canonical:
            continue
        try:
            conn.execute("UPDATE subjects SET name = ? WHERE id = ?", (canonical, subject_id))
        except sqlite3.IntegrityError:
            log.warning("subject %d is named %r, which looks the same as another subject's name %r: it keeps its "
                        "name and is reachable by id (PATCH /subjects/%d to rename it)",
                        subject_id, name, canonical, subject_id)
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('names', ?)", (NAMES_RULE,))


class Store:
    """SQLite access: a pool of connections, one per concurrent transaction; one writer at a time (a lock
    in-process, SQLite's ``BEGIN IMMEDIATE`` across processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        private_file(private_dir(self.path.parent) / self.path.name)
        self._pool_lock = threading.Lock()
        self._returned = threading.Condition(self._pool_lock)  # a busy connection came back to the pool
        self._open: list[sqlite3.Connection] = []
        self._idle: list[sqlite3.Connection] = []
        self._write_lock = threading.Lock()
        self._held = threading.local()  # how many pooled connections this thread holds (close() waits for the rest)
        try:
            with self.write() as conn:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                )
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)", (new_store_id(),))
                _canonicalise_names(conn)
                _add_change_tokens(conn)
                self.store_id: str = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
        except StorageUnavailable:  # locked, read-only, disk full: the file itself is fine
            self.close()
            raise
        except (sqlite3.DatabaseError, StoreUnreadable) as exc:  # not a database, or a damaged one: say which file
            self.close()
            if isinstance(exc, sqlite3.OperationalError):  # (raised outside a write transaction)
                raise
            cause = exc.__cause__ if isinstance(exc, StoreUnreadable) else exc
            raise StoreUnreadable(
                f"{self.path} is not a usable SQLite database ({cause}); restore a backup (visage restore "
                "BACKUP), or move it away to start an empty gallery"
            ) from cause

    # -- connections and transactions ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        _busy_timeout(conn, BUSY_TIMEOUT_S)
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A pooled connection, held for one transaction. The pool grows to the peak number of concurrent
        transactions whatever threads run them: one connection per thread leaked a connection (two file
        handles) for every worker thread the server's thread pool retired."""
        with self._pool_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
            with self._pool_lock:
                self._open.append(conn)
        self._held.count = getattr(self._held, "count", 0) + 1
        usable = False
        try:
            yield conn
        finally:
            try:
                if conn.in_transaction:  # a failed COMMIT: never hand on a connection inside a transaction
                    conn.execute("ROLLBACK")
                usable = True
            except sqlite3.Error:  # the COMMIT's own error is the one on its way to the caller
                log.warning("ROLLBACK failed too: dropping the connection", exc_info=True)
            finally:
                self._held.count -= 1
                with self._pool_lock:
                    if conn in self._open:  # not closed meanwhile
                        if usable:
                            self._idle.append(conn)
                        else:  # its ROLLBACK failed too: it may still hold SQLite's write lock
                            self._open.remove(conn)
                            conn.close()
                        self._returned.notify_all()

    @property
    def open_connections(self) -> int:
        with self._pool_lock:
            return len(self._open)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every SELECT inside sees the same snapshot."""
        with self._unavailable_on_error("read", ""), self._connection() as conn, _transaction(conn, "BEGIN"):
            yield conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, committed (and synced) on success, rolled back on any exception. Disk full or
        read-only, I/O errors, the lock held past the busy timeout: ``StorageUnavailable``.

        One busy timeout in all, from the call (or from the caller's ``write_deadline``): this process's own
        writers queue on a lock first, and each used to start SQLite's full busy wait only once it had that lock,
        so behind another process's lock the n-th waiting write failed after n busy timeouts (a 32-deep queue:
        16 minutes)."""
        deadline = _write_deadline.get() or busy_deadline()
        with self._unavailable_on_error("written", "; nothing was stored"):
            if not self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise StorageUnavailable(
                    f"the gallery {self.path.name} could not be written (database is locked: waited "
                    f"{BUSY_TIMEOUT_S:g} s behind this worker's other writes); nothing was stored"
                )
            try:
                with self._connection() as conn:
                    _busy_timeout(conn, deadline - time.monotonic())  # what is left of this write's wait
                    try:
                        with _transaction(conn, "BEGIN IMMEDIATE"):
                            _busy_timeout(conn, BUSY_TIMEOUT_S)
                            yield conn
                    finally:
                        _busy_timeout(conn, BUSY_TIMEOUT_S)  # (after a BEGIN that timed out too: pooled connection)
            finally:
                self._write_lock.release()

    @contextmanager
    def _unavailable_on_error(self, verb: str, consequence: str) -> Iterator[None]:
        """The disk's or another process's errors, not the request's, become a 503 the client may retry, naming
        the cause. Others (SQLITE_ERROR: a statement this code got wrong) stay what they are: a bug, a 500."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF not in STORAGE_ERRORS:
                raise
            raise StorageUnavailable(f"the gallery {self.path.name} could not be {verb} ({exc}){consequence}") from exc
        except sqlite3.DatabaseError as exc:  # damaged pages found past the open (a restore that kept an old -wal)
            if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF not in DAMAGE_ERRORS:
                raise
            raise StoreUnreadable(f"{self.path} is damaged ({exc}): stop the service and restore a backup "
                                  "(visage restore BACKUP; docs/SERVICE.md, Operations)") from exc

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Close every connection, after the transactions running in other threads end (up to ``wait_s``):
        closing a connection under a running transaction failed that request with a ProgrammingError. The
        store stays usable: a later transaction opens a new connection."""
        mine = getattr(self._held, "count", 0)  # a caller closing from inside a transaction: not waited for
        with self._pool_lock:
            if not self._returned.wait_for(lambda: len(self._open) - len(self._idle) <= mine, timeout=wait_s):
                log.warning("closing %s under %d running transaction(s) after %.0f s", self.path,
                            len(self._open) - len(self._idle), wait_s)
            for conn in self._open:
                conn.close()
            self._open.clear()
            self._idle.clear()

    # -- subjects --------------------------------------------------------------------------------------------

    def _find_subject(self, conn: sqlite3.Connection, ref: SubjectRef) -> SubjectRow | None:
        if ref.id is not None:
            row = conn.execute(f"SELECT {_SUBJECT_COLS} FROM subjects s WHERE s.id = ?", (ref.id,)).fetchone()
        else:
            row = conn.execute(f"SELECT {_SUBJECT_COLS} FROM subjects s WHERE s.name = ?", (ref.name,)).fetchone()
        return _subject(row) if row else None

    def _require_subject(self, conn: sqlite3.Connection, ref: SubjectRef) -> SubjectRow:
        subject = self._find_subject(conn, ref)
        if subject is None:
            raise SubjectNotFound(f"no subject {ref}")
        return subject

    def subject(self, ref: SubjectRef | int) -> SubjectRow:
        ref = SubjectRef(id=ref) if isinstance(ref, int) else ref
        with self.read() as conn:
            return self._require_subject(conn, ref)

    def subject_faces(self, subject_id: int) -> list[FaceRow]:
        with self.read() as conn:
            self._require_subject(conn, SubjectRef(id=subject_id))
            rows = conn.execute(
                f"SELECT {_FACE_COLS} FROM faces f WHERE f.subject_id = ? ORDER BY f.id", (subject_id,)
            ).fetchall()
        return [_face(r) for r in rows]

    def list_subjects(self, offset: int = 0, limit: int = 50, name: str | None = None) -> tuple[int, list[SubjectRow]]:
        """One page of subjects ordered by id, and the total; ``name`` filters by prefix."""
        where, params = ("WHERE s.name LIKE ? ESCAPE '\\'", [_like_prefix(name)]) if name else ("", [])
        with self.read() as conn:
            total = conn.execute(f"SELECT COUNT(*) FROM subjects s {where}", params).fetchone()[0]
            rows = conn.execute(
                f"SELECT {_SUBJECT_COLS} FROM subjects s {where} ORDER BY s.id LIMIT ? OFFSET ?",
                [*params, limit, offset],
            ).fetchall()
        return total, [_subject(r) for r in rows]

    def update_subject(
        self, subject_id: int, name: str | None = None, metadata: dict[str, Any] | None = None
    ) -> SubjectRow:
        with self.write() as conn:
            self._require_subject(conn, SubjectRef(id=subject_id))
            try:
                if name is not None:
                    conn.execute("UPDATE subjects SET name = ? WHERE id = ?", (name, subject_id))
            except sqlite3.IntegrityError as exc:
                raise NameTaken(f"another subject is already named {name!r}") from exc
            if metadata is not None:
                conn.execute("UPDATE subjects SET metadata = ? WHERE id = ?", (json.dumps(metadata), subject_id))
            return self._require_subject(conn, SubjectRef(id=subject_id))

    def delete_subject(self, subject_id: int) -> int:
        """Delete a subject and (by cascade, with their images) its faces; returns how many faces went."""
        with self.write() as conn:
            subject = self._require_subject(conn, SubjectRef(id=subject_id))
            conn.execute("DELETE FROM subjects WHERE id = ?", (subject_id,))
            return subject.face_count

    # -- faces -----------------------------------------------------------------------------------------------

    def find_face(self, ref: SubjectRef, image_sha256: str) -> tuple[FaceRow, SubjectRow] | None:
        """The face already enrolled from these exact image bytes for this subject, if any."""
        with self.read() as conn:
            subject = self._find_subject(conn, ref)
            if subject is None:
                if ref.id is not None:
                    raise SubjectNotFound(f"no subject {ref}")
                return None
            row = conn.execute(
                f"SELECT {_FACE_COLS} FROM faces f WHERE f.subject_id = ? AND f.image_sha256 = ?",
                (subject.id, image_sha256),
            ).fetchone()
        return (_face(row), subject) if row else None

    def add_face(
        self,
        ref: SubjectRef,
        image_sha256: str,
        image: bytes | None,
        embedding: np.ndarray,
        model_version: str,
        box: Sequence[float],
        quality: float,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[FaceRow, SubjectRow, bool]:
        """Store one face (and its image) in one transaction. Returns ``(face, subject, created)``; the same
        image for the same subject again returns the existing face with ``created=False``."""
        with self.write() as conn:
            subject = self._find_subject(conn, ref)
            if subject is None:
                if ref.id is not None:
                    raise SubjectNotFound(f"no subject {ref}")
                cur = conn.execute(
                    "INSERT INTO subjects (name, metadata, created_at) VALUES (?, ?, ?)",
                    (ref.name, json.dumps(metadata or {}), now()),
                )
                subject = SubjectRow(int(cur.lastrowid), str(ref.name), metadata or {}, now())
            existing = conn.execute(
                f"SELECT {_FACE_COLS} FROM faces f WHERE f.subject_id = ? AND f.image_sha256 = ?",
                (subject.id, image_sha256),
            ).fetchone()
            if existing:
                return _face(existing), subject, False
            if image is not None:
                conn.execute("INSERT OR IGNORE INTO blobs (sha256, data) VALUES (?, ?)", (image_sha256, image))
            box = [round(float(v), 1) for v in box]
            cur = conn.execute(
                "INSERT INTO faces (subject_id, embedding, model_version, image_sha256, box, quality, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    subject.id,
                    _to_blob(embedding),
                    model_version,
                    image_sha256,
                    json.dumps(box),
                    float(quality),
                    now(),
                ),
            )
            row = conn.execute(f"SELECT {_FACE_COLS} FROM faces f WHERE f.id = ?", (cur.lastrowid,)).fetchone()
            subject = self._require_subject(conn, SubjectRef(id=subject.id))
            return _face(row), subject, True

    def delete_face(self, face_id: int, subject_id: int | None = None) -> FaceRow:
        """Delete one face (its image too when no other face uses it); ``subject_id`` must own it if given."""
        with self.write() as conn:
            if subject_id is not None:
                self._require_subject(conn, SubjectRef(id=subject_id))
            row = conn.execute(f"SELECT {_FACE_COLS} FROM faces f WHERE f.id = ?", (face_id,)).fetchone()
            if row is None or (subject_id is not None and row["subject_id"] != subject_id):
                owner = f" of subject {subject_id}" if subject_id is not None else ""
                raise FaceNotFound(f"no face {face_id}{owner}")
            conn.execute("DELETE FROM faces WHERE id = ?", (face_id,))
            return _face(row)

    def subject_embeddings(self, subject_id: int, model_version: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(face ids, vectors) of one subject's faces made by ``model_version``."""
        with self.read() as conn:
            self._require_subject(conn, SubjectRef(id=subject_id))
            rows = conn.execute(
                "SELECT id, embedding FROM faces WHERE subject_id = ? AND model_version = ? ORDER BY id",
                (subject_id, model_version),
            ).fetchall()
        keep, matrix = _vectors([r["embedding"] for r in rows], dim)
        return np.array([r["id"] for r in rows], dtype=np.int64)[keep], matrix

    def face_subjects(self, face_ids: Sequence[int]) -> dict[int, tuple[int, str]]:
        """face id -> (subject id, subject name), for the ids that still exist."""
        out: dict[int, tuple[int, str]] = {}
        ids = sorted({int(i) for i in face_ids})
        with self.read() as conn:
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                for r in conn.execute(
                    f"SELECT f.id, s.id, s.name FROM faces f JOIN subjects s ON s.id = f.subject_id "
                    f"WHERE f.id IN ({marks})",
                    list(chunk),
                ):
                    out[r[0]] = (r[1], r[2])
        return out

    # -- what the index needs --------------------------------------------------------------------------------

    @staticmethod
    def _generation(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    def generation(self) -> int:
        """The change counter: it grows with every face added, deleted or re-embedded, by any process."""
        with self.read() as conn:
            return self._generation(conn)

    def snapshot(self, model_version: str, dim: int) -> Changes:
        """Every face of ``model_version`` and the generation they are current at."""
        with self.read() as conn:
            generation = self._generation(conn)
            rows = conn.execute(
                "SELECT id, embedding FROM faces WHERE model_version = ? ORDER BY id", (model_version,)
            ).fetchall()
        keep, matrix = _vectors([r["embedding"] for r in rows], dim)
        return Changes(generation, np.array([r["id"] for r in rows], dtype=np.int64)[keep], matrix)

    def changes_since(self, generation: int, model_version: str, dim: int) -> Changes:
        """Faces touched after ``generation``: the current-version ones to (re-)add, the rest to remove."""
        with self.read() as conn:
            now_gen = self._generation(conn)
            if now_gen == generation:
                return Changes(now_gen, np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
            touched = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT face_id FROM changes WHERE seq > ? AND seq <= ? ORDER BY face_id",
                    (generation, now_gen),
                )
            ]
            present: dict[int, bytes] = {}
            for chunk in _chunks(touched):
                marks = ",".join("?" * len(chunk))
                for r in conn.execute(
                    f"SELECT id, embedding FROM faces WHERE model_version = ? AND id IN ({marks})",
                    [model_version, *chunk],
                ):
                    present[r[0]] = r[1]
        ids = np.array(sorted(present), dtype=np.int64)
        keep, matrix = _vectors([present[int(i)] for i in ids], dim)
        removed = np.array([i for i in touched if i not in present], dtype=np.int64)
        # a row of the wrong width is dropped from the index rather than crashing the search
        return Changes(now_gen, ids[keep], matrix, np.concatenate([removed, ids[~keep]]))

    def change_token(self, generation: int) -> str | None:
        """The random token of change ``generation`` (None for 0, or a change made before tokens existed)."""
        with self.read() as conn:
            row = conn.execute("SELECT token FROM changes WHERE seq = ?", (generation,)).fetchone()
        return row[0] if row else None

    def current_ids(self, model_version: str, dim: int) -> tuple[int, np.ndarray]:
        """(generation, sorted ids of the ``model_version`` faces the index can hold), from one snapshot."""
        with self.read() as conn:
            generation = self._generation(conn)
            rows = conn.execute(
                "SELECT id FROM faces WHERE model_version = ? AND length(embedding) = ? ORDER BY id",
                (model_version, 4 * dim),
            )
            return generation, np.array([r[0] for r in rows], dtype=np.int64)

    def counts(self, model_version: str) -> dict[str, int]:
        with self.read() as conn:
            subjects = conn.execute("SELECT COUNT(*) FROM subjects").fetchone()[0]
            faces = conn.execute("SELECT COUNT(*) FROM faces").fetchone()[0]
            current = conn.execute("SELECT COUNT(*) FROM faces WHERE model_version = ?", (model_version,)).fetchone()[0]
        return {
            "subjects": subjects,
            "faces": faces,
            "current_faces": current,
            "stale_faces": faces - current,
        }

    def served_model_version(self) -> str | None:
        """The model version of the last service opened on this gallery (None before any): the version whose faces
        it searches, which a batch writer in another shell must embed with for its faces to be found."""
        with self.read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'served_model_version'").fetchone()
        return None if row is None else str(row[0])

    def set_served_model_version(self, model_version: str) -> None:
        with self.write() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('served_model_version', ?)",
                         (model_version,))

    # -- re-embedding ----------------------------------------------------------------------------------------

    def stale_faces(self, model_version: str, limit: int | None = None) -> list[FaceRow]:
        """Faces embedded by any other model version (with whether their original image is stored)."""
        sql = f"SELECT {_FACE_COLS} FROM faces f WHERE f.model_version != ? ORDER BY f.id"
        params: list[Any] = [model_version]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self.read() as conn:
            return [_face(r) for r in conn.execute(sql, params)]

    def image(self, image_sha256: str) -> bytes | None:
        with self.read() as conn:
            row = conn.execute("SELECT data FROM blobs WHERE sha256 = ?", (image_sha256,)).fetchone()
        return bytes(row[0]) if row else None

    def reembed_face(
        self,
        face_id: int,
        old_version: str,
        embedding: np.ndarray,
        model_version: str,
        box: Sequence[float],
        quality: float,
    ) -> bool:
        """Replace one face's embedding, unless it was deleted or re-embedded meanwhile (returns False
        then)."""
        box = [round(float(v), 1) for v in box]
        with self.write() as conn:
            cur = conn.execute(
                "UPDATE faces SET embedding = ?, model_version = ?, box = ?, quality = ? "
                "WHERE id = ? AND model_version = ?",
                (_to_blob(embedding), model_version, json.dumps(box), float(quality), face_id, old_version),
            )
            return cur.rowcount == 1


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
