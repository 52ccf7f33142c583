"""The few error classes that cross module boundaries.

Third-party failures (boto3, hvac, HTTP) are wrapped into these with ``raise ... from e`` so that
callers decide between "retry later" and "needs a human" without knowing which library failed.
Messages must never include key material, tokens or request payloads.
"""


class ConnectorError(Exception):
    """Base class; ``reason`` is a machine word for status conditions."""

    reason: str = "Error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class TransientError(ConnectorError):
    """Worth retrying as is: throttling, a service down, a network fault."""

    reason = "Unavailable"

    def __init__(self, message: str, *, reason: str | None = None, delay: float = 5.0) -> None:
        super().__init__(message, reason=reason)
        self.delay = delay


class PermanentError(ConnectorError):
    """Retrying the same input cannot help: bad spec, bad manual credentials, missing rights."""

    reason = "Invalid"


class CredentialsError(PermanentError):
    """The cloud API keys are missing, wrong or revoked."""

    reason = "CredentialsRejected"


class InvalidSpec(PermanentError):
    """A resource's spec does not make sense; ``field`` names the offending field path."""

    reason = "InvalidSpec"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def short(text: object, limit: int = 300) -> str:
    """Truncate third-party error text so that no large payload ends up in a log or a condition."""
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"
