"""moto server whose AWS IoT CreateKeysAndCertificate draws its RSA-2048 key pairs from a pool
made at start-up, instead of generating one per call.

For benchmarks only: AWS makes those keys on its own machines, while moto spends more than half
of its CPU on them (see docs/benchmarks.md), which on a two-core machine competes with the
operator being measured. Certificates stay unique (random serial, own signature); only private
keys repeat across devices, which nothing in the operator or the proxy looks at.

    python bench/moto_pooled_keys.py [--keys 32] -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import itertools
import sys
import types
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa


def install(pool_size: int) -> None:
    import moto.iot.models as iot_models

    pool = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(pool_size)]
    keys = itertools.cycle(pool)

    def generate_private_key(*_: Any, **__: Any) -> rsa.RSAPrivateKey:
        return next(keys)

    shim = types.SimpleNamespace(generate_private_key=generate_private_key, RSAPrivateKey=rsa.RSAPrivateKey)
    iot_models.rsa = shim  # type: ignore[assignment]


def main(argv: list[str]) -> None:
    size = 32
    if argv[:1] == ["--keys"]:
        size, argv = int(argv[1]), argv[2:]
    install(size)
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
