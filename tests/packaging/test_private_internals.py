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


def _without_internals(tmp_path: Path) -> dict[str, str]:
    """An environment whose pyOpenSSL is a look-alike with the public SSL module only: no
    OpenSSL._util, no Context._context."""
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
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}


def _one_line_refusal(args: list[str], tmp_path: Path, command: str) -> None:
    done = subprocess.run(
        [sys.executable, *args],
        env=_without_internals(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{command}: pyOpenSSL")
    assert "OpenSSL._util" in lines[0] and "cloud-connector[proxy]" in lines[0]


def test_proxy_refuses_to_start_on_a_pyopenssl_without_them(tmp_path: Path) -> None:
    _one_line_refusal(
        ["-m", "cloudconnector.proxy.main", "--tls-port", "0"], tmp_path, "cloud-connector-proxy"
    )


def test_run_refuses_to_serve_on_a_pyopenssl_without_them(tmp_path: Path) -> None:
    serve = "from cloudconnector.entry import cli; raise SystemExit(cli(['run', '-f', '.']))"
    _one_line_refusal(["-c", serve], tmp_path, "cloud-connector")
