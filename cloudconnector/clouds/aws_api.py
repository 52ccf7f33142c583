"""One boto3 IoT client per Endpoint, called from asyncio, with AWS errors turned into ours.

boto3 is synchronous, so every call runs in a worker thread of the cloud calls' own pool (not
asyncio's default one, whose few threads would make the cloud's latency, not the Endpoint's rate
limit, decide how fast devices are provisioned, and which Vault requests share). Botocore's own
retries are switched off: throttling is retried here with full-jitter backoff so that the
waiting happens on the event loop (never in a thread) and so that running out of retries becomes
a :class:`TransientError` ("try this device again later"), never a failed device. Error texts
name the operation and the AWS error code only; request payloads and AWS messages (which may
quote request data) stay out.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from cloudconnector.errors import CredentialsError, PermanentError, TransientError, short
from cloudconnector.ratelimit import MAX_IN_FLIGHT, with_backoff

CALL_THREADS = MAX_IN_FLIGHT
"""Threads for AWS calls, process-wide: one per device an Endpoint may have in flight (each waits
for one answer at a time). A thread is started only when no idle one is free: a quiet operator
keeps few."""
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def call_executor() -> ThreadPoolExecutor:
    """The pool every :class:`IotApi` runs its blocking boto3 calls on."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=CALL_THREADS, thread_name_prefix="aws-call")
        return _executor


# AWS's answers to keys that are unknown, wrong, expired, revoked or lack a permission.
CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "AccessDenied",
        "AccessDeniedException",
        "UnauthorizedException",
        "AuthFailure",
    }
)
# The request was refused before it was carried out; the same request may succeed later.
THROTTLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "LimitExceededException",
    }
)
# The service failed: the request may or may not have been carried out.
UNAVAILABLE_CODES = frozenset(
    {
        "ServiceUnavailableException",
        "ServiceUnavailable",
        "InternalFailureException",
        "InternalServerException",
    }
)
# Eventual consistency after a detach: AWS may still see an attachment for a few seconds.
SETTLING_CODES = frozenset({"DeleteConflictException", "CertificateStateException"})


class _NoSecretsInBotocoreLogs(logging.Filter):
    """botocore logs, at DEBUG, whole response bodies (CreateKeysAndCertificate's holds the
    device's private key), signed requests (with a session token) and Authorization headers:
    such records are dropped, whatever the log level is set to."""

    MARKERS = ("response body", "security-token", "authorization")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().lower()
        return not any(m in text for m in self.MARKERS)


_GUARD = _NoSecretsInBotocoreLogs()
for _name in ("parsers", "auth", "endpoint", "hooks", "awsrequest", "httpsession", "retryhandler"):
    logging.getLogger(f"botocore.{_name}").addFilter(_GUARD)

CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# Every IoT action the provisioner may call: the IAM policy for the Endpoint's API keys.
REQUIRED_IAM_ACTIONS = tuple(
    f"iot:{a}"
    for a in (
        "DescribeEndpoint",
        "DescribeThing",
        "CreateThing",
        "DeleteThing",
        "CreatePolicy",
        "GetPolicy",
        "CreatePolicyVersion",
        "ListPolicyVersions",
        "DeletePolicyVersion",
        "DeletePolicy",
        "CreateKeysAndCertificate",
        "RegisterCertificateWithoutCA",
        "UpdateCertificate",
        "DeleteCertificate",
        "ListCertificates",
        "AttachPolicy",
        "DetachPolicy",
        "AttachThingPrincipal",
        "DetachThingPrincipal",
        "ListPrincipalThings",
        "ListAttachedPolicies",
    )
)


def iam_policy_document() -> dict[str, Any]:
    """The least IAM policy the Endpoint's API keys need (for docs and set-up scripts)."""
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": list(REQUIRED_IAM_ACTIONS), "Resource": "*"}],
    }


class AwsNotFound(PermanentError):
    """The named resource does not exist (any more); deleters treat it as success."""

    reason = "NotFound"


class AwsAlreadyExists(PermanentError):
    """A create call met an existing resource; AWS tells which one."""

    reason = "AlreadyExists"

    def __init__(self, message: str, resource_id: str | None, resource_arn: str | None) -> None:
        super().__init__(message)
        self.resource_id = resource_id
        self.resource_arn = resource_arn


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry throttled calls before giving the device back to the caller's queue."""

    attempts: int = 8
    base: float = 0.2
    cap: float = 10.0
    give_up_delay: float = 10.0  # the TransientError's suggested delay once attempts run out


def error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def http_status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_throttled(e: BaseException) -> bool:
    if not isinstance(e, ClientError):
        return False
    return error_code(e) in THROTTLE_CODES or http_status(e) == 429


def is_unavailable(e: BaseException) -> bool:
    """A server-side failure, or no answer at all: the call may have taken effect."""
    if isinstance(e, BotoCoreError):
        return not isinstance(e, NoCredentialsError | PartialCredentialsError)
    if not isinstance(e, ClientError):
        return False
    return error_code(e) in UNAVAILABLE_CODES or http_status(e) in (500, 502, 503, 504)


def is_rejected_credentials(e: ClientError) -> bool:
    # Some AWS front ends (and moto's IAM emulation) answer 401/403 in a format the JSON
    # parser cannot read, leaving only the status: for IoT's control plane both mean "auth".
    return error_code(e) in CREDENTIAL_CODES or http_status(e) in (401, 403)


