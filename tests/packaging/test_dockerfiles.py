"""Each image installs only its component's extra, and what that extra resolves to (following the
package's references to its own extras) holds none of the other component's dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
OWN = re.compile(r"^cloud-connector\[([a-z0-9_,-]+)\]$")
NAME = re.compile(r"^[A-Za-z0-9_.-]+")


def _steps(component: str) -> list[str]:
    text = (REPO / component / "Dockerfile").read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _requirements(extras: list[str]) -> set[str]:
    """Distribution names the base install plus ``extras`` asks for, own extras expanded."""
    names = {NAME.match(r).group(0).lower() for r in PROJECT["dependencies"]}  # type: ignore[union-attr]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in EXTRAS[extra]:
            own = OWN.match(req)
            if own:
                todo.extend(own.group(1).split(","))
            else:
                names.add(NAME.match(req).group(0).lower().replace("_", "-"))  # type: ignore[union-attr]
    return names


def _installed_extras(component: str) -> list[str]:
    steps = _steps(component)
    args = dict(s.split(None, 1)[1].split("=", 1) for s in steps if s.startswith("ARG ") and "=" in s)
    installs = [s for s in steps if "pip install" in s]
    assert len(installs) == 1, installs
    match = re.search(r'pip install --no-compile "\.\[\$\{EXTRAS\}\]"', installs[0])
    assert match, installs[0]
    return args["EXTRAS"].split(",")


@pytest.mark.parametrize("component", ["operator", "proxy"])
def test_image_installs_only_its_extra(component: str) -> None:
    assert _installed_extras(component) == [component]
    text = (REPO / component / "Dockerfile").read_text()
    assert "cmake" not in text
    # The CRDs come inside the package: no copy of crds/ and no setting pointing at one.
    assert "CLOUDCONNECTOR_CRDS_DIR" not in text and "COPY crds" not in text


def test_proxy_extra_holds_no_cloud_sdk_and_no_operator_framework() -> None:
    proxy = _requirements(_installed_extras("proxy"))
    assert {"pyopenssl", "uvloop", "prometheus-client", "hvac", "kubernetes-asyncio"} <= proxy
    assert not proxy & {"kopf", "boto3", "azure-iot-hub", "uamqp", "msrest", "azure-identity", "moto"}


def test_operator_extra_holds_none_of_the_proxy_internals() -> None:
    operator = _requirements(_installed_extras("operator"))
    assert {"kopf", "boto3", "hvac", "kubernetes-asyncio"} <= operator
    assert not operator & {"pyopenssl", "uvloop", "prometheus-client", "azure-iot-hub", "uamqp"}


def test_base_install_needs_no_cloud_sdk() -> None:
    assert _requirements([]) == {"aiohttp", "cryptography", "pyyaml", "jsonschema"}


def test_tests_pull_every_component() -> None:
    # scripts/bootstrap installs .[test]: it must bring what every test imports.
    assert _requirements(["test"]) >= _requirements(["operator", "proxy", "demo"]) | {"uv", "setuptools"}
