"""Which provisioner serves an Endpoint: the one place that maps ``spec.type`` to a cloud.

Cloud modules are imported only when an Endpoint of their type appears, so a deployment that
never talks to Azure never imports the Azure SDK.
"""

from __future__ import annotations

from collections.abc import Mapping

from cloudconnector.clouds.base import Provisioner
from cloudconnector.extras import require
from cloudconnector.model import Endpoint, EndpointType
from cloudconnector.ratelimit import RateLimiter


def make_provisioner(endpoint: Endpoint, credentials: Mapping[str, str], limiter: RateLimiter) -> Provisioner:
    """Build the provisioner for ``endpoint``; ``credentials`` is its API Secret's data."""
    if endpoint.type is EndpointType.AWS:
        require("AwsIotCore endpoints", "aws", ("boto3",))
        from cloudconnector.clouds.aws import AwsIotProvisioner

        return AwsIotProvisioner(endpoint, credentials, limiter)
    if endpoint.type is EndpointType.AZURE:
        # AzureIotHub: the registry side lives in clouds/azure.py (owned by the Azure work).
        from cloudconnector.clouds.azure import AzureIotHubProvisioner

        return AzureIotHubProvisioner(endpoint, credentials, limiter)
    if endpoint.type is EndpointType.MQTT:
        # No registry to talk to: the broker's credentials are the Device's own (manual) ones.
        from cloudconnector.clouds.mqtt import MqttBrokerProvisioner

        return MqttBrokerProvisioner(endpoint, limiter)
    raise AssertionError(f"unhandled endpoint type {endpoint.type!r}")
