"""The standalone mode's replacement for the Kubernetes API: objects and their status in SQLite.

Without a cluster something must remember what was provisioned (the status with the provisioner's
resumable ``progress``) across restarts, and answer ``cloud-connector status`` like ``kubectl get``.
Each object keeps the manifest it was read from, a generation that moves only when its spec
changes (as the API server does), a uid, a creation time and its status. One connection, one
writer: every write is a single committed statement, so a process killed mid-way loses nothing
that was saved before.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudconnector.model import ObjectRef
from cloudconnector.vocabulary import ROTATE_ANNOTATION

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    created TEXT NOT NULL,
    source TEXT NOT NULL,
    manifest TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (kind, namespace, name)
);
CREATE TABLE IF NOT EXISTS connections (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    connection TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
)
"""
# Live connection status lives apart from ``objects.status``: the proxy writes it while the
# reconciler rewrites whole statuses, and neither may undo the other's writes.


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class StoredObject:
    """One object as the reconcilers see it: manifest with metadata filled in, plus status."""

    kind: str
    ref: ObjectRef
    source: str  # the file the manifest came from, for error messages and safe deletion
    body: Mapping[str, Any]  # apiVersion/kind/metadata/spec/status, like an API server object

    @property
    def status(self) -> Mapping[str, Any]:
        return self.body.get("status") or {}


class StateStore:
    """SQLite-backed objects + status; safe to share between the event loop and helper threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a killed process
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def apply(self, kind: str, manifest: Mapping[str, Any], source: str) -> StoredObject:
        """Create or update from a manifest; the generation moves only if the spec (or the
        rotate annotation, which the API server would not count) changed."""
        meta = manifest.get("metadata") or {}
        ref = ObjectRef(meta.get("namespace") or "default", meta["name"])
        with self._lock:
            row = self._row(kind, ref)
            if row is None:
                uid, generation, created, status = str(uuid.uuid4()), 1, _now(), "{}"
            else:
                old = json.loads(row["manifest"])
                uid, created, status = row["uid"], row["created"], row["status"]
                generation = int(row["generation"])
                if _spec_key(old) != _spec_key(manifest):
                    generation += 1
            body = dict(manifest)
            body["metadata"] = {
                **meta,
                "namespace": ref.namespace,
                "uid": uid,
                "generation": generation,
                "creationTimestamp": created,
            }
            body.pop("status", None)
            self._db.execute(
                "INSERT INTO objects"
                " (kind, namespace, name, uid, generation, created, source, manifest, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (kind, namespace, name) DO UPDATE SET"
                " generation = excluded.generation, source = excluded.source, manifest = excluded.manifest",
                (kind, ref.namespace, ref.name, uid, generation, created, source, json.dumps(body), status),
            )
        return self._object(kind, ref, source, body, json.loads(status))

    def get(self, kind: str, ref: ObjectRef) -> StoredObject | None:
        with self._lock:
            row = self._row(kind, ref)
        return None if row is None else self._from_row(row)

    def list(self, kind: str, namespace: str | None = None) -> list[StoredObject]:
        query = "SELECT * FROM objects WHERE kind = ?"
        args: tuple[str, ...] = (kind,)
        if namespace is not None:
            query += " AND namespace = ?"
            args += (namespace,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY namespace, name", args).fetchall()
        return [self._from_row(r) for r in rows]

    def set_status(self, kind: str, ref: ObjectRef, status: Mapping[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE objects SET status = ? WHERE kind = ? AND namespace = ? AND name = ?",
                (json.dumps(status), kind, ref.namespace, ref.name),
            )

    def delete(self, kind: str, ref: ObjectRef) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
                (kind, ref.namespace, ref.name),
            )
            if kind == "Device":
                self._db.execute(
                    "DELETE FROM connections WHERE namespace = ? AND name = ?", (ref.namespace, ref.name)
                )

    def set_connection(self, ref: ObjectRef, connection: Mapping[str, Any]) -> bool:
        """A Device's live connection (``status.connection``); False if the Device is gone."""
        with self._lock:
            if self._row("Device", ref) is None:
                return False
            self._db.execute(
                "INSERT INTO connections (namespace, name, connection) VALUES (?, ?, ?)"
                " ON CONFLICT (namespace, name) DO UPDATE SET connection = excluded.connection",
                (ref.namespace, ref.name, json.dumps(dict(connection))),
            )
        return True

    def connections(self) -> dict[ObjectRef, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT namespace, name, connection FROM connections").fetchall()
        return {ObjectRef(ns, name): json.loads(text) for ns, name, text in rows}

    def kinds(self) -> Iterator[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT kind FROM objects").fetchall()
        return iter(sorted(r[0] for r in rows))

    def _row(self, kind: str, ref: ObjectRef) -> sqlite3.Row | None:
        cur = self._db.execute(
            "SELECT * FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
            (kind, ref.namespace, ref.name),
        )
        cur.row_factory = sqlite3.Row
        row: sqlite3.Row | None = cur.fetchone()
        return row

    def _from_row(self, row: sqlite3.Row | tuple[Any, ...]) -> StoredObject:
        kind, namespace, name, _uid, _gen, _created, source, manifest, status = tuple(row)
        return self._object(
            kind, ObjectRef(namespace, name), source, json.loads(manifest), json.loads(status)
        )

    @staticmethod
    def _object(
        kind: str, ref: ObjectRef, source: str, body: Mapping[str, Any], status: Mapping[str, Any]
    ) -> StoredObject:
        full = dict(body)
        full["status"] = dict(status)
        return StoredObject(kind, ref, source, full)


def _spec_key(manifest: Mapping[str, Any]) -> str:
    annotations = (manifest.get("metadata") or {}).get("annotations") or {}
    return json.dumps([manifest.get("spec"), annotations.get(ROTATE_ANNOTATION)], sort_keys=True)