def translate(operation: str, e: Exception) -> Exception:
    """Map a botocore failure to one of our error classes (the caller raises it ``from e``)."""
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return CredentialsError("no usable AWS credentials were configured for the Endpoint")
    if isinstance(e, BotoCoreError):
        # Connection refused, DNS, timeouts: the network or the service is not there right now.
        return TransientError(
            f"AWS IoT {operation} did not complete: {type(e).__name__}", reason="Unreachable"
        )
    if not isinstance(e, ClientError):
        return e
    code = error_code(e) or str(http_status(e))
    if is_rejected_credentials(e):
        return CredentialsError(
            f"AWS rejected the Endpoint's API credentials on {operation} ({code}): the keys are "
            "wrong, expired or revoked, or lack the IoT permission for this call"
        )
    if is_throttled(e):
        return TransientError(f"AWS IoT {operation} is throttled ({code})", reason="Throttled")
    if is_unavailable(e):
        return TransientError(f"AWS IoT {operation} failed at AWS ({code})", reason="Unavailable")
    if code in SETTLING_CODES:
        return TransientError(f"AWS IoT {operation} cannot run yet ({code})", reason="Settling", delay=2)
    if code == "ResourceNotFoundException":
        return AwsNotFound(f"AWS IoT {operation}: resource not found")
    if code == "ResourceAlreadyExistsException":
        err = e.response.get("Error", {})
        body: Mapping[str, Any] = e.response
        return AwsAlreadyExists(
            f"AWS IoT {operation}: resource already exists",
            resource_id=body.get("resourceId") or err.get("resourceId"),
            resource_arn=body.get("resourceArn") or err.get("resourceArn"),
        )
    return PermanentError(f"AWS IoT {operation} failed ({short(code, 80)})", reason="CloudRejected")


def credentials_from_secret(data: Mapping[str, str]) -> dict[str, str]:
    """boto3 keyword arguments from the Secret's data; empty data means boto3's default chain."""
    if not data:
        return {}
    missing = [k for k in CREDENTIAL_KEYS[:2] if not data.get(k)]
    if missing:
        raise CredentialsError(f"the credentials Secret lacks {', '.join(missing)}")
    kwargs = {
        "aws_access_key_id": data["AWS_ACCESS_KEY_ID"].strip(),
        "aws_secret_access_key": data["AWS_SECRET_ACCESS_KEY"].strip(),
    }
    if data.get("AWS_SESSION_TOKEN"):
        kwargs["aws_session_token"] = data["AWS_SESSION_TOKEN"].strip()
    return kwargs


class IotApi:
    """The AWS IoT control plane for one Endpoint: ``await api.call("create_thing", thingName=...)``."""

    def __init__(
        self,
        region: str,
        credentials: Mapping[str, str],
        *,
        endpoint_url: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.retry = retry or RetryPolicy()
        session = boto3.session.Session(region_name=region, **credentials_from_secret(credentials))
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # our backoff, not botocore's
            connect_timeout=timeout,
            read_timeout=timeout,
            max_pool_connections=CALL_THREADS,  # a kept connection for every calling thread
            # Every request is built here from parsed, validated models; botocore's own check of
            # each one against the service model costs about a tenth of a call's CPU.
            parameter_validation=False,
        )
        self._client = session.client("iot", endpoint_url=endpoint_url, config=config)
        self.used: set[str] = set()  # IAM action names called so far (see REQUIRED_IAM_ACTIONS)

    async def call(
        self,
        operation: str,
        *,
        tolerate: Collection[type[Exception]] = (),
        idempotent: bool = True,
        **params: Any,
    ) -> dict[str, Any]:
        """Run one API call; errors of a ``tolerate``d class become an empty answer.

        ``idempotent=False`` is for calls that create something each time they run: after a
        failure that may have taken effect (a 5xx, a lost answer) a second attempt could create
        a second resource, so only plain throttling is retried and the caller's resume logic
        deals with the rest.
        """
        method = getattr(self._client, operation)
        self.used.add(f"iot:{self._client.meta.method_to_api_mapping[operation]}")

        async def attempt() -> dict[str, Any]:
            # The caller's context (log fields naming the device) goes along into the thread.
            run = functools.partial(contextvars.copy_context().run, method, **params)
            result: dict[str, Any] = await asyncio.get_running_loop().run_in_executor(call_executor(), run)
            return result

        def retry_on(e: BaseException) -> bool:
            return is_throttled(e) or (idempotent and is_unavailable(e))

        try:
            return await with_backoff(
                attempt,
                retry_on=retry_on,
                attempts=self.retry.attempts,
                base=self.retry.base,
                cap=self.retry.cap,
            )
        except (ClientError, BotoCoreError) as e:
            err = translate(_camel(operation), e)
            if isinstance(err, TransientError) and err.reason in ("Throttled", "Unavailable", "Unreachable"):
                err.delay = self.retry.give_up_delay
            if any(isinstance(err, t) for t in tolerate):
                return {}
            raise err from e

    def close(self) -> None:
        self._client.close()


def _camel(operation: str) -> str:
    return "".join(part.capitalize() for part in operation.split("_"))
