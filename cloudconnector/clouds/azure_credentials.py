"""Turn an Azure Endpoint's Secret into an IoT Hub registry connection string.

Two accepted shapes of Secret data:

- ``connectionString``: an IoT Hub connection string whose policy has registry write rights
  (``HostName=...;SharedAccessKeyName=...;SharedAccessKey=...``);
- a service principal: ``tenantId``, ``clientId``, ``clientSecret``, ``subscriptionId``,
  ``resourceGroup``, ``hubName``; azure-mgmt-iothub then reads a registry key of the hub. That
  path needs the optional extra ``cloud-connector[azure]`` and is imported only when used.

Nothing here logs or repeats the key; error messages name the missing or wrong field only.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field

from cloudconnector.errors import CredentialsError, PermanentError, TransientError, short
from cloudconnector.extras import require

SP_FIELDS = ("tenantId", "clientId", "clientSecret", "subscriptionId", "resourceGroup", "hubName")
# Policies that carry registry write rights on every hub, tried in this order.
_KEY_NAMES = ("registryReadWrite", "iothubowner")


@dataclass(frozen=True)
class RegistryCredentials:
    """A parsed registry connection string; ``repr`` hides the key."""

    host_name: str
    key_name: str
    key: str = field(repr=False)

    @property
    def connection_string(self) -> str:
        return f"HostName={self.host_name};SharedAccessKeyName={self.key_name};SharedAccessKey={self.key}"


def parse_connection_string(text: str) -> RegistryCredentials:
    parts: dict[str, str] = {}
    for item in text.strip().split(";"):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise CredentialsError("connectionString: every part must be Name=Value")
        parts[name.strip()] = value.strip()
    missing = [n for n in ("HostName", "SharedAccessKeyName", "SharedAccessKey") if not parts.get(n)]
    if missing:
        raise CredentialsError(
            f"connectionString: missing {', '.join(missing)} (a hub-level policy with registry write "
            "rights is needed, not a device connection string)"
        )
    if "DeviceId" in parts:
        raise CredentialsError("connectionString: this is a device connection string, not a hub policy")
    try:
        base64.b64decode(parts["SharedAccessKey"], validate=True)
    except (binascii.Error, ValueError):
        raise CredentialsError("connectionString: SharedAccessKey is not base64") from None
    return RegistryCredentials(parts["HostName"], parts["SharedAccessKeyName"], parts["SharedAccessKey"])


def registry_credentials(secret: Mapping[str, str], host_name: str) -> RegistryCredentials:
    """The registry credentials for the hub ``host_name`` from the Endpoint's Secret data."""
    if secret.get("connectionString"):
        creds = parse_connection_string(secret["connectionString"])
    elif any(secret.get(k) for k in SP_FIELDS):
        missing = [k for k in SP_FIELDS if not secret.get(k)]
        if missing:
            raise CredentialsError(f"service principal credentials lack {', '.join(missing)}")
        creds = registry_key_via_mgmt(secret)
    else:
        raise CredentialsError(
            "the credentials Secret needs connectionString, or a service principal: " + ", ".join(SP_FIELDS)
        )
    if creds.host_name.lower() != host_name.lower():
        raise CredentialsError(
            f"the credentials are for hub {creds.host_name}, but the Endpoint names {host_name}"
        )
    return creds


def registry_key_via_mgmt(secret: Mapping[str, str]) -> RegistryCredentials:  # pragma: no cover
    """Read a registry-write key of the hub through Azure Resource Manager (blocking call).

    Not exercised by the test suite: there is no ARM double here. Kept small on purpose.
    """
    require("service principal credentials", "azure", ("azure.identity", "azure.mgmt.iothub"))
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
    from azure.identity import ClientSecretCredential
    from azure.mgmt.iothub import IotHubClient

    credential = ClientSecretCredential(secret["tenantId"], secret["clientId"], secret["clientSecret"])
    client = IotHubClient(credential, secret["subscriptionId"])
    group, hub = secret["resourceGroup"], secret["hubName"]
    try:
        host = client.iot_hub_resource.get(group, hub).properties.host_name
        for key_name in _KEY_NAMES:
            try:
                rule = client.iot_hub_resource.get_keys_for_key_name(group, hub, key_name)
            except HttpResponseError as e:
                if e.status_code == 404:
                    continue
                raise
            return RegistryCredentials(host, rule.key_name, rule.primary_key)
    except ClientAuthenticationError as e:
        raise CredentialsError("the service principal was rejected by Azure") from e
    except HttpResponseError as e:
        if e.status_code in (401, 403):
            raise CredentialsError(
                f"the service principal may not read keys of hub {hub} ({e.status_code})"
            ) from e
        if e.status_code == 404:
            raise PermanentError(f"hub {hub} not found in resource group {group}") from e
        raise TransientError(f"Azure Resource Manager: {short(e.reason)}") from e
    finally:
        client.close()
        credential.close()
    raise CredentialsError(f"hub {hub} has none of the policies {', '.join(_KEY_NAMES)}")
