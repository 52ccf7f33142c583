"""Session-wide real services. Each is started once per test run and shared; tests isolate
themselves by namespace, name prefix or a reset, never by mocking."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.kube import Kube, Unavailable, real_cluster, skip_or_fail
from tests.support.procs import Bao, Moto, run_bao, run_moto

# Proxies the tests start (cloud-connector run, cloud-connector-proxy) run as one process unless
# a test asks for workers: the default, the machine's cores, would differ from machine to machine.
os.environ.setdefault("CC_PROXY_WORKERS", "1")


@pytest.fixture(scope="session")
def bao() -> Iterator[Bao]:
    with run_bao() as server:
        yield server


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Moto]:
    with run_moto() as server:
        yield server


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    """A real kube-apiserver with the CRDs installed (tests/support/kube.py says where it comes
    from). Skipped with one line where none can be had, a failure under CI."""
    try:
        cluster = real_cluster()
        server = cluster.__enter__()
    except Unavailable as e:
        skip_or_fail(str(e))
        return
    try:
        yield server
    finally:
        cluster.__exit__(None, None, None)
