"""The cloud steps of a provisioning run, read off a provisioner's progress record.

Each provisioner checkpoints its progress after every step (see :mod:`cloudconnector.clouds.base`);
this module names the steps that record says are done, so that the reconciler can post one event
per step and show the latest in ``status.step`` (a ``kubectl get ccd -w`` column) without the
provisioners knowing about either. Progress written before a crash counts as done: a resumed run
posts events only for steps it completes itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Step = tuple[str, str]
"""(reason, message): the reason is the event reason and the ``status.step`` value."""


def _slot(progress: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    slot = progress.get(name)
    return slot if isinstance(slot, Mapping) else {}


def _aws(p: Mapping[str, Any]) -> list[Step]:
    done: list[Step] = []
    if p.get("thingArn"):
        how = "found, kept as the user's" if p.get("thingOwned") is False else "created"
        done.append(("ThingCreated", f"thing {p.get('thingName')} {how}"))
    if p.get("policyReady"):
        done.append(("PolicyCreated", f"policy {p.get('policyName')} in place"))
    cert = _slot(p, "certificate")
    if cert.get("id") and cert.get("registered") is not False:
        done.append(("CertificateCreated", f"certificate {str(cert['id'])[:16]} registered"))
    if cert.get("active"):
        done.append(("CertificateActivated", f"certificate {str(cert['id'])[:16]} attached and active"))
    if cert.get("stored"):
        done.append(("KeyStored", f"certificate and key stored at {cert.get('keyLocation')}"))
    return done


def _azure(p: Mapping[str, Any]) -> list[Step]:
    done: list[Step] = []
    if p.get("step") in ("stored", "done"):
        done.append(("KeyStored", f"certificate and key stored at {p.get('keyLocation')}"))
    if p.get("step") == "done":
        done.append(("DeviceRegistered", f"device {p.get('deviceId')} registered by its thumbprint"))
    return done


def completed(progress: Mapping[str, Any] | None) -> list[Step]:
    """The steps ``progress`` records as done, in the order they happen."""
    p = progress if isinstance(progress, Mapping) else {}
    if "thingName" in p or "certificate" in p:
        return _aws(p)
    if "deviceId" in p:
        return _azure(p)
    if p.get("keyLocation") or _slot(p, "certificate").get("stored"):
        return [("KeyStored", f"credentials stored at {p.get('keyLocation')}")]
    return []


def new_steps(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[Step]:
    """Steps done in ``after`` that were not done in ``before``."""
    seen = {reason for reason, _ in completed(before)}
    return [step for step in completed(after) if step[0] not in seen]
