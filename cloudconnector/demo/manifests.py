"""The demo's manifests: one AWS Endpoint on moto, one Group, N Devices with their own 127.x IPs."""

from __future__ import annotations

from pathlib import Path

import yaml

NAMESPACE = "demo"
ENDPOINT = "aws-local"
GROUP = "sensors"


def device_name(index: int) -> str:
    return f"sensor-{index:04d}"


def device_ip(index: int) -> str:
    """127.10.x.y: one loopback address per device (Linux routes all of 127/8 to lo)."""
    return f"127.10.{index // 250}.{index % 250 + 2}"


def iccid(index: int) -> str:
    return f"8999100{index:012d}"


def write_manifests(directory: Path, moto_url: str, broker_ca_pem: str, devices: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    api = "cloudconnector.io/v1alpha1"
    infra = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "aws-iam", "namespace": NAMESPACE},
            # moto accepts any key; a real account's would go here (or in the environment).
            "stringData": {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo"},
        },
        {
            "apiVersion": api,
            "kind": "Endpoint",
            "metadata": {"name": ENDPOINT, "namespace": NAMESPACE},
            "spec": {
                "type": "AwsIotCore",
                "port": 8883,
                "caCertificate": broker_ca_pem,
                "aws": {
                    "region": "eu-west-1",
                    "endpointUrl": moto_url,
                    "dataEndpoint": "127.0.0.1",
                    "credentialsSecretRef": {"name": "aws-iam"},
                },
            },
        },
        {
            "apiVersion": api,
            "kind": "Group",
            "metadata": {"name": GROUP, "namespace": NAMESPACE},
            "spec": {"endpointRef": {"name": ENDPOINT}},
        },
    ]
    (directory / "endpoint.yaml").write_text(yaml.safe_dump_all(infra, sort_keys=False))
    docs = [
        {
            "apiVersion": api,
            "kind": "Device",
            "metadata": {"name": device_name(i), "namespace": NAMESPACE},
            "spec": {"group": GROUP, "sim": {"iccid": iccid(i)}, "ip": device_ip(i)},
        }
        for i in range(devices)
    ]
    (directory / "devices.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
