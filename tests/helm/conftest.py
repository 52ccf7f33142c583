"""Fixtures for the chart tests: the chart is loaded once, each scenario rendered once."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python
import pytest

from tests.helm.chart import SCENARIOS, Rendered, load, render


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    with load() as loaded:
        yield loaded


@pytest.fixture(scope="session")
def renderings(chart: helm_python.Chart) -> dict[str, Rendered]:
    return {name: render(chart, values) for name, values in SCENARIOS.items()}


@pytest.fixture(params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rendered(renderings: dict[str, Rendered], scenario: str) -> Rendered:
    return renderings[scenario]
