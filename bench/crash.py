"""Benchmark: crash consistency at full size (issue 7, item 2).

One command, prints results (not a test):
    python bench/crash.py [--devices 100] [--kills 20] [--rate 5] [--seed N]

The operator is SIGKILLed at random moments (1-3 s apart, from a printed seed) while it provisions
the fleet, and restarted each time; afterwards every thing, certificate and policy in moto and
every Vault record must belong to exactly one Device, and every Device must be Ready. The run is
the CI test tests/hardening/test_crash_consistency.py at a larger size, driven through pytest so
that it uses the very same fixtures (kmock API server, operator subprocess, moto, OpenBao) and the
same loop and audit (tests/hardening/crashloop.py).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rate", type=float, default=5.0, help="Endpoint devices per second")
    parser.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1 << 16))
    parser.add_argument("--settle", type=float, default=600.0, help="seconds allowed after the last kill")
    args = parser.parse_args()
    env = {
        **os.environ,
        "CLOUDCONNECTOR_CRASH_DEVICES": str(args.devices),
        "CLOUDCONNECTOR_CRASH_KILLS": str(args.kills),
        "CLOUDCONNECTOR_CRASH_RATE": str(args.rate),
        "CLOUDCONNECTOR_CRASH_SEED": str(args.seed),
        "CLOUDCONNECTOR_CRASH_SETTLE": str(args.settle),
    }
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-s",  # the run's report is printed by the test
        "-p",
        "no:cacheprovider",
        "-o",
        f"timeout={int(args.settle + 20 * args.kills + 300)}",
        "tests/hardening/test_crash_consistency.py",
        "-k",
        "random_kills",
    ]
    print(f"seed {args.seed}; replay with: python bench/crash.py --seed {args.seed}", flush=True)
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
