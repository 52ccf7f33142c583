"""How the operator configures kopf: storage prefixes and the active/standby pair."""

from __future__ import annotations

import kopf

from cloudconnector.operator.config import OperatorConfig
from cloudconnector.operator.main import configure


def _configured(config: OperatorConfig) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    configure(settings, config)
    return settings


def test_two_replicas_get_distinct_peering_priorities() -> None:
    # kopf lets equal-priority peers run side by side; distinct ones leave exactly one active.
    priorities = {_configured(OperatorConfig(peering="cc")).peering.priority for _ in range(20)}
    assert len(priorities) == 20 and min(priorities) > 0


def test_peering_off_runs_standalone() -> None:
    settings = _configured(OperatorConfig(peering=None))
    assert settings.peering.standalone


def test_kopf_state_is_kept_away_from_the_rotate_annotation() -> None:
    # kopf skips annotations under its own storage prefix when diffing; the rotate annotation
    # (cloudconnector.io/rotate) must stay visible as a change.
    settings = _configured(OperatorConfig(peering=None))
    assert settings.persistence.finalizer == "cloudconnector.io/cloud-identity"
    assert settings.persistence.progress_storage.prefix == "kopf.cloudconnector.io"
