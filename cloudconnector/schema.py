"""Client-side validation of Cloud Connector manifests against the CRDs' own schemas.

A cluster's API server checks Endpoints, Groups and Devices at apply time; the standalone mode and
the tests read manifests that no API server saw. This module gives them the same verdict: it reads
the ``openAPIV3Schema`` of each kind from ``crds/`` (the single source of truth, never a copy),
applies it with format checks, rejects unknown fields as ``kubectl apply`` does, and mirrors in
Python the CEL rules (``x-kubernetes-validations``) that jsonschema cannot run. Every error names the
field path, and, for manifests read from disk, the file and document it came from.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cloudconnector import api, topic_template
from cloudconnector.errors import InvalidSpec, PermanentError, short

CRDS_DIR_ENV = "CLOUDCONNECTOR_CRDS_DIR"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")

# Plain words for the CRDs' patterns, so that a user reads "must be 18 to 22 digits" rather than a
# regular expression. A test checks that every pattern in crds/ has an entry here.
PATTERN_HINTS: Mapping[str, str] = {
    _DNS_SUBDOMAIN.pattern: (
        "must be a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', "
        "starting and ending with a letter or digit"
    ),
    r"^[0-9]{18,22}$": "must be 18 to 22 digits",
    r"^[0-9]{15}$": "must be 15 digits",
    r"^[a-zA-Z0-9:_-]{1,128}$": "must be 1 to 128 letters, digits, ':', '_' or '-'",
    r"^[a-zA-Z0-9:_-]*$": "may only hold letters, digits, ':', '_' and '-'",
    r"^[a-z]{2}(-[a-z0-9]+)+$": "must be an AWS region name such as eu-west-1",
    r"^https?://[^\s]+$": "must be an http:// or https:// URL without spaces",
    r"^[A-Za-z0-9.:\[\]-]+$": "must be a host name or an IP address",
    topic_template.CRD_PATTERN: (
        "must be a topic prefix ending in '/', not starting with '/' or '$', without '+' or '#', whose "
        "placeholders are {cloudId}, {thingName}, {iccid}, {imsi}, {device}, {namespace} or {group}"
    ),
}


@dataclass(frozen=True)
class SchemaError:
    """One reason a manifest is rejected: which field, why, and where the manifest came from."""

    path: str  # dotted field path such as "spec.sim.iccid"; "" for the document as a whole
    message: str
    file: Path | None = None
    document: int | None = None  # 1-based position of the document within its file
    object: str | None = None  # "Device fleet/meter-0001", when known

    def __str__(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file) + (f" (document {self.document})" if self.document else ""))
        if self.object:
            where.append(self.object)
        field = f"{self.path}: " if self.path else ""
        prefix = ": ".join(where)
        return f"{prefix}: {field}{self.message}" if prefix else f"{field}{self.message}"


class ManifestError(PermanentError):
    """Manifests that cannot be used as they are; ``errors`` lists every problem found."""

    reason = "InvalidManifest"

    def __init__(self, errors: Sequence[SchemaError]) -> None:
        self.errors = tuple(errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} problem(s) in the manifests:\n{lines}")


@dataclass(frozen=True)
class Manifest:
    """One object read from a YAML file, with where it came from."""

    obj: Mapping[str, Any]
    file: Path
    document: int  # 1-based

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self._metadata.get("name") or "")

    @property
    def namespace(self) -> str:
        return str(self._metadata.get("namespace") or "default")

    @property
    def _metadata(self) -> Mapping[str, Any]:
        metadata = self.obj.get("metadata")
        return metadata if isinstance(metadata, Mapping) else {}

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


# --------------------------------------------------------------------------------------------
# The CRDs


def crds_dir() -> Path:
    """Where the CRD files are: ``$CLOUDCONNECTOR_CRDS_DIR`` (a test or a user trying a changed
    schema), else ``cloudconnector/crds/`` inside the package, the one copy; the checkout's top-level
    ``crds`` is a symlink to it, and the wheel carries it as package data."""
    override = os.environ.get(CRDS_DIR_ENV)
    return Path(override) if override else Path(__file__).resolve().parent / "crds"


@functools.lru_cache(maxsize=8)
def _load_crds(directory: Path) -> Mapping[str, Mapping[str, Any]]:
    """Kind -> openAPIV3Schema of the served version ``api.VERSION``, for every CRD in ``directory``."""
    schemas: dict[str, Mapping[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not isinstance(doc, Mapping) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            if spec.get("group") != api.GROUP:
                continue
            for version in spec.get("versions", ()):
                if version.get("name") == api.VERSION:
                    schemas[spec["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    missing = set(api.PLURALS) - set(schemas)
    if missing:
        raise FileNotFoundError(f"no CRD for {', '.join(sorted(missing))} in {directory}")
    return schemas


def crd_schemas() -> Mapping[str, Mapping[str, Any]]:
    """The openAPIV3Schema of each kind (Endpoint, Group, Device), read from :func:`crds_dir`."""
    return _load_crds(crds_dir().resolve())


def _closed(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy in which objects with declared properties refuse other fields.

    The API server prunes unknown fields and ``kubectl apply`` rejects them (strict field
    validation); a typo such as ``iccd`` must not pass silently here either.
    """
    node = dict(schema)
    if "properties" in node:
        node["properties"] = {k: _closed(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
    if isinstance(node.get("items"), Mapping):
        node["items"] = _closed(node["items"])
    for junctor in ("anyOf", "allOf", "oneOf"):
        if junctor in node:
            node[junctor] = [_closed(s) for s in node[junctor]]
    return node


def _is_ipv4(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _is_ipv6(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.match(value):
        return False
    try:
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _format_checker() -> jsonschema.FormatChecker:
    # Only the formats the CRDs use, implemented here so that no optional jsonschema extra decides
    # silently whether a format is checked at all.
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("ipv4")(_is_ipv4)
    checker.checks("ipv6")(_is_ipv6)
    checker.checks("date-time")(_is_datetime)
    return checker


@functools.lru_cache(maxsize=8)
def _validator(directory: Path, kind: str) -> jsonschema.Draft4Validator:
    # CRD schemas are OpenAPI 3.0, whose keywords (boolean exclusiveMinimum, ...) are draft 4's.
    schema = _closed(copy.deepcopy(dict(_load_crds(directory)[kind])))
    return jsonschema.Draft4Validator(schema, format_checker=_format_checker())


# --------------------------------------------------------------------------------------------
# The CEL rules, mirrored


def _present(obj: Mapping[str, Any], key: str) -> bool:
    # The API server drops null values of non-nullable fields, so CEL's has() never sees them.
    return obj.get(key) is not None


_LEADING_ZERO_OCTET = re.compile(r"(^|:)0[0-9]+[.]|[.]0[0-9]")


def _exactly_when(section: str, kind: str) -> Callable[[Any], bool]:
    return lambda s: _present(s, section) == (s.get("type") == kind)


CEL_MIRRORS: Mapping[str, Callable[[Any], bool]] = {
    "(has(self.aws) && self.type == 'AwsIotCore') || (!has(self.aws) && self.type != 'AwsIotCore')": (
        _exactly_when("aws", "AwsIotCore")
    ),
    "(has(self.azure) && self.type == 'AzureIotHub') || (!has(self.azure) && self.type != 'AzureIotHub')": (
        _exactly_when("azure", "AzureIotHub")
    ),
    "(has(self.mqtt) && self.type == 'MqttBroker') || (!has(self.mqtt) && self.type != 'MqttBroker')": (
        _exactly_when("mqtt", "MqttBroker")
    ),
    "!has(self.registerCertificate) || has(self.credentialsSecretRef)": (
        lambda s: not _present(s, "registerCertificate") or _present(s, "credentialsSecretRef")
    ),
    "!self.matches('(^|:)0[0-9]+[.]|[.]0[0-9]')": (
        lambda s: not (isinstance(s, str) and _LEADING_ZERO_OCTET.search(s))
    ),
}
"""Python twins of the CRDs' CEL rules, keyed by the rule's exact text; tests check that every rule
in crds/ has one and that both agree on the examples and counter-examples."""

CEL_FIELDS: Mapping[str, str] = {
    "(has(self.aws) && self.type == 'AwsIotCore') || (!has(self.aws) && self.type != 'AwsIotCore')": "aws",
    "(has(self.azure) && self.type == 'AzureIotHub') || (!has(self.azure) && self.type != 'AzureIotHub')": (
        "azure"
    ),
    "(has(self.mqtt) && self.type == 'MqttBroker') || (!has(self.mqtt) && self.type != 'MqttBroker')": "mqtt",
    "!has(self.registerCertificate) || has(self.credentialsSecretRef)": "registerCertificate",
}
"""The field a cross-field rule is about, below the node that carries it. Kubernetes before 1.28
has no ``fieldPath`` on a rule, so the rule's message names the field for the API server and this
table names it for :func:`validate`."""


def _same_optional(key: str) -> Callable[[Any, Any], bool]:
    # has(x.key) ? x.key : '' on both sides: absent and empty are the same value.
    return lambda old, new: (
        (new.get(key) if _present(new, key) else "") == (old.get(key) if _present(old, key) else "")
    )


def _same_optional_rule(key: str) -> str:
    """The CEL text of that rule, as it stands on the field's parent in crds/ (the field itself
    has no oldSelf when it is added or removed)."""
    return f"(has(self.{key}) ? self.{key} : '') == (has(oldSelf.{key}) ? oldSelf.{key} : '')"


_IDENTITY_FIELDS = ("cloudId", "thingPrefix")  # name where an identity lives: never edited in place
_TRANSITION_FIELDS = {_same_optional_rule(key): key for key in _IDENTITY_FIELDS}

TRANSITION_RULES: Mapping[str, Callable[[Any, Any], bool]] = {
    "self == oldSelf": lambda old, new: bool(old == new),
    **{_same_optional_rule(key): _same_optional(key) for key in _IDENTITY_FIELDS},
}
"""CEL rules that compare with the stored object (``oldSelf``), as Python ``(old, new) -> ok``: the
API server runs them on updates only. :func:`validate` sees one object and skips them;
:func:`validate_update` enforces them."""


def cel_rules(
    schema: Mapping[str, Any], value: Any, path: str
) -> Iterator[tuple[str, Mapping[str, Any], Any]]:
    """(path, rule, value) for every CEL rule that applies to a node present in ``value``."""
    for rule in schema.get("x-kubernetes-validations", ()):
        yield path, rule, value
    if isinstance(value, Mapping):
        for key, sub in (schema.get("properties") or {}).items():
            if value.get(key) is not None:
                yield from cel_rules(sub, value[key], _join(path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            yield from cel_rules(schema["items"], item, f"{path}[{i}]")


# --------------------------------------------------------------------------------------------
# Validation


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not re.fullmatch(r"[A-Za-z_$][-A-Za-z0-9_$]*", key):
        return f"{path}[{key!r}]"
    return f"{path}.{key}" if path else key


def _path(parts: Sequence[str | int]) -> str:
    path = ""
    for part in parts:
        path = _join(path, part)
    return path


_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
}


_FORMAT_WORDS = {"ipv4": "an IPv4 address", "ipv6": "an IPv6 address", "date-time": "an RFC 3339 time"}


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", dict: "mapping"}.get(
        type(value), "list" if isinstance(value, list) else type(value).__name__
    )


def _show(value: object) -> str:
    return short(repr(value), 80)


def _messages(error: jsonschema.ValidationError) -> Iterator[tuple[str, str]]:
    """(field path, message) pairs for one jsonschema error, in words a user can act on."""
    path = _path(list(error.absolute_path))
    kind, expected, value = error.validator, error.validator_value, error.instance
    if kind == "required":
        for name in expected:
            if not isinstance(value, Mapping) or name not in value:
                yield _join(path, name), "is required"
    elif kind == "additionalProperties":
        known = set((error.schema.get("properties") or {}).keys())
        for name in value:
            if name not in known:
                yield _join(path, name), "is not a known field (check its spelling and indentation)"
    elif kind == "type":
        message = f"must be {_TYPE_WORDS.get(expected, expected)}, got {_type_name(value)}"
        if expected == "string" and isinstance(value, int | float) and not isinstance(value, bool):
            message += ' (quote numbers in YAML, for example "8935...")'
        yield path, message
    elif kind == "enum":
        yield path, f"must be one of {', '.join(map(str, expected))}; got {_show(value)}"
    elif kind == "pattern":
        yield path, f"{PATTERN_HINTS.get(expected, f'must match {expected}')}; got {_show(value)}"
    elif kind == "anyOf" and all(set(s) == {"format"} for s in expected):
        formats = " or ".join(_FORMAT_WORDS.get(s["format"], s["format"]) for s in expected)
        yield path, f"must be {formats}; got {_show(value)}"
    elif kind == "format":
        yield path, f"must be {_FORMAT_WORDS.get(expected, expected)}; got {_show(value)}"
    elif kind == "minLength":
        yield path, "must not be empty" if expected == 1 else f"must be at least {expected} characters long"
    elif kind == "maxLength":
        yield path, f"must be at most {expected} characters long (it is {len(value)})"
    elif kind in ("minimum", "maximum"):
        exclusive = error.schema.get(f"exclusive{kind.capitalize()}", False)
        words = {
            ("minimum", False): "at least",
            ("minimum", True): "greater than",
            ("maximum", False): "at most",
            ("maximum", True): "less than",
        }[kind, bool(exclusive)]
        yield path, f"must be {words} {expected}; got {_show(value)}"
    elif kind == "maxItems":
        yield path, f"must have at most {expected} items (it has {len(value)})"
    else:
        yield path, short(error.message, 200)


def _check_metadata(obj: Mapping[str, Any]) -> Iterator[SchemaError]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        yield SchemaError("metadata", "is required and must be a mapping with at least a name")
        return
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        yield SchemaError("metadata.name", "is required")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        yield SchemaError("metadata.name", f"{PATTERN_HINTS[_DNS_SUBDOMAIN.pattern]}; got {_show(name)}")
    namespace = metadata.get("namespace")
    if namespace is not None and (
        not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.match(namespace)
    ):
        yield SchemaError(
            "metadata.namespace",
            "must be a DNS-1123 label (at most 63 lower-case letters, digits and '-'); "
            f"got {_show(namespace)}",
        )
    for field in ("labels", "annotations"):
        entries = metadata.get(field)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            yield SchemaError(f"metadata.{field}", "must be a mapping of strings")
            continue
        for key, item in entries.items():
            if not isinstance(item, str):
                yield SchemaError(
                    _join(f"metadata.{field}", str(key)), f"must be a string, got {_type_name(item)}"
                )


def validate(obj: Mapping[str, Any]) -> list[SchemaError]:
    """Every reason the API server would reject ``obj`` (an Endpoint, Group or Device), sorted by
    field path; an empty list means it is valid. Errors carry no file; see :func:`read_manifests`."""
    if not isinstance(obj, Mapping):
        return [SchemaError("", f"must be a mapping, got {_type_name(obj)}")]
    if obj.get("apiVersion") != api.API_VERSION:
        return [SchemaError("apiVersion", f"must be {api.API_VERSION}; got {_show(obj.get('apiVersion'))}")]
    kind = obj.get("kind")
    if kind not in api.PLURALS:
        allowed = ", ".join(api.PLURALS)
        return [SchemaError("kind", f"must be one of {allowed}; got {_show(kind)}")]

    directory = crds_dir().resolve()
    errors = list(_check_metadata(obj))
    failed: set[str] = set()
    found = list(_validator(directory, kind).iter_errors(obj))
    # A pattern's plain words already say how long the value may be: one message per field is enough.
    by_pattern = {_path(list(e.absolute_path)) for e in found if e.validator == "pattern"}
    for error in found:
        if error.validator in ("minLength", "maxLength") and _path(list(error.absolute_path)) in by_pattern:
            continue
        for path, message in _messages(error):
            errors.append(SchemaError(path, message))
            failed.add(path)
    # A CEL rule is judged only on a node whose own fields passed the schema, so that one typo does
    # not also produce a confusing cross-field complaint.
    for path, rule, value in cel_rules(_load_crds(directory)[kind], obj, ""):
        if any(not path or f == path or f.startswith((path + ".", path + "[")) for f in failed):
            continue
        check = CEL_MIRRORS.get(rule["rule"])
        if check is not None and not check(value):
            field = _join(path, CEL_FIELDS[rule["rule"]]) if rule["rule"] in CEL_FIELDS else path
            errors.append(SchemaError(field, rule.get("message") or f"failed rule {rule['rule']}"))
    return sorted(set(errors), key=lambda e: (e.path, e.message))


def validate_update(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[SchemaError]:
    """The transition rules for replacing ``old`` by ``new``: immutable fields that changed."""
    kind = new.get("kind")
    if kind not in api.PLURALS or old.get("kind") != kind:
        return []
    schemas = _load_crds(crds_dir().resolve())
    rules = cel_rules(schemas[kind], old, "")
    before = {path: value for path, rule, value in rules if rule["rule"] in TRANSITION_RULES}
    errors = []
    for path, rule, value in cel_rules(schemas[kind], new, ""):
        check = TRANSITION_RULES.get(rule["rule"])
        if check is None or path not in before or check(before[path], value):
            continue
        # A rule on the field itself can show the old value; one on its parent names the field.
        field = _TRANSITION_FIELDS.get(rule["rule"])
        if field is None:
            errors.append(SchemaError(path, f"{rule['message']} (was {_show(before[path])})"))
        else:
            errors.append(SchemaError(_join(path, field), rule["message"]))
    return errors


def check(obj: Mapping[str, Any]) -> None:
    """Raise :class:`InvalidSpec` naming the first bad field (the message lists them all), for
    callers that treat a bad object as one permanent error rather than a list."""
    errors = validate(obj)
    if errors:
        first = errors[0]
        rest = "; ".join(str(e) for e in errors[1:])
        raise InvalidSpec(first.path or "(document)", first.message + (f"; also {rest}" if rest else ""))


def _validate_secret(obj: Mapping[str, Any]) -> list[SchemaError]:
    """A core v1 Secret, checked just enough for the standalone mode; values are never echoed."""
    errors = list(_check_metadata(obj))
    for field in ("data", "stringData"):
        entries = obj.get(field)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            errors.append(SchemaError(field, "must be a mapping of key to value"))
            continue
        for key, value in entries.items():
            where = _join(field, str(key))
            if not isinstance(key, str) or not _SECRET_KEY.match(key):
                errors.append(SchemaError(where, "key must be letters, digits, '-', '_' or '.'"))
            elif not isinstance(value, str):
                errors.append(SchemaError(where, f"must be a string, got {_type_name(value)}"))
            elif field == "data":
                try:
                    base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    errors.append(SchemaError(where, "must be base64 (use stringData for plain text)"))
    unknown = set(obj) - {"apiVersion", "kind", "metadata", "type", "data", "stringData", "immutable"}
    errors.extend(SchemaError(k, "is not a known field of a Secret") for k in sorted(unknown))
    return errors


# --------------------------------------------------------------------------------------------
# Reading manifests from disk


class _Loader(yaml.SafeLoader):
    """YAML as the API server reads it: timestamps stay strings, duplicate keys are an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _manifest_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    # Hidden entries are skipped: a mounted ConfigMap holds every file twice, under "..data".
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in MANIFEST_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _read_file(file: Path) -> tuple[list[Manifest], list[SchemaError]]:
    try:
        docs = list(yaml.load_all(file.read_text(encoding="utf-8"), Loader=_Loader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        return [], [SchemaError("", f"not valid YAML: {where}{short(problem, 200)}", file=file)]
    except (OSError, UnicodeDecodeError) as e:
        return [], [SchemaError("", f"cannot be read: {short(e, 200)}", file=file)]
    manifests: list[Manifest] = []
    errors: list[SchemaError] = []
    for number, doc in enumerate(docs, start=1):
        if doc is None:
            continue  # an empty document, e.g. after a trailing "---"
        if not isinstance(doc, Mapping):
            errors.append(
                SchemaError("", f"must be a mapping, got {_type_name(doc)}", file=file, document=number)
            )
            continue
        manifests.append(Manifest(doc, file, number))
    return manifests, errors


def _check(manifest: Manifest) -> list[SchemaError]:
    obj = manifest.obj
    if obj.get("apiVersion") == "v1" and obj.get("kind") == "Secret":
        problems = _validate_secret(obj)
    else:
        problems = validate(obj)
    label = str(manifest) if manifest.name else None
    return [
        SchemaError(p.path, p.message, file=manifest.file, document=manifest.document, object=label)
        for p in problems
    ]


def read_manifests(path: str | os.PathLike[str]) -> tuple[list[Manifest], list[SchemaError]]:
    """Read a YAML file, or every ``*.yaml``/``*.yml``/``*.json`` below a directory (multi-document
    files allowed), and check each object: Endpoints, Groups and Devices against the CRDs, core v1
    Secrets (the credentials they reference) lightly. Returns the valid manifests and the errors of
    the others, each naming file, document and field. Two objects of the same kind, namespace and
    name are an error too."""
    root = Path(path)
    manifests: list[Manifest] = []
    errors: list[SchemaError] = []
    seen: dict[tuple[str, str, str], Manifest] = {}
    for file in _manifest_files(root):
        found, problems = _read_file(file)
        errors.extend(problems)
        for manifest in found:
            checked = _check(manifest)
            if checked:
                errors.extend(checked)
                continue
            key = (manifest.kind, manifest.namespace, manifest.name)
            first = seen.get(key)
            if first is not None:
                errors.append(
                    SchemaError(
                        "metadata.name",
                        f"duplicate {first}: also in {first.file} (document {first.document})",
                        file=file,
                        document=manifest.document,
                        object=str(manifest),
                    )
                )
                continue
            seen[key] = manifest
            manifests.append(manifest)
    return manifests, errors


def load_manifests(path: str | os.PathLike[str]) -> list[Manifest]:
    """Like :func:`read_manifests`, but all or nothing: raises :class:`ManifestError` listing every
    problem (file, document, field, reason) if any manifest is bad."""
    manifests, errors = read_manifests(path)
    if errors:
        raise ManifestError(errors)
    return manifests
