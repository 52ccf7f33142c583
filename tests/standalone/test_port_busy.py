"""A port another process holds is one clear line and exit code 2, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cloudconnector.errors import PermanentError
from cloudconnector.proxy.directory import StaticDirectory
from cloudconnector.standalone.keys import open_key_stores
from cloudconnector.standalone.serve import plain_proxy, proxy_server


@pytest.fixture
def taken() -> object:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def test_proxy_start_names_the_address(tmp_path: Path, taken: int) -> None:
    keys = open_key_stores(tmp_path, env={})
    with pytest.raises(PermanentError, match=rf"cannot listen on 127\.0\.0\.1:{taken}: .*in use"):
        async with proxy_server(StaticDirectory(), keys.reader, plain_proxy("127.0.0.1", taken)):
            pass


def test_run_says_so_in_one_line(tmp_path: Path, taken: int, clean_env: dict[str, str]) -> None:
    (tmp_path / "site").mkdir()
    run = [sys.executable, "-m", "cloudconnector.cli", "run", "-f", str(tmp_path / "site")]
    done = subprocess.run(
        [*run, "--state", str(tmp_path / "state"), "--bind", "127.0.0.1", "--mqtt-port", str(taken)],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"run: cannot listen on 127.0.0.1:{taken}: Address already in use" in done.stderr.splitlines()
