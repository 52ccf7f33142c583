"""Every use of a private pyOpenSSL or asyncio internal, in one place, checked at proxy start.

The proxy needs a few things that pyOpenSSL and asyncio do not expose:

- the key-exchange groups of a context (``SSL_CTX_set1_curves_list``) and the peer name or
  address to verify during the handshake (``SSL_get0_param`` + ``X509_VERIFY_PARAM_*``), through
  ``OpenSSL._util.lib`` on ``Context._context`` and ``Connection._ssl``;
- how full a memory-BIO connection's buffers are (``Connection._into_ssl`` / ``_from_ssl`` with
  ``BIO_get_mem_data``), which spares an exception per read on the hot path;
- the bytes a ``StreamReader`` holds but nobody read yet (``StreamReader._buffer``), which must
  be handed over when the relay takes the connection from the stream reader.

pyOpenSSL is pinned below the next major version (pyproject.toml) because these names may change
with it. :func:`self_check` exercises each of them once at start-up, so an installation where one
is missing fails with one line naming it instead of with an AttributeError mid-connection.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from OpenSSL import SSL

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # reported by self_check
    _ffi = _lib = None

_NO_PARTIAL_WILDCARDS = 0x4  # X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, as Python's ssl sets it
_LIB_FUNCTIONS = (
    "SSL_CTX_set1_curves_list",
    "ERR_clear_error",
    "SSL_get0_param",
    "X509_VERIFY_PARAM_set1_ip",
    "X509_VERIFY_PARAM_set1_host",
    "X509_VERIFY_PARAM_set_hostflags",
    "BIO_get_mem_data",
)


def set_groups(ctx: SSL.Context, groups: bytes) -> bool:
    """Set the key-exchange groups; False (with OpenSSL's error queue cleared) if refused."""
    if _lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1:
        return True
    _lib.ERR_clear_error()  # the refusal must not surface in a later, unrelated call
    return False


def expect_peer_ip(conn: SSL.Connection, packed: bytes) -> bool:
    """Make the handshake verify that the server's certificate names this IP address."""
    return bool(_lib.X509_VERIFY_PARAM_set1_ip(_lib.SSL_get0_param(conn._ssl), packed, len(packed)) == 1)


def expect_peer_name(conn: SSL.Connection, name: bytes) -> bool:
    """Make the handshake verify the server's DNS name, without partial wildcards."""
    param = _lib.SSL_get0_param(conn._ssl)
    _lib.X509_VERIFY_PARAM_set_hostflags(param, _NO_PARTIAL_WILDCARDS)
    return bool(_lib.X509_VERIFY_PARAM_set1_host(param, name, len(name)) == 1)


def has_more(conn: SSL.Connection) -> bool:
    """Whether a ``recv`` could return more: decrypted bytes, or encrypted ones still in the BIO."""
    into = getattr(conn, "_into_ssl", None)
    return into is None or conn.pending() > 0 or _lib.BIO_get_mem_data(into, _ffi.NULL) > 0


def has_output(conn: SSL.Connection) -> bool:
    """Whether OpenSSL wrote bytes into the outgoing memory BIO that are not sent yet."""
    out = getattr(conn, "_from_ssl", None)
    return out is None or _lib.BIO_get_mem_data(out, _ffi.NULL) > 0


def stream_buffer(reader: asyncio.StreamReader) -> bytearray:
    """The reader's own buffer (no public way to drain it without awaiting)."""
    buffer: bytearray = reader._buffer
    return buffer


def self_check() -> str | None:
    """None if every internal above is there and works; else one line saying what is missing."""
    try:
        missing = _missing()
    except Exception as e:  # any failure of the probe is itself the finding
        missing = f"probing them failed with {type(e).__name__}"
    if missing is None:
        return None
    return (
        f"pyOpenSSL {_version('pyopenssl')} lacks internals the proxy's upstream TLS uses ({missing}); "
        "install the version cloud-connector[proxy] pins"
    )


def _missing() -> str | None:
    if _lib is None or _ffi is None or not hasattr(_ffi, "NULL"):
        return "OpenSSL._util.lib/ffi"
    absent = [name for name in _LIB_FUNCTIONS if not hasattr(_lib, name)]
    if absent:
        return "OpenSSL._util.lib." + ", ".join(absent)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if not hasattr(ctx, "_context"):
        return "Context._context"
    set_groups(ctx, b"X25519:P-256")
    conn = SSL.Connection(ctx, None)  # a memory-BIO connection, as the proxy makes them
    for attribute in ("_ssl", "_into_ssl", "_from_ssl"):
        if getattr(conn, attribute, None) is None:
            return f"Connection.{attribute}"
    if not expect_peer_name(conn, b"self-check.invalid"):
        return "X509_VERIFY_PARAM_set1_host"
    has_more(conn)
    has_output(conn)
    loop = asyncio.new_event_loop()  # a reader needs a loop; it is never run
    try:
        buffer = getattr(asyncio.StreamReader(loop=loop), "_buffer", None)
    finally:
        loop.close()
    if not isinstance(buffer, bytearray):
        return "asyncio.StreamReader._buffer"
    return None


def _version(distribution: str) -> Any:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(unknown version)"
