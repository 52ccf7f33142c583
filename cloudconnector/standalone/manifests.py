"""Reading a directory of manifests for the standalone mode, with errors that name file and field.

No API server checks these files, so each document goes through the CRD schema (when the schema
module is available) and the model's parsers. A file that fails is reported and *skipped as a
whole*: the caller must then keep, not deprovision, whatever that file described before, because
an unparseable file says nothing about which devices the user meant to remove.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloudconnector import api
from cloudconnector.errors import InvalidSpec
from cloudconnector.model import parse_device, parse_endpoint, parse_group

SUFFIXES = (".yaml", ".yml", ".json")
_PARSERS: dict[str, Callable[[Mapping[str, Any]], object]] = {
    api.KIND_ENDPOINT: parse_endpoint,
    api.KIND_GROUP: parse_group,
    api.KIND_DEVICE: parse_device,
}


@dataclass(frozen=True)
class ManifestError:
    file: str
    message: str  # names the document and field; never a Secret's values

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
    files: set[str] = field(default_factory=set)

    def by_kind(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m.kind == kind]


def _schema_validator() -> Callable[[Mapping[str, Any]], None] | None:
    """The CRD schema validator, when that module is installed alongside."""
    try:
        from cloudconnector import schema
    except ImportError:
        return None
    validate: Callable[[Mapping[str, Any]], None] | None = getattr(schema, "validate", None)
    return validate


def manifest_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def load_dir(directory: Path) -> Snapshot:
    snap = Snapshot()
    validate = _schema_validator()
    for path in manifest_files(directory):
        name = str(path.relative_to(directory))
        snap.files.add(name)
        try:
            docs = _read_docs(path)
        except ValueError as e:
            snap.errors.append(ManifestError(name, str(e)))
            snap.failed_files.add(name)
            continue
        found: list[Manifest] = []
        secrets: dict[tuple[str, str], dict[str, str]] = {}
        errors: list[ManifestError] = []
        for index, doc in enumerate(docs):
            try:
                _check_doc(doc, index, found, secrets, name, validate)
            except InvalidSpec as e:
                errors.append(ManifestError(name, f"{_describe(doc, index)}: {e}"))
        if errors:
            snap.errors.extend(errors)
            snap.failed_files.add(name)
            continue
        snap.manifests.extend(found)
        snap.secrets.update(secrets)
    _check_duplicates(snap)
    return snap


def _read_docs(path: Path) -> list[Any]:
    try:
        text = path.read_text()
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read: {type(e).__name__}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise ValueError(f"not valid YAML{where}: {problem}") from None


def _describe(doc: Any, index: int) -> str:
    if isinstance(doc, Mapping):
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
        kind = doc.get("kind", "?")
        name = meta.get("name") if meta else None
        if name:
            return f"{kind} {meta.get('namespace') or 'default'}/{name}"
        return f"{kind} (document {index + 1})"
    return f"document {index + 1}"


def _check_doc(
    doc: Any,
    index: int,
    found: list[Manifest],
    secrets: dict[tuple[str, str], dict[str, str]],
    source: str,
    validate: Callable[[Mapping[str, Any]], None] | None,
) -> None:
    if not isinstance(doc, Mapping):
        raise InvalidSpec("(document)", f"document {index + 1} is not a mapping")
    kind = doc.get("kind")
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise InvalidSpec("metadata.name", "is required")
    if kind == "Secret" and doc.get("apiVersion") == "v1":
        ns = meta.get("namespace") or "default"
        secrets[(ns, meta["name"])] = _secret_data(doc)
        return
    if kind not in _PARSERS:
        raise InvalidSpec("kind", f"must be Endpoint, Group, Device or a v1 Secret, got {kind!r}")
    if doc.get("apiVersion") != api.API_VERSION:
        raise InvalidSpec("apiVersion", f"must be {api.API_VERSION}, got {doc.get('apiVersion')!r}")
    if validate is not None:
        validate(doc)
    _PARSERS[kind](doc)
    found.append(Manifest(kind, doc, source))


def _secret_data(doc: Mapping[str, Any]) -> dict[str, str]:
    data: dict[str, str] = {}
    raw = doc.get("data") or {}
    if not isinstance(raw, Mapping):
        raise InvalidSpec("data", "must be a mapping")
    for key, value in raw.items():
        try:
            data[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidSpec(f"data.{key}", "is not valid base64 text") from None
    plain = doc.get("stringData") or {}
    if not isinstance(plain, Mapping):
        raise InvalidSpec("stringData", "must be a mapping")
    data.update({str(k): str(v) for k, v in plain.items()})
    return data


def _check_duplicates(snap: Snapshot) -> None:
    seen: dict[tuple[str, str, str], str] = {}
    keep: list[Manifest] = []
    for m in snap.manifests:
        if m.key in seen:
            kind, ns, name = m.key
            snap.errors.append(
                ManifestError(m.source, f"{kind} {ns}/{name}: metadata.name: also defined in {seen[m.key]}")
            )
            snap.failed_files.add(m.source)
            continue
        seen[m.key] = m.source
        keep.append(m)
    snap.manifests = keep


def format_errors(errors: Iterable[ManifestError]) -> str:
    return "\n".join(str(e) for e in errors)
