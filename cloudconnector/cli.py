"""The ``cloud-connector`` command: run the standalone mode, show its status, or run the demo.

Deliberately, no subcommand prints or exports key material: keys go from the cloud into the key
store and from there only into the proxy's TLS handshakes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cloudconnector import api

DEFAULT_STATE = ".cloud-connector"
SWITCH_INTERVAL = 0.0005  # seconds; see _run


def _state_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("CLOUDCONNECTOR_STATE") or DEFAULT_STATE)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloud-connector", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="reconcile manifests from a directory and serve the proxy")
    run.add_argument("-f", "--filename", required=True, metavar="DIR", help="directory of YAML manifests")
    run.add_argument("--state", metavar="DIR", help=f"state directory (default {DEFAULT_STATE})")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="apply once, wait for retries, exit")
    mode.add_argument("--watch", action="store_true", help="keep running and re-apply on change (default)")
    run.add_argument(
        "--interval", type=float, default=2.0, help="seconds between checks of DIR without file events"
    )
    proxy = run.add_argument_group("proxy (also set by CC_PROXY_* variables, as for cloud-connector-proxy)")
    proxy.add_argument("--bind", help="listen address (default 0.0.0.0)")
    proxy.add_argument("--mqtt-port", type=int, help="plain MQTT port for devices (default 1883, 0: off)")
    proxy.add_argument("--tls-port", type=int, help="MQTT over TLS port (default off)")
    proxy.add_argument("--tls-cert-file", help="server certificate for the TLS port")
    proxy.add_argument("--tls-key-file", help="server key for the TLS port")
    proxy.add_argument("--http-port", type=int, help="/healthz, /readyz and /metrics port (default off)")
    proxy.add_argument("--workers", help="relaying processes on one port (default: the usable cores)")
    run.add_argument("--timeout", type=float, default=300.0, help="with --once: give up after seconds")

    status = sub.add_parser("status", help="show Endpoints, Groups and Devices like kubectl get")
    status.add_argument("--state", metavar="DIR", help=f"state directory (default {DEFAULT_STATE})")
    status.add_argument(
        "kind", nargs="?", default="devices", choices=["devices", "groups", "endpoints", "all"]
    )
    status.add_argument("-n", "--namespace", help="only this namespace (default: all)")

    demo = sub.add_parser("demo", help="provision simulated devices against local AWS stand-ins")
    demo.add_argument("--devices", type=int, default=50, help="number of simulated devices")
    demo.add_argument("--messages", type=int, default=5, help="messages per device")
    demo.add_argument("--keep", metavar="DIR", help="keep the demo's files in DIR")
    return parser


def _status(args: argparse.Namespace) -> int:
    from cloudconnector.standalone.store import StateStore
    from cloudconnector.standalone.table import render, with_connection

    path = _state_dir(args.state) / "state.db"
    if not path.exists():
        print(f"no state at {path}: run `cloud-connector run -f DIR` first", file=sys.stderr)
        return 1
    store = StateStore(path)
    try:
        kinds = {
            "devices": [api.KIND_DEVICE],
            "groups": [api.KIND_GROUP],
            "endpoints": [api.KIND_ENDPOINT],
            "all": [api.KIND_ENDPOINT, api.KIND_GROUP, api.KIND_DEVICE],
        }[args.kind]
        tables = []
        connections = store.connections()
        for kind in kinds:
            objects = store.list(kind, args.namespace)
            if kind == api.KIND_DEVICE:  # the proxy's live connection, kept apart from status
                objects = [with_connection(o, connections.get(o.ref)) for o in objects]
            namespaces = {o.ref.namespace for o in objects}
            if objects:
                tables.append(render(kind, objects, namespace_column=len(namespaces) > 1))
            elif len(kinds) == 1:
                tables.append(f"No {api.PLURALS[kind]} found.")
        print("\n\n".join(tables))
    finally:
        store.close()
    return 0


def _run(args: argparse.Namespace) -> int:
    from cloudconnector.standalone.serve import proxy_config, run_command

    names = ("bind", "mqtt_port", "tls_port", "tls_cert_file", "tls_key_file", "http_port", "workers")
    try:
        proxy = None if args.once else proxy_config(os.environ, {n: getattr(args, n) for n in names})
    except ValueError as e:
        print(f"run: {e}", file=sys.stderr)
        return 2
    if not args.once:
        # The proxy's loop shares the interpreter with the reconciler's worker threads (reading
        # DIR, the store): a thread must hand the GIL back within 0.5 ms, not Python's 5 ms.
        sys.setswitchinterval(SWITCH_INTERVAL)
    from cloudconnector.errors import ConnectorError

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(
                run_command(
                    Path(args.filename),
                    _state_dir(args.state),
                    once=args.once,
                    interval=args.interval,
                    proxy=proxy,
                    limit=args.timeout,
                )
            )
    except ConnectorError as e:  # at start-up: port taken, key store unreadable, ...
        print(f"run: {e}", file=sys.stderr)
        return 2


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (as ``cloud-connector-proxy`` runs): the relay's per-message
    cost is mostly the event loop's; stock asyncio elsewhere."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _demo(args: argparse.Namespace) -> int:
    from cloudconnector.demo.main import run_demo

    try:
        return asyncio.run(run_demo(devices=args.devices, messages=args.messages, keep=args.keep))
    except RuntimeError as e:  # a stand-in could not start (mosquitto missing, port taken, ...)
        print(f"demo: {e}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if args.command == "run" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers = {"run": _run, "status": _status, "demo": _demo}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
