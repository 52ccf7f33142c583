"""Reading manifests from disk (what the standalone mode does): multi-document files, directories,
and errors that name the file, the document and the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cloudconnector import schema
from tests.crds.conftest import EXAMPLES, REPO

GOOD = """\
apiVersion: cloudconnector.io/v1alpha1
kind: Endpoint
metadata: {name: aws-prod, namespace: fleet}
spec:
  type: AwsIotCore
  aws: {region: eu-west-1, credentialsSecretRef: {name: aws-iam}}
---
apiVersion: cloudconnector.io/v1alpha1
kind: Group
metadata: {name: meters, namespace: fleet}
spec:
  endpointRef: {name: aws-prod}
---
"""

DEVICE = """\
apiVersion: cloudconnector.io/v1alpha1
kind: Device
metadata: {{name: {name}, namespace: fleet}}
spec:
  group: meters
  sim: {{iccid: "{iccid}"}}
  ip: {ip}
"""

SECRET = """\
apiVersion: v1
kind: Secret
metadata: {name: aws-iam, namespace: fleet}
stringData:
  AWS_ACCESS_KEY_ID: placeholder-id
  AWS_SECRET_ACCESS_KEY: placeholder-secret-never-echoed
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_reads_a_directory_of_multi_document_files(tmp_path: Path) -> None:
    _write(tmp_path, "a-endpoint.yaml", GOOD)
    _write(tmp_path, "devices/b.yml", DEVICE.format(name="m1", iccid="8935301234567890123", ip="10.0.0.1"))
    _write(tmp_path, "secret.yaml", SECRET)
    _write(tmp_path, "notes.txt", "not a manifest")
    manifests = schema.load_manifests(tmp_path)
    assert [(m.kind, m.name, m.file.name, m.document) for m in manifests] == [
        ("Endpoint", "aws-prod", "a-endpoint.yaml", 1),
        ("Group", "meters", "a-endpoint.yaml", 2),
        ("Device", "m1", "b.yml", 1),
        ("Secret", "aws-iam", "secret.yaml", 1),
    ]
    assert str(manifests[2]) == "Device fleet/m1"


def test_reads_a_single_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "one.yaml", GOOD)
    assert [m.kind for m in schema.load_manifests(path)] == ["Endpoint", "Group"]


def test_hidden_files_and_directories_are_skipped(tmp_path: Path) -> None:
    # A mounted ConfigMap shows each file again under ..data and a timestamped hidden directory.
    _write(tmp_path, "endpoint.yaml", GOOD)
    _write(tmp_path, "..2026_11_28/endpoint.yaml", GOOD)
    _write(tmp_path, ".hidden.yaml", GOOD)
    assert len(schema.load_manifests(tmp_path)) == 2


def test_bad_field_names_file_document_object_and_field(tmp_path: Path) -> None:
    _write(tmp_path, "ok.yaml", GOOD)
    bad = (
        DEVICE.format(name="m1", iccid="123", ip="10.0.0.1")
        + "---\n"
        + DEVICE.format(name="m2", iccid="8935301234567890123", ip="10.0.0.300")
    )
    path = _write(tmp_path, "devices.yaml", bad)
    manifests, errors = schema.read_manifests(tmp_path)
    assert [m.name for m in manifests] == ["aws-prod", "meters"]
    assert [(e.file, e.document, e.object, e.path) for e in errors] == [
        (path, 1, "Device fleet/m1", "spec.sim.iccid"),
        (path, 2, "Device fleet/m2", "spec.ip"),
    ]
    text = str(errors[0])
    assert text.startswith(f"{path} (document 1): Device fleet/m1: spec.sim.iccid: must be 18 to 22 digits")

    with pytest.raises(schema.ManifestError) as raised:
        schema.load_manifests(tmp_path)
    assert raised.value.errors == tuple(errors)
    assert "spec.ip" in str(raised.value)
    assert str(path) in str(raised.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.yaml", GOOD + "kind: Device\nspec: [unclosed\n")
    _, errors = schema.read_manifests(tmp_path)
    (error,) = errors
    assert error.file == path
    assert "not valid YAML" in error.message
    assert "line " in error.message


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "dup.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: a}\nkind: Secret\n")
    _, errors = schema.read_manifests(tmp_path)
    assert "duplicate key 'kind'" in errors[0].message


def test_duplicate_objects_are_an_error(tmp_path: Path) -> None:
    first = _write(tmp_path, "a.yaml", GOOD)
    second = _write(tmp_path, "b.yaml", GOOD)
    manifests, errors = schema.read_manifests(tmp_path)
    assert len(manifests) == 2
    assert {(e.file, e.path) for e in errors} == {(second, "metadata.name")}
    assert str(first) in errors[0].message


def test_unsupported_documents(tmp_path: Path) -> None:
    _write(tmp_path, "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: fleet}\n")
    _write(tmp_path, "list.yaml", "- 1\n- 2\n")
    _, errors = schema.read_manifests(tmp_path)
    assert {(e.file.name if e.file else None, e.path) for e in errors} == {
        ("ns.yaml", "apiVersion"),
        ("list.yaml", ""),
    }


def test_timestamps_stay_strings(tmp_path: Path) -> None:
    text = DEVICE.format(name="m1", iccid="8935301234567890123", ip="10.0.0.1")
    text += "status:\n  notAfter: 2027-11-28T09:30:00Z\n"
    (manifest,) = schema.load_manifests(_write(tmp_path, "d.yaml", text))
    assert manifest.obj["status"]["notAfter"] == "2027-11-28T09:30:00Z"


def test_secret_errors_never_echo_values(tmp_path: Path) -> None:
    text = SECRET.replace("stringData:", "data:")  # plain text where base64 is expected
    text += "  12: x\n"
    _write(tmp_path, "s.yaml", text)
    _, errors = schema.read_manifests(tmp_path)
    paths = {e.path for e in errors}
    assert "data.AWS_SECRET_ACCESS_KEY" in paths
    assert "data['12']" in paths  # a key that YAML made a number
    for error in errors:
        assert "placeholder" not in str(error)


def test_missing_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        schema.read_manifests(tmp_path / "nowhere")


def test_examples_directory_loads() -> None:
    manifests = schema.load_manifests(EXAMPLES)
    assert len({m.file for m in manifests}) == len(list(EXAMPLES.glob("*.yaml")))


def test_crds_dir_defaults_to_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(schema.CRDS_DIR_ENV, raising=False)
    assert schema.crds_dir().resolve() == (REPO / "crds").resolve()


def test_crds_dir_can_be_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: dict[str, object]
) -> None:
    # A copy of the CRDs whose Device schema demands 20-digit ICCIDs: validate must follow it.
    for path in (REPO / "crds").glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    doc = yaml.safe_load((tmp_path / "devices.yaml").read_text())
    iccid = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["sim"]
    iccid["properties"]["iccid"]["pattern"] = "^[0-9]{20}$"
    (tmp_path / "devices.yaml").write_text(yaml.safe_dump(doc))
    assert schema.validate(device) == []
    monkeypatch.setenv(schema.CRDS_DIR_ENV, str(tmp_path))
    assert [e.path for e in schema.validate(device)] == ["spec.sim.iccid"]


def test_missing_crd_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(REPO / "crds" / "devices.yaml", tmp_path / "devices.yaml")
    monkeypatch.setenv(schema.CRDS_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Endpoint, Group"):
        schema.crd_schemas()
