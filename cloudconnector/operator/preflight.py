"""Before kopf starts: can this operator work here at all?

kopf waits quietly, forever, for a resource that is not installed and retries watches it may not
make. An operator that cannot work should say so at once, in one line, and exit: the CRDs are
missing (``kubectl apply -f crds/``), the kopf peering CRDs are missing while peering is on, or
its account may not list, watch or patch what it handles (the chart's RBAC, or the namespaces
it was told to watch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from cloudconnector import api
from cloudconnector.kube import KubeClient, Resource
from cloudconnector.kube.client import KubeError
from cloudconnector.operator.config import OperatorConfig

KOPF_PEERINGS = Resource("kopf.dev", "v1", "kopfpeerings")
CLUSTER_KOPF_PEERINGS = Resource("kopf.dev", "v1", "clusterkopfpeerings")
ACCESS_REVIEW = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
VERBS = ("list", "watch", "patch")


@dataclass(frozen=True)
class CannotStart(Exception):
    """Why the operator cannot work, in one line that says what to do."""

    message: str

    def __str__(self) -> str:
        return self.message


def _scopes(config: OperatorConfig) -> list[str | None]:
    # Globs are resolved by kopf's namespace scanning; only plain names can be checked up front.
    plain = [n for n in config.namespaces if not any(c in n for c in "*?[!")]
    return list(plain) if config.namespaces else [None]


def _where(namespace: str | None) -> str:
    return f"in namespace {namespace}" if namespace else "cluster-wide"


async def _list(kube: KubeClient, res: Resource, namespace: str | None) -> None:
    await kube.request("GET", res.path(namespace), params={"limit": "1"})


async def _allowed(
    kube: KubeClient, resource: str, group: str, verb: str, namespace: str | None
) -> bool | None:
    """The API server's own answer for this account; None where none can be had (an emulator)."""
    attrs = {"group": group, "resource": resource, "verb": verb}
    if namespace:
        attrs["namespace"] = namespace
    body = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attrs},
    }
    try:
        answer = await kube.request("POST", ACCESS_REVIEW, body=body)
    except KubeError:
        return None  # no verdict to be had: kopf will report what it meets itself
    verdict = ((answer or {}).get("status") or {}).get("allowed")
    return verdict if isinstance(verdict, bool) else None  # an API that only echoes the request


async def check(kube: KubeClient, config: OperatorConfig) -> None:
    """Raise :class:`CannotStart` naming the first thing that keeps the operator from working.

    The questions go out together (a restarted operator should not start later for asking), and
    the answers are judged in a fixed order, so the line names the same problem every time.
    """
    resources = [Resource(api.GROUP, api.VERSION, plural) for plural in api.PLURALS.values()]
    peering: Iterable[Resource] = ()
    if config.peering is not None:
        peering = [KOPF_PEERINGS] if config.namespaces else [CLUSTER_KOPF_PEERINGS]
    lists = [(res, namespace) for namespace in _scopes(config) for res in [*resources, *peering]]
    answers = await asyncio.gather(
        *(_list(kube, res, None if res is CLUSTER_KOPF_PEERINGS else ns) for res, ns in lists),
        return_exceptions=True,
    )
    for (res, namespace), answer in zip(lists, answers, strict=True):
        if isinstance(answer, KubeError):
            if answer.status == 0 or answer.status >= 500:
                raise answer  # the API is not reachable (yet): the caller retries
            raise _explain(answer, res, namespace, config) from None
        if isinstance(answer, BaseException):
            raise answer
    reviews = [(res, verb, ns) for ns in _scopes(config) for res in resources for verb in VERBS]
    verdicts = await asyncio.gather(*(_allowed(kube, r.plural, r.group, v, ns) for r, v, ns in reviews))
    for (res, verb, namespace), allowed in zip(reviews, verdicts, strict=True):
        if allowed is False:
            raise CannotStart(
                f"not allowed to {verb} {res.plural}.{res.group} {_where(namespace)}: grant the "
                "operator's ServiceAccount the chart's RBAC (operator-rbac.yaml)"
            )


def _explain(e: KubeError, res: Resource, namespace: str | None, config: OperatorConfig) -> CannotStart:
    name = f"{res.plural}.{res.group}"
    if e.status == 404 and res.group == "kopf.dev":
        return CannotStart(
            f"peering is on (CLOUDCONNECTOR_PEERING={config.peering}) but the CRD {name} is not "
            "installed: kubectl apply -f helm/cloud-connector/crds/kopf-peering.yaml, or set "
            "CLOUDCONNECTOR_PEERING=off"
        )
    if e.status == 404:
        return CannotStart(f"the CRD {name} is not installed: kubectl apply -f crds/")
    if e.status in (401, 403):
        return CannotStart(
            f"not allowed to list {name} {_where(namespace)} (HTTP {e.status}): grant the operator's "
            "ServiceAccount the chart's RBAC, or set CLOUDCONNECTOR_NAMESPACES to namespaces it may use"
        )
    return CannotStart(f"listing {name} {_where(namespace)} was refused: {e}")
