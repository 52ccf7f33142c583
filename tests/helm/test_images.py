"""Static checks of the Dockerfiles (no Docker engine here to build them): pinned base, two
stages, the non-root user the chart expects, and entry points that exist in pyproject.toml."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from tests.helm.chart import CHART_DIR, REPO

IMAGES = {"operator": "cloud-connector-operator", "proxy": "cloud-connector-proxy"}


def _instructions(component: str) -> list[tuple[str, str]]:
    text = (REPO / component / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


@pytest.mark.parametrize("component", sorted(IMAGES))
def test_base_is_pinned_and_build_is_multi_stage(component: str) -> None:
    steps = _instructions(component)
    base = next(arg for op, arg in steps if op == "ARG" and arg.startswith("PYTHON_IMAGE="))
    # A full version tag (3.11.N) on Debian bookworm slim, never a floating tag.
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build")
    assert any(op == "COPY" and arg.startswith("--from=build ") for op, arg in steps)


@pytest.mark.parametrize("component", sorted(IMAGES))
def test_runs_as_the_chart_user(component: str) -> None:
    steps = _instructions(component)
    users = [arg for op, arg in steps if op == "USER"]
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["podUser"]
    assert users == [f"{values['runAsUser']}:{values['runAsGroup']}"]
    # The final instruction set must not switch back to root after USER.
    after_user = steps[[op for op, _ in steps].index("USER") :]
    assert all(op != "RUN" for op, _ in after_user)


@pytest.mark.parametrize(("component", "script"), sorted(IMAGES.items()))
def test_entry_point_is_a_declared_console_script(component: str, script: str) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entry = [arg for op, arg in _instructions(component) if op == "ENTRYPOINT"]
    assert entry == [f'["{script}"]'] and script in scripts


def test_build_context_keeps_what_the_images_copy() -> None:
    kept = {
        ln[1:].rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.startswith("!")
    }
    for component in IMAGES:
        for op, arg in _instructions(component):
            if op == "COPY" and not arg.startswith("--from"):
                sources = arg.split()[:-1]
                assert set(sources) <= kept, (component, sources)
