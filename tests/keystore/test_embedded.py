"""The embedded (standalone) key store: encryption at rest, split roles, tamper detection."""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from cloudconnector.errors import InvalidSpec, PermanentError
from cloudconnector.keystore.base import KeyMaterial, KeyReader, KeyWriter
from cloudconnector.keystore.embedded import EmbeddedKeyStore
from cloudconnector.keystore.envelope import MASTER_KEY_ENV
from cloudconnector.model import ObjectRef

ONE = ObjectRef("default", "device-one")
TWO = ObjectRef("default", "device-two")


@pytest.fixture
def store(tmp_path: Path) -> EmbeddedKeyStore:
    return EmbeddedKeyStore.open(tmp_path / "keys.db", key_file=tmp_path / "master.key", env={})


def key_body(material: KeyMaterial) -> list[bytes]:
    """Fragments that would reveal the key: PEM lines and the raw DER."""
    lines = material.private_key_pem.splitlines()[1:-1]
    der = base64.b64decode(b"".join(lines))
    return [*lines, der[:48], der[-48:]]


def db_bytes(directory: Path) -> bytes:
    """Everything SQLite keeps on disk: the database and any journal beside it."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.name.startswith("keys.db"))


def key_files(directory: Path) -> list[Path]:
    return list(directory.glob("*.key"))


async def test_round_trip_through_the_reader(store: EmbeddedKeyStore, material: KeyMaterial) -> None:
    info = await store.put(ONE, material, {"thumbprint": "aa"})
    assert (info.version, dict(info.metadata)) == (1, {"thumbprint": "aa"})
    assert await store.reader().get(ONE) == material
    bare = KeyMaterial(certificate_pem=material.certificate_pem, private_key_pem=material.private_key_pem)
    await store.put(TWO, bare, {})
    assert await store.reader().get(TWO) == bare


def test_roles_are_split(store: EmbeddedKeyStore) -> None:
    writer: KeyWriter = store
    reader: KeyReader = store.reader()
    assert not hasattr(writer, "get")
    assert not hasattr(reader, "put")
    assert not hasattr(reader, "delete")


async def test_describe_and_versions(store: EmbeddedKeyStore, material: KeyMaterial) -> None:
    assert await store.describe(ONE) is None
    await store.put(ONE, material, {"certificateId": "c1"})
    await store.put(ONE, material, {"certificateId": "c2"})
    info = await store.describe(ONE)
    assert info is not None
    assert info.version == 2
    assert dict(info.metadata) == {"certificateId": "c2"}
    assert info.location == "embedded:default/device-one"


async def test_the_file_holds_no_plaintext_secret(
    tmp_path: Path, store: EmbeddedKeyStore, material: KeyMaterial
) -> None:
    await store.put(ONE, material, {})
    await store.put(ONE, material, {})  # the replaced row must not linger either
    raw = db_bytes(tmp_path)
    assert material.certificate_pem.encode() in raw  # sanity: the grep does see stored text
    for fragment in key_body(material):
        assert fragment not in raw
    assert str(material.password).encode() not in raw
    assert b"PRIVATE KEY" not in raw


async def test_swapped_rows_are_detected(
    tmp_path: Path, store: EmbeddedKeyStore, material: KeyMaterial
) -> None:
    other = KeyMaterial(
        certificate_pem=material.certificate_pem, private_key_pem=b"another key", password="pw2"
    )
    await store.put(ONE, material, {})
    await store.put(TWO, other, {})
    with sqlite3.connect(tmp_path / "keys.db") as db:
        db.execute("UPDATE credentials SET name = 'swap' WHERE name = ?", (ONE.name,))
        db.execute("UPDATE credentials SET name = ? WHERE name = ?", (ONE.name, TWO.name))
        db.execute("UPDATE credentials SET name = ? WHERE name = 'swap'", (TWO.name,))
    for device in (ONE, TWO):
        with pytest.raises(PermanentError) as err:
            await store.reader().get(device)
        assert err.value.reason == "KeyStoreTampered"


async def test_moved_ciphertext_or_changed_certificate_is_detected(
    tmp_path: Path, store: EmbeddedKeyStore, material: KeyMaterial
) -> None:
    await store.put(ONE, material, {})
    await store.put(TWO, material, {})
    with sqlite3.connect(tmp_path / "keys.db") as db:
        # Device two's private key blob moved into device one's row (same data key column kept).
        db.execute(
            "UPDATE credentials SET private_key = (SELECT private_key FROM credentials WHERE name = ?) "
            "WHERE name = ?",
            (TWO.name, ONE.name),
        )
        db.execute("UPDATE credentials SET certificate = 'forged' WHERE name = ?", (TWO.name,))
    for device in (ONE, TWO):
        with pytest.raises(PermanentError) as err:
            await store.reader().get(device)
        assert err.value.reason == "KeyStoreTampered"


async def test_wrong_master_key_fails_cleanly(tmp_path: Path, material: KeyMaterial) -> None:
    store = EmbeddedKeyStore.open(tmp_path / "keys.db", key_file=tmp_path / "master.key", env={})
    await store.put(ONE, material, {})
    wrong = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(PermanentError) as err:
        EmbeddedKeyStore.open(tmp_path / "keys.db", env={MASTER_KEY_ENV: wrong})
    assert err.value.reason == "KeyStoreTampered"
    assert "master key" in str(err.value)
    assert wrong not in str(err.value)


async def test_delete_is_idempotent(store: EmbeddedKeyStore, material: KeyMaterial) -> None:
    await store.put(ONE, material, {})
    await store.put(TWO, material, {})
    await store.delete(ONE)
    await store.delete(ONE)
    assert await store.describe(ONE) is None
    with pytest.raises(KeyError):
        await store.reader().get(ONE)
    assert await store.reader().get(TWO) == material


async def test_deleted_keys_leave_no_bytes_behind(
    tmp_path: Path, store: EmbeddedKeyStore, material: KeyMaterial
) -> None:
    await store.put(ONE, material, {})
    with sqlite3.connect(tmp_path / "keys.db") as db:
        wrapped, sealed = db.execute("SELECT data_key, private_key FROM credentials").fetchone()
    await store.delete(ONE)
    raw = db_bytes(tmp_path)
    assert wrapped not in raw
    assert sealed not in raw


def test_master_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    EmbeddedKeyStore.open(tmp_path / "keys.db", key_file=tmp_path / "master.key", env={})
    key_file = tmp_path / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys.db").stat().st_mode) == 0o600
    first = key_file.read_bytes()
    EmbeddedKeyStore.open(tmp_path / "keys.db", key_file=key_file, env={})
    assert key_file.read_bytes() == first
    assert len(base64.b64decode(first)) == 32


def test_bad_master_key_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec):
        EmbeddedKeyStore.open(tmp_path / "a.db", env={MASTER_KEY_ENV: "c2hvcnQ="})
    with pytest.raises(InvalidSpec):
        EmbeddedKeyStore.open(tmp_path / "b.db", env={})
    loose = tmp_path / "loose.key"
    loose.write_text(base64.b64encode(os.urandom(32)).decode())
    loose.chmod(0o644)
    with pytest.raises(InvalidSpec):
        EmbeddedKeyStore.open(tmp_path / "c.db", key_file=loose, env={})


async def test_master_key_from_the_environment(tmp_path: Path, material: KeyMaterial) -> None:
    env = {MASTER_KEY_ENV: base64.b64encode(os.urandom(32)).decode()}
    store = EmbeddedKeyStore.open(tmp_path / "keys.db", env=env)
    await store.put(ONE, material, {})
    again = EmbeddedKeyStore.open(tmp_path / "keys.db", env=env)
    assert await again.reader().get(ONE) == material
    assert not key_files(tmp_path)


async def test_concurrent_writers_and_readers(store: EmbeddedKeyStore, material: KeyMaterial) -> None:
    devices = [ObjectRef("burst", f"dev-{i}") for i in range(30)]
    await asyncio.gather(*(store.put(d, material, {"n": d.name}) for d in devices))
    reader = store.reader()
    assert all(m == material for m in await asyncio.gather(*(reader.get(d) for d in devices)))
    infos = await asyncio.gather(*(store.describe(d) for d in devices))
    assert [i.metadata["n"] for i in infos if i] == [d.name for d in devices]


def db_fds(directory: Path) -> set[int]:
    """This process's descriptors open on the key store file: one per kept connection."""
    target = str(directory / "keys.db")
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                found.add(int(fd))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_connections_are_kept_not_opened_per_fetch(
    tmp_path: Path, store: EmbeddedKeyStore, material: KeyMaterial
) -> None:
    devices = [ObjectRef("kept", f"dev-{i}") for i in range(20)]
    await asyncio.gather(*(store.put(d, material, {}) for d in devices))
    reader = store.reader()
    await asyncio.gather(*(reader.get(d) for d in devices))
    open_after_warm_up = db_fds(tmp_path)
    assert open_after_warm_up  # kept open between operations
    for _ in range(5):
        got = await asyncio.gather(*(reader.get(d) for d in devices))
        assert all(m == material for m in got)
    await asyncio.gather(*(store.describe(d) for d in devices))
    assert db_fds(tmp_path) == open_after_warm_up  # 100 fetches later: the same connections
    store.close()
    assert db_fds(tmp_path) == set()
    assert await reader.get(devices[0]) == material  # and usable again after close()


async def test_fetch_waits_out_a_writer_holding_the_file(
    tmp_path: Path, store: EmbeddedKeyStore, material: KeyMaterial
) -> None:
    await store.put(ONE, material, {})
    other = sqlite3.connect(tmp_path / "keys.db", isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # as a writer mid-commit: no reader may look now
        fetch = asyncio.create_task(store.reader().get(ONE))
        await asyncio.sleep(0.3)
        assert not fetch.done()  # waiting for the lock (in a worker thread), not failed
        other.execute("ROLLBACK")
        assert await asyncio.wait_for(fetch, 10) == material
    finally:
        other.close()
