"""``run --watch`` learns of changes from file events and never re-reads an unchanged directory."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

from cloudconnector.model import ObjectRef
from cloudconnector.standalone import runner as runner_module
from cloudconnector.standalone.app import Standalone
from cloudconnector.standalone.watch import DirWatch, signature
from tests.standalone.conftest import Site

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


def ready(sa: Standalone) -> list[str]:
    return sorted(o.ref.name for o in sa.store.list("Device") if o.status.get("phase") == "Ready")


async def until_ready(sa: Standalone, names: list[str], limit: float = 30) -> None:
    async def poll() -> None:
        while ready(sa) != names:  # noqa: ASYNC110 - polling the store is the point
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), limit)


@linux_only
async def test_events_for_files_subdirectories_and_a_recreated_directory(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    watch = DirWatch(root, poll=3600)  # a poll this slow would never answer within the test
    watch.arm()
    try:
        assert watch.mode == "inotify"
        assert await watch.wait(0.2) is False  # nothing happened

        (root / "a.yaml").write_text("a: 1\n")
        assert await watch.wait(5) is True
        assert await watch.wait(0.2) is False  # the burst was taken as one change

        (root / "sub").mkdir()
        assert await watch.wait(5) is True
        (root / "sub" / "b.yaml").write_text("b: 1\n")  # in a directory made after arm()
        assert await watch.wait(5) is True

        shutil.rmtree(root)  # DIR itself goes: watch by polling until it is back
        assert await watch.wait(5) is True
        await watch.wait(0.2)
        assert watch.mode == "poll"
        root.mkdir()
        watch.arm()
        assert watch.mode == "inotify"
        (root / "c.yaml").write_text("c: 1\n")
        assert await watch.wait(5) is True
    finally:
        watch.close()


def test_signature_sees_rewrites_and_ignores_hidden_and_other_files(tmp_path: Path) -> None:
    (tmp_path / "devices.yaml").write_text("kind: Device\n")
    first = signature(tmp_path)
    (tmp_path / ".devices.yaml.swp").write_text("editor state")
    (tmp_path / "notes.txt").write_text("not a manifest")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.yaml").write_text("a: 1\n")
    assert signature(tmp_path) == first
    # Same size, new content, written aside and renamed as editors do: the inode moves.
    (tmp_path / "new.tmp").write_text("kind: Dewice\n")
    os.replace(tmp_path / "new.tmp", tmp_path / "devices.yaml")
    assert signature(tmp_path) != first
    assert signature(tmp_path / "missing") == ()


@linux_only
async def test_edit_applied_by_file_event_without_polling(site: Site, instance: Standalone) -> None:
    site.standard(1)
    watcher = asyncio.create_task(instance.runner.watch(interval=3600))
    try:
        await until_ready(instance, ["meter-0000"])
        site.write("devices.yaml", [site.device(0), site.device(1)])
        await until_ready(instance, ["meter-0000", "meter-0001"])  # long before any poll
    finally:
        watcher.cancel()


@linux_only
async def test_idle_passes_do_not_read_the_directory(
    site: Site, instance: Standalone, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runner_module, "IDLE_RECHECK", 0.2)
    site.standard(2)
    passes = 0
    reconcile = instance.runner.reconcile

    async def counted(snap: object = None) -> runner_module.PassResult:
        nonlocal passes
        passes += 1
        return await reconcile(snap)  # type: ignore[arg-type]

    monkeypatch.setattr(instance.runner, "reconcile", counted)
    watcher = asyncio.create_task(instance.runner.watch(interval=3600))
    try:
        await until_ready(instance, ["meter-0000", "meter-0001"])
        # Garbage of the same size, mtime put back: a pass that read the file would report it.
        path = site.manifests / "devices.yaml"
        st = path.stat()
        path.write_bytes(b"{" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        caplog.set_level(logging.ERROR, logger="cloudconnector")
        before = passes
        while passes < before + 5:  # noqa: ASYNC110 - waiting for the periodic passes to run
            await asyncio.sleep(0.05)
        assert not [r for r in caplog.records if "devices.yaml" in r.getMessage()]
        assert ready(instance) == ["meter-0000", "meter-0001"]
        # A real change is read, and its error named: the same file, now one byte longer.
        path.write_bytes(b"{" * (st.st_size + 1))
        while not [r for r in caplog.records if "devices.yaml" in r.getMessage()]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert ready(instance) == ["meter-0000", "meter-0001"]  # a bad file removes nothing
    finally:
        watcher.cancel()


@linux_only
async def test_proxy_directory_follows_edits_device_by_device(site: Site, instance: Standalone) -> None:
    site.standard(2)
    revoked: list[ObjectRef] = []
    instance.directory.subscribe(revoked.append)
    watcher = asyncio.create_task(instance.runner.watch(interval=3600))
    first, second, third = (ObjectRef(site.namespace, f"meter-{i:04d}") for i in range(3))

    async def routed(refs: set[ObjectRef]) -> None:
        while {r.device for r in instance.directory.routes()} != refs:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(routed({first, second}), 30)
        assert revoked == []
        site.write("devices.yaml", [site.device(1), site.device(2)])  # first out, third in
        await asyncio.wait_for(routed({second, third}), 30)
        assert revoked == [first]  # only the removed device's session is ended
        route = instance.directory.get(third)
        assert route is not None and instance.directory.by_iccid(route.iccid) == route
    finally:
        watcher.cancel()


@linux_only
async def test_a_failing_read_is_logged_and_the_watch_goes_on(
    site: Site, instance: Standalone, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    site.standard(1)
    real = runner_module.load_dir
    calls = 0

    def load_dir_failing_once(directory: Path) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:  # the read after the first edit: a bug in the reader
            raise RuntimeError("reader bug")
        return real(directory)

    monkeypatch.setattr(runner_module, "load_dir", load_dir_failing_once)
    watcher = asyncio.create_task(instance.runner.watch(interval=3600))
    try:
        await until_ready(instance, ["meter-0000"])
        site.write("devices.yaml", [site.device(0), site.device(1)])
        while calls < 2:  # noqa: ASYNC110 - waiting for the failing read
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert not watcher.done()
        assert ready(instance) == ["meter-0000"]  # the last good reading stays
        assert any("reader bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)
        site.write("devices.yaml", [site.device(0), site.device(1), site.device(2)])
        await until_ready(instance, ["meter-0000", "meter-0001", "meter-0002"])
    finally:
        watcher.cancel()
