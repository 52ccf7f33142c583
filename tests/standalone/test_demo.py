"""The README's demo, at a reduced size, exactly as a user runs it (a separate process)."""

from __future__ import annotations

import subprocess
import sys


def test_demo_passes_at_reduced_size(clean_env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cloudconnector.cli", "demo", "--devices", "5", "--messages", "3"],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "5/5 Ready" in out
    assert "15/15 at the broker" in out
    assert "15/15 messages entered the broker through their own device's certificate" in out
    assert "refused" in out and "p99" in out
    assert "0 things, 0 certificates, 0 devices left" in out
    assert "PRIVATE KEY" not in out + done.stderr
