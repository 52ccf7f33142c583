"""Find known secrets in text that could leak them: logs, process output, status, events, errors.

The hardening tests know every secret a scenario handles (they made the keys, tokens and passwords
themselves), so instead of guessing what a secret looks like the scanner searches for the exact
strings, in the spellings they take on their way out: as is, JSON-escaped, URL-encoded, and, for
PEM private keys, as 40-character slices of the base64 body (a key split across log lines or
joined with escaped newlines still matches). A generic ``PRIVATE KEY`` marker check catches key
blocks the test did not register.

Reports name the secret by label, a short hash and its first four characters, never by value, so
a failing test does not itself print what it was guarding.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, quote_plus

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

PEM_SLICE = 40
MIN_SECRET = 8  # shorter strings would match by accident (and are not secrets worth the name)
_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(.*?)-----END [A-Z ]*PRIVATE KEY-----", re.S)
_PRIVATE_MARKER = "PRIVATE KEY-----"
# Line breaks raw or escaped any number of times (JSON in a repr of bytes in a log line: ``\\\\n``);
# a backslash is never part of base64, so this cannot cut into a key's body.
_BREAKS = re.compile(r"\\+[rn]|\r|\n")


def hint(value: str) -> str:
    """How a report names a secret: four leading characters and a hash, never the value."""
    digest = hashlib.sha256(value.encode()).hexdigest()[:12]
    return f"{value[:4]}…(sha256:{digest})"


@dataclass(frozen=True)
class Needle:
    label: str
    value: str = field(repr=False)
    form: str  # which spelling of the secret this is ("raw", "json", "url", "pem-slice-2", ...)

    def __repr__(self) -> str:
        return f"Needle({self.label!r}, {hint(self.value)}, {self.form})"


@dataclass(frozen=True)
class Finding:
    label: str
    form: str
    hint: str
    where: str
    offset: int

    def __str__(self) -> str:
        return f"{self.where} @{self.offset}: {self.label} [{self.form}] {self.hint}"


def pem_slices(pem: str | bytes, width: int = PEM_SLICE) -> list[str]:
    """Slices of a PEM private key's base64 body found in that key only: first, middle, last.

    A key's encoding also holds public parts (an RSA modulus, the EC public point at the end of
    the block) that rightly appear in certificates, and a header that every key of its kind
    shares. Slices start on 4-character boundaries, so each stands for whole DER bytes; a slice
    whose bytes all occur in the public key, or in a fresh key of the same kind, is not used.
    """
    text = pem.decode() if isinstance(pem, bytes) else pem
    found = _PEM_BLOCK.search(text)
    if found is None:
        raise ValueError("not a PEM private key block")
    body = "".join(found.group(1).split())
    der = base64.b64decode(body)
    public, twin = _public_parts(found.group(0))
    step = width // 4 * 3
    private = [
        start
        for start in range(0, len(body) - width + 1, 4)
        if (chunk := der[start // 4 * 3 : start // 4 * 3 + step]) not in public and chunk not in twin
    ]
    if not private:
        raise ValueError("no private part of the key is long enough to search for")
    picks = sorted({private[0], private[len(private) // 2], private[-1]})
    return [body[s : s + width] for s in picks]


def _public_parts(block: str) -> tuple[bytes, bytes]:
    """The key's public key (DER) and a freshly made key of the same kind in the same encoding."""
    key = serialization.load_pem_private_key(block.encode(), password=None)
    public = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    twin: PrivateKeyTypes
    if isinstance(key, rsa.RSAPrivateKey):
        twin = rsa.generate_private_key(public_exponent=65537, key_size=key.key_size)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        twin = ec.generate_private_key(key.curve)
    else:
        return public, b""
    pkcs8 = block.startswith("-----BEGIN PRIVATE KEY")
    form = PrivateFormat.PKCS8 if pkcs8 else PrivateFormat.TraditionalOpenSSL
    return public, twin.private_bytes(Encoding.DER, form, NoEncryption())


def _spellings(value: str) -> dict[str, str]:
    forms = {
        "raw": value,
        "json": json.dumps(value)[1:-1],
        "url": quote(value, safe=""),
        "url+": quote_plus(value),
    }
    unique: dict[str, str] = {}
    for form, text in forms.items():
        if text not in unique.values():
            unique[form] = text
    return unique


