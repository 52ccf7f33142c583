"""The orphan sweep says "Deleted orphaned certificate" once per certificate, however many
devices' sweeps find the same orphan at the same time."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.aws.conftest import Crash, Recorder, iot_inventory, make_device


async def test_each_orphan_is_reported_once(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    crashed = make_provisioner()
    devices = [make_device(namespace, i) for i in (1, 2, 3)]
    records = []
    for device in devices:  # each crashed after CreateKeysAndCertificate, its id never recorded
        rec = Recorder(crash_at=4, lose=True)  # 4th checkpoint: the certificate id
        with pytest.raises(Crash):
            await crashed.provision(device, {}, rec, keys)
        records.append(rec)
    orphans = set(iot_inventory(iot)["certs"])
    assert len(orphans) == 3

    caplog.set_level(logging.WARNING, logger="cloudconnector.clouds")
    restarted = make_provisioner()  # every resumed device sweeps a window that holds all three
    await asyncio.gather(
        *(restarted.provision(d, r.last, Recorder(), keys) for d, r in zip(devices, records, strict=True))
    )
    lines = [r.getMessage() for r in caplog.records if "orphaned certificate" in r.getMessage()]
    assert sorted(lines) == sorted(f"Deleted orphaned certificate {c[:16]}" for c in orphans)
    assert not orphans & set(iot_inventory(iot)["certs"])
