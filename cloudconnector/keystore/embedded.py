"""The embedded key store for standalone mode: one SQLite file, no Vault.

Keys are encrypted at rest with a key per device under a master key (see
:mod:`cloudconnector.keystore.envelope`): each row holds the certificate in clear, the device's
random AES-256-GCM data key wrapped by the master key, and the private key and MQTT password
sealed with that data key. Associated data binds every blob to its slot and field (and the private
key also to its certificate), so swapped or edited rows fail to decrypt rather than hand one
device another's key. Deleting a device deletes its wrapped data key; ``secure_delete`` makes
SQLite overwrite the freed bytes.

Connections are kept, one per thread (opening one costs far more than a fetch). The proxy's fetch
first tries on its own thread with no wait for locks, a point read of a few pages; only when a
writer holds the file does it go to a worker thread that waits for the lock.

Roles are split as with Vault: :class:`EmbeddedKeyStore` is the writer (put, describe, delete)
and has no ``get``; :meth:`EmbeddedKeyStore.reader` hands the in-process proxy a
:class:`EmbeddedKeyReader`. In one process this is an API boundary, not a security one: what it
buys is that no CLI or reconciler code path can print a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from cloudconnector.errors import PermanentError, TransientError, short
from cloudconnector.keystore.base import KeyMaterial, StoredInfo
from cloudconnector.keystore.envelope import load_master_key, new_key, seal, unseal
from cloudconnector.model import ObjectRef

log = logging.getLogger(__name__)
T = TypeVar("T")

_CHECK_PLAINTEXT = b"cloud-connector master key check"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    certificate TEXT NOT NULL,
    ca          TEXT,
    username    TEXT,
    data_key    BLOB NOT NULL,  -- the device's key, wrapped by the master key
    private_key BLOB NOT NULL,  -- nonce + AES-GCM ciphertext under the data key
    password    BLOB,
    metadata    TEXT NOT NULL,  -- JSON of non-secret facts
    PRIMARY KEY (namespace, name)
);
"""


def _aad(device: ObjectRef, field: str, extra: str = "") -> bytes:
    return f"cloud-connector/v1/{device.namespace}/{device.name}/{field}/{extra}".encode()


def _cert_digest(certificate_pem: str) -> str:
    return hashlib.sha256(certificate_pem.encode()).hexdigest()