class SecretScanner:
    """Collects the secrets a test knows and looks for them in whatever the product emitted."""

    def __init__(self) -> None:
        self.needles: list[Needle] = []

    def add(self, label: str, value: str | bytes | None) -> None:
        """A token, password or key string; ``None`` or empty is ignored (an optional secret)."""
        if not value:
            return
        text = value.decode() if isinstance(value, bytes) else value
        if len(text) < MIN_SECRET:
            raise ValueError(f"secret {label!r} is too short to search for safely")
        for form, spelling in _spellings(text).items():
            self.needles.append(Needle(label, spelling, form))

    def add_private_key(self, label: str, pem: str | bytes) -> None:
        """A PEM private key: searched for by slices of its body, which survive re-wrapping."""
        for i, piece in enumerate(pem_slices(pem)):
            self.needles.append(Needle(label, piece, f"pem-slice-{i}"))
            # base64 has '+' and '/', which URL encoding rewrites.
            encoded = quote(piece, safe="")
            if encoded != piece:
                self.needles.append(Needle(label, encoded, f"pem-slice-{i}-url"))

    def labels(self) -> set[str]:
        return {n.label for n in self.needles}

    def scan(self, texts: Iterable[tuple[str, str | bytes]]) -> list[Finding]:
        """Every place a registered secret (or any private key block) appears in ``texts``.

        ``texts`` pairs a location (what the text is: "log record 12 of botocore", "stdout of
        cloud-connector run") with the text itself.
        """
        findings: list[Finding] = []
        for where, raw in texts:
            text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
            joined = _BREAKS.sub("", text)
            for needle in self.needles:
                for haystack, how in ((text, ""), (joined, " (line breaks removed)")):
                    at = haystack.find(needle.value)
                    if at >= 0:
                        findings.append(
                            Finding(needle.label, needle.form + how, hint(needle.value), where, at)
                        )
                        break
            at = text.find(_PRIVATE_MARKER)
            if at >= 0:
                findings.append(Finding("private key block", "marker", "PRIVATE KEY", where, at))
        return findings

    def assert_clean(self, texts: Iterable[tuple[str, str | bytes]]) -> int:
        """Fail with every location found; returns how many texts were scanned (to assert on)."""
        __tracebackhide__ = True  # pytest would show this frame's arguments: the scanned texts
        listed = list(texts)
        assert self.needles, "no secrets registered: the scan would prove nothing"
        findings = self.scan(listed)
        if findings:
            lines = "\n  ".join(str(f) for f in findings)
            raise AssertionError(f"{len(findings)} secret leak(s) in {len(listed)} texts:\n  {lines}")
        return len(listed)


# ---------------------------------------------------------------- what to scan


def record_texts(record: logging.LogRecord) -> Iterator[str]:
    """Every string a log handler could write for ``record``: message, args, traceback, extras."""
    try:
        yield record.getMessage()
    except Exception as e:  # a bad format string must not hide the raw parts below
        yield f"<unformattable: {e!r}>"
    yield repr(record.msg)
    yield repr(record.args)
    if record.exc_info and record.exc_info[1] is not None:
        yield "".join(traceback.format_exception(record.exc_info[1]))
    if record.exc_text:
        yield record.exc_text
    if record.stack_info:
        yield record.stack_info
    standard = set(vars(logging.makeLogRecord({})))
    extras = {k: v for k, v in vars(record).items() if k not in standard and k != "message"}
    if extras:
        yield repr(extras)


def exception_texts(error: BaseException) -> Iterator[str]:
    """str, repr and the full traceback with its causes, as a handler or a crash would show it."""
    yield str(error)
    yield repr(error)
    yield "".join(traceback.format_exception(error))


class RecordingHandler(logging.Handler):
    """Keeps every record it sees, unformatted, so the scan sees args and exceptions as well."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> Iterator[tuple[str, str]]:
        for i, record in enumerate(self.records):
            where = f"log record #{i} ({record.name} {record.levelname} {record.pathname}:{record.lineno})"
            for text in record_texts(record):
                yield where, text
