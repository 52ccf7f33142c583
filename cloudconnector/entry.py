"""The console scripts: ``cloud-connector``, ``cloud-connector-operator``, ``cloud-connector-proxy``.

Each imports its component only when called, so that a component whose extra is not installed
ends with one line naming the extra (``pip install 'cloud-connector[operator]'``) instead of an
import traceback. An import failure of anything the extras do not provide is a bug and is raised
as it is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cloudconnector.extras import MissingExtra, extra_for, install_hint


def _guarded(command: str, main: Callable[[], Callable[..., Any]], argv: Sequence[str] | None) -> int:
    try:
        result = main()(argv)
    except ModuleNotFoundError as e:
        extra = extra_for(e)
        if extra is None:
            raise
        print(
            f"{command}: needs the {extra} extra ({e.name} is not installed): {install_hint(extra)}",
            file=sys.stderr,
        )
        return 2
    except MissingExtra as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


def cli(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)

    def load() -> Callable[..., Any]:
        if "run" in args and "--once" not in args:
            _proxy_self_check()  # `run` serves the proxy: the same check as cloud-connector-proxy's
        from cloudconnector.cli import main

        return main

    try:
        return _guarded("cloud-connector", load, args)
    except _Refused as e:
        print(f"cloud-connector: {e}", file=sys.stderr)
        return 2


class _Refused(Exception):
    """The installed pyOpenSSL lacks an internal the proxy uses (the message says which)."""


def _proxy_self_check() -> None:
    from cloudconnector.proxy.openssl_private import self_check

    missing = self_check()
    if missing is not None:
        raise _Refused(missing)


OPERATOR_HELP = """\
Runs the Cloud Connector operator (kopf) against the cluster that the in-cluster service account,
$KUBECONFIG or ~/.kube/config names (CLOUDCONNECTOR_K8S_SERVER overrides them). Settings are
environment variables: CLOUDCONNECTOR_* (see cloudconnector/operator/config.py) and VAULT_*.
"""


def operator(argv: Sequence[str] | None = None) -> int:
    # The operator takes no arguments; --help must work without the extra and without a cluster.
    argparse.ArgumentParser(prog="cloud-connector-operator", description=OPERATOR_HELP).parse_args(argv)

    def load() -> Callable[..., Any]:
        from cloudconnector.operator.main import main

        return main

    return _guarded("cloud-connector-operator", load, argv)


def proxy(argv: Sequence[str] | None = None) -> int:
    def load() -> Callable[..., Any]:
        from cloudconnector.proxy.main import main

        return main

    return _guarded("cloud-connector-proxy", load, argv)
