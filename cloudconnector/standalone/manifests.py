"""Reading a directory of manifests for the standalone mode, with errors that name file and field.

No API server checks these files: :mod:`cloudconnector.schema` gives each document the CRDs'
verdict and the model's parsers add the cross-field rules. A file with any error is reported and
*skipped as a whole*: the caller keeps, never deprovisions, whatever that file described before,
because an unparseable file says nothing about which devices the user meant to remove.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudconnector import api, schema
from cloudconnector.errors import InvalidSpec
from cloudconnector.model import parse_device, parse_endpoint, parse_group

_PARSERS: dict[str, Callable[[Mapping[str, Any]], object]] = {
    api.KIND_ENDPOINT: parse_endpoint,
    api.KIND_GROUP: parse_group,
    api.KIND_DEVICE: parse_device,
}


@dataclass(frozen=True)
class ManifestError:
    file: str  # relative to the manifest directory
    message: str  # names the document, object and field; never a Secret's values

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass(frozen=True)
class Manifest:
    kind: str
    body: Mapping[str, Any]
    source: str

    @property
    def key(self) -> tuple[str, str, str]:
        meta = self.body.get("metadata") or {}
        return (self.kind, meta.get("namespace") or "default", meta["name"])


@dataclass
class Snapshot:
    """Everything read from DIR in one pass."""

    manifests: list[Manifest] = field(default_factory=list)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (ns, name) -> data
    errors: list[ManifestError] = field(default_factory=list)
    failed_files: set[str] = field(default_factory=set)

    def by_kind(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m.kind == kind]


def manifest_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix in schema.MANIFEST_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _relative(directory: Path, file: Path | None) -> str:
    if file is None:
        return "(unknown file)"
    try:
        return str(file.relative_to(directory))
    except ValueError:
        return str(file)


def load_dir(directory: Path) -> Snapshot:
    snap = Snapshot()
    found, problems = schema.read_manifests(directory)
    for problem in problems:
        name = _relative(directory, problem.file)
        snap.failed_files.add(name)
        where = f"document {problem.document}: " if problem.document else ""
        if problem.object:
            where += f"{problem.object}: "
        fieldpath = f"{problem.path}: " if problem.path else ""
        snap.errors.append(ManifestError(name, f"{where}{fieldpath}{problem.message}"))
    accepted: list[Manifest] = []
    for item in found:
        name = _relative(directory, item.file)
        try:
            if item.kind == "Secret":
                snap.secrets[(item.namespace, item.name)] = _secret_data(item.obj)
                continue
            _PARSERS[item.kind](item.obj)
        except InvalidSpec as e:
            snap.failed_files.add(name)
            snap.errors.append(ManifestError(name, f"document {item.document}: {item}: {e}"))
            continue
        accepted.append(Manifest(item.kind, item.obj, name))
    # A file with one bad document is skipped whole, so that its other documents do not look removed
    # one pass and re-added the next.
    snap.manifests = [m for m in accepted if m.source not in snap.failed_files]
    return snap


def _secret_data(doc: Mapping[str, Any]) -> dict[str, str]:
    data: dict[str, str] = {}
    for key, value in (doc.get("data") or {}).items():
        try:
            data[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidSpec(f"data.{key}", "is not valid base64 text") from None
    data.update({str(k): str(v) for k, v in (doc.get("stringData") or {}).items()})
    return data


def format_errors(errors: Iterable[ManifestError]) -> str:
    return "\n".join(str(e) for e in errors)
