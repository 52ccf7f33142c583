"""Session-wide real services. Each is started once per test run and shared; tests isolate
themselves by namespace, name prefix or a reset, never by mocking."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.procs import Bao, Moto, run_bao, run_moto


@pytest.fixture(scope="session")
def bao() -> Iterator[Bao]:
    with run_bao() as server:
        yield server


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Moto]:
    with run_moto() as server:
        yield server
