"""The proxy's self-check of the private pyOpenSSL/asyncio internals it uses: silent with the
pinned pyOpenSSL, one clear line (and no start) with a pyOpenSSL that lacks them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cloudconnector.proxy.openssl_private import self_check

REPO = Path(__file__).resolve().parents[2]


def test_installed_pyopenssl_has_every_internal_the_proxy_uses() -> None:
    assert self_check() is None


def test_proxy_refuses_to_start_on_a_pyopenssl_without_them(tmp_path: Path) -> None:
    # A pyOpenSSL look-alike with the public SSL module only: no OpenSSL._util, no Context._context.
    fake = tmp_path / "OpenSSL"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "SSL.py").write_text(
        textwrap.dedent(
            """\
            class Context: ...
            class Connection: ...
            class Error(Exception): ...
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "cloudconnector.proxy.main", "--tls-port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cloud-connector-proxy: pyOpenSSL")
    assert "OpenSSL._util" in lines[0] and "cloud-connector[proxy]" in lines[0]