class _Database:
    """The file, the master key, and the connection handling shared by both roles."""

    def __init__(self, path: Path, master_key: bytes) -> None:
        self.path = path
        self._master = master_key
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open_connections: list[sqlite3.Connection] = []
        if not path.exists():
            # Create it private before SQLite does; SQLite's own files inherit these permissions.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        with self.connect() as db:
            db.executescript(_SCHEMA)
            self._check_master_key(db)

    def _open(self, timeout: float) -> sqlite3.Connection:
        try:
            # Each connection stays on the thread that opened it; close() may come from another.
            db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False)
            db.execute("PRAGMA secure_delete = ON")  # deleted rows are overwritten, not just unlinked
        except sqlite3.Error as e:
            raise PermanentError(
                f"cannot open the key store {self.path}: {short(e)}", reason="KeyStore"
            ) from e
        with self._lock:
            self._open_connections.append(db)
        return db

    def _connection(self, slot: str, timeout: float) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, slot, None)
        if db is None:
            db = self._open(timeout)
            setattr(self._local, slot, db)
        return db

    def _forget(self, slot: str) -> None:
        """Drop this thread's connection after an error: the next use opens a fresh one."""
        db = getattr(self._local, slot, None)
        setattr(self._local, slot, None)
        if db is not None:
            with self._lock, contextlib.suppress(ValueError):
                self._open_connections.remove(db)
            with contextlib.suppress(sqlite3.Error):
                db.close()

    @contextlib.contextmanager
    def connect(self, slot: str = "db", timeout: float = 10.0) -> Iterator[sqlite3.Connection]:
        """This thread's connection, in one transaction: commit on success, roll back on error."""
        db = self._connection(slot, timeout)
        try:
            with db:
                yield db
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", None) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                self._forget(slot)  # a lock is worth waiting for; anything else, a fresh connection
            raise TransientError(f"key store {self.path} busy: {short(e)}", reason="KeyStoreBusy") from e
        except sqlite3.Error as e:
            self._forget(slot)
            raise PermanentError(f"key store {self.path} failed: {short(e)}", reason="KeyStore") from e

    def close(self) -> None:
        with self._lock:
            found, self._open_connections = self._open_connections, []
        for db in found:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self._local = threading.local()

    def _check_master_key(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT value FROM meta WHERE name = 'check'").fetchone()
        if row is None:
            db.execute(
                "INSERT INTO meta VALUES ('check', ?)", (seal(self._master, _CHECK_PLAINTEXT, b"check"),)
            )
            return
        # Fail at start-up, with one clear message, rather than on the first device.
        unseal(self._master, row[0], b"check", f"the master key check of {self.path}")

    def wrap(self, device: ObjectRef, data_key: bytes) -> bytes:
        return seal(self._master, data_key, _aad(device, "data_key"))

    def unwrap(self, device: ObjectRef, blob: bytes) -> bytes:
        return unseal(self._master, blob, _aad(device, "data_key"), f"the data key of {device}")

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def job() -> T:
            with self.connect() as db:
                return work(db)

        return await asyncio.to_thread(job)

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """A read on the caller's thread when no writer holds the file (its connection waits for
        no lock), else in a worker thread that waits as writes do."""
        try:
            with self.connect("now", timeout=0) as db:
                return work(db)
        except TransientError:  # locked by a writer right now
            return await self.run(work)

    def location(self, device: ObjectRef) -> str:
        return f"embedded:{device.namespace}/{device.name}"


class EmbeddedKeyStore:
    """The writer role: store, describe and delete; it cannot read a key back."""

    def __init__(self, path: Path, master_key: bytes) -> None:
        self._db = _Database(Path(path), master_key)

    @classmethod
    def open(
        cls, path: Path, key_file: Path | None = None, env: Mapping[str, str] | None = None
    ) -> EmbeddedKeyStore:
        """Open (or create) the store; the master key comes from the environment or ``key_file``."""
        return cls(Path(path), load_master_key(key_file, env))

    def __repr__(self) -> str:
        return f"<EmbeddedKeyStore {self._db.path}>"

    def reader(self) -> EmbeddedKeyReader:
        return EmbeddedKeyReader(self._db)

    def close(self) -> None:
        """Close the kept connections (the reader's too); the next use opens new ones."""
        self._db.close()

    async def put(self, device: ObjectRef, material: KeyMaterial, metadata: Mapping[str, str]) -> StoredInfo:
        data_key = new_key()
        cert_digest = _cert_digest(material.certificate_pem)
        private_key = seal(data_key, material.private_key_pem, _aad(device, "private_key", cert_digest))
        password = None
        if material.password is not None:
            password = seal(data_key, material.password.encode(), _aad(device, "password"))
        meta = {str(k): str(v) for k, v in metadata.items()}

        def write(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT version FROM credentials WHERE namespace = ? AND name = ?",
                (device.namespace, device.name),
            ).fetchone()
            version = (row[0] if row else 0) + 1
            db.execute(
                "INSERT OR REPLACE INTO credentials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device.namespace,
                    device.name,
                    version,
                    material.certificate_pem,
                    material.ca_pem,
                    material.username,
                    self._db.wrap(device, data_key),
                    private_key,
                    password,
                    json.dumps(meta, sort_keys=True),
                ),
            )
            return version

        version = await self._db.run(write)
        log.info("Stored credentials of %s in the embedded key store (version %d)", device, version)
        return StoredInfo(location=self._db.location(device), version=version, metadata=meta)

    async def describe(self, device: ObjectRef) -> StoredInfo | None:
        def read(db: sqlite3.Connection) -> Any:
            return db.execute(
                "SELECT version, metadata FROM credentials WHERE namespace = ? AND name = ?",
                (device.namespace, device.name),
            ).fetchone()

        row = await self._db.run(read)
        if row is None:
            return None
        return StoredInfo(
            location=self._db.location(device), version=int(row[0]), metadata=json.loads(row[1])
        )

    async def delete(self, device: ObjectRef) -> None:
        def remove(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM credentials WHERE namespace = ? AND name = ?", (device.namespace, device.name)
            )

        await self._db.run(remove)
        log.info("Deleted credentials of %s from the embedded key store", device)


class EmbeddedKeyReader:
    """The proxy's role: read and decrypt one device's credentials."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    def __repr__(self) -> str:
        return f"<EmbeddedKeyReader {self._db.path}>"

    async def get(self, device: ObjectRef, location: str | None = None) -> KeyMaterial:
        if location is not None and location != self._db.location(device):
            raise PermanentError(
                f"the key location of {device} is not this store's slot of that device",
                reason="KeyLocationInvalid",
            )

        def read(db: sqlite3.Connection) -> Any:
            # fetchall: the statement runs to its end, so the read lock is released right here.
            rows = db.execute(
                "SELECT certificate, ca, username, data_key, private_key, password FROM credentials "
                "WHERE namespace = ? AND name = ?",
                (device.namespace, device.name),
            ).fetchall()
            return rows[0] if rows else None

        row = await self._db.read(read)
        if row is None:
            raise KeyError(str(device))
        certificate, ca, username, wrapped, sealed_key, sealed_password = row
        data_key = self._db.unwrap(device, wrapped)
        aad = _aad(device, "private_key", _cert_digest(certificate))
        private_key = unseal(data_key, sealed_key, aad, f"the private key of {device}")
        password = None
        if sealed_password is not None:
            password = unseal(
                data_key, sealed_password, _aad(device, "password"), f"the password of {device}"
            )
        return KeyMaterial(
            certificate_pem=certificate,
            private_key_pem=private_key,
            ca_pem=ca,
            username=username,
            password=password.decode() if password is not None else None,
        )
