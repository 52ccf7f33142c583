"""Provisioning devices on AWS IoT Core (moto over HTTP) with keys in the real Vault store."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from typing import Any

from cloudconnector.clouds.aws_policy import THING_VARIABLE, policy_name
from cloudconnector.clouds.certs import cert_info, validate_material
from tests.aws.conftest import Recorder, fake_credentials, iot_inventory, make_device


async def test_check_resolves_the_ats_data_endpoint(make_provisioner: Any) -> None:
    info = await make_provisioner().check()
    assert info.host.endswith("-ats.iot.eu-west-1.amazonaws.com")
    assert info.port == 8883


async def test_check_honours_a_data_endpoint_override(make_provisioner: Any) -> None:
    info = await make_provisioner(dataEndpoint="iot.example.internal").check()
    assert info.host == "iot.example.internal"


async def test_n_devices_get_thing_policy_and_active_attached_certificate(
    make_provisioner: Any, iot: Any, keys: Any, reader: Any, namespace: str
) -> None:
    prov = make_provisioner()
    devices = [make_device(namespace, i) for i in range(5)]
    identities = await asyncio.gather(*(prov.provision(d, {}, Recorder(), keys) for d in devices))

    inv = iot_inventory(iot)
    assert inv["things"] == sorted(d.cloud_id for d in devices)
    assert sorted(inv["certs"].values()) == ["ACTIVE"] * 5
    assert inv["policies"] == sorted(policy_name(d.cloud_id) for d in devices)
    for device, ident in zip(devices, identities, strict=True):
        assert ident.cloud_id == device.cloud_id == f"{namespace}_{device.ref.name}"
        assert iot.list_thing_principals(thingName=device.cloud_id)["principals"] == [ident.certificate_arn]
        attached = iot.list_attached_policies(target=ident.certificate_arn)["policies"]
        assert [p["policyName"] for p in attached] == [ident.policy_name]
        # What the proxy will read is the certificate AWS holds, with a key that matches it.
        material = await reader.get(device.ref)
        aws_pem = iot.describe_certificate(certificateId=ident.certificate_id)["certificateDescription"]
        assert material.certificate_pem == aws_pem["certificatePem"]
        info = validate_material(material.certificate_pem, material.private_key_pem)
        assert ident.thumbprint == info.sha256 == cert_info(aws_pem["certificatePem"]).sha256
        assert ident.not_after == info.not_after
        assert ident.key_location == f"vault:secret/cloud-connector/{namespace}/{device.ref.name}"
        stored = await keys.describe(device.ref)
        assert stored.metadata["certificateId"] == ident.certificate_id
        assert stored.metadata["certificateArn"] == ident.certificate_arn


async def test_thing_records_the_sim(make_provisioner: Any, iot: Any, keys: Any, namespace: str) -> None:
    device = make_device(namespace, 3)
    await make_provisioner().provision(device, {}, Recorder(), keys)
    attributes = iot.describe_thing(thingName=device.cloud_id)["attributes"]
    assert attributes == {"iccid": device.iccid, "managedBy": "cloud-connector"}


async def test_default_policy_is_least_privilege(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    prov = make_provisioner(policy={"publishTopics": ["telemetry/${iot:Connection.Thing.ThingName}"]})
    ident = await prov.provision(make_device(namespace, 1), {}, Recorder(), keys)
    doc = json.loads(iot.get_policy(policyName=ident.policy_name)["policyDocument"])
    by_action = {s["Action"]: s for s in doc["Statement"]}
    assert set(by_action) == {"iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive"}
    assert all(s["Effect"] == "Allow" for s in doc["Statement"])
    account_prefix = ident.certificate_arn.split(":cert/")[0]
    connect = by_action["iot:Connect"]
    assert connect["Resource"] == f"{account_prefix}:client/{THING_VARIABLE}"
    assert connect["Condition"] == {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}
    assert by_action["iot:Publish"]["Resource"] == [f"{account_prefix}:topic/telemetry/{THING_VARIABLE}"]
    assert by_action["iot:Subscribe"]["Resource"] == [f"{account_prefix}:topicfilter/{THING_VARIABLE}/*"]
    assert by_action["iot:Receive"]["Resource"] == [f"{account_prefix}:topic/{THING_VARIABLE}/*"]
    assert "*" not in json.dumps([s["Resource"] for s in doc["Statement"]]).replace("/*", "")


async def test_allow_all_policy_only_on_request(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    prov = make_provisioner(policy={"mode": "AllowAll"})
    ident = await prov.provision(make_device(namespace, 1), {}, Recorder(), keys)
    doc = json.loads(iot.get_policy(policyName=ident.policy_name)["policyDocument"])
    assert doc["Statement"] == [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]


async def test_provisioning_again_changes_nothing(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    prov = make_provisioner()
    device = make_device(namespace, 7)
    saved = Recorder()
    first = await prov.provision(device, {}, saved, keys)
    before = iot_inventory(iot)
    again = Recorder()
    second = await prov.provision(device, saved.last, again, keys)
    assert second == first
    assert iot_inventory(iot) == before
    assert again.saved == []  # nothing was left to record


async def test_policy_mode_change_replaces_the_document(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    device = make_device(namespace, 2)
    ident = await make_provisioner().provision(device, {}, Recorder(), keys)
    # Progress lost (e.g. status wiped): the per-device policy exists and must be brought up to date.
    await make_provisioner(policy={"mode": "AllowAll"}).provision(device, {}, Recorder(), keys)
    doc = json.loads(iot.get_policy(policyName=ident.policy_name)["policyDocument"])
    assert doc["Statement"][0]["Action"] == "iot:*"
    versions = iot.list_policy_versions(policyName=ident.policy_name)["policyVersions"]
    assert len(versions) == 1


async def test_private_key_never_reaches_the_logs(
    make_provisioner: Any, keys: Any, reader: Any, namespace: str, caplog: Any
) -> None:
    """Even with every logger at DEBUG (botocore logs response bodies there)."""
    caplog.set_level(logging.DEBUG)
    device = make_device(namespace, 1)
    creds = fake_credentials() | {"AWS_SESSION_TOKEN": "session-" + uuid.uuid4().hex}
    await make_provisioner(credentials=creds).provision(device, {}, Recorder(), keys)
    key = (await reader.get(device.ref)).private_key_pem.decode()
    body = "".join(key.strip().splitlines()[1:-1])
    assert "CreateKeysAndCertificate" in caplog.text or "keys-and-certificate" in caplog.text
    flat = caplog.text.replace("\\n", "").replace("\n", "")
    assert body[:64] not in flat
    assert creds["AWS_SESSION_TOKEN"] not in flat
    assert creds["AWS_SECRET_ACCESS_KEY"] not in flat


async def test_a_groups_topic_template_shapes_the_default_policy(
    make_provisioner: Any, iot: Any, keys: Any, namespace: str
) -> None:
    # The reconciler hands the provisioner the Group's template (core/device.py): the policy
    # then allows what the proxy will publish for a device of that Group, and nothing else.
    device = dataclasses.replace(make_device(namespace, 7), topic_template="site/{group}/{cloudId}/")
    ident = await make_provisioner().provision(device, {}, Recorder(), keys)
    doc = json.loads(iot.get_policy(policyName=ident.policy_name)["policyDocument"])
    by_action = {s["Action"]: s for s in doc["Statement"]}
    account_prefix = ident.certificate_arn.split(":cert/")[0]
    below = f"site/*/{THING_VARIABLE}/*"
    assert by_action["iot:Publish"]["Resource"] == [f"{account_prefix}:topic/{below}"]
    assert by_action["iot:Subscribe"]["Resource"] == [f"{account_prefix}:topicfilter/{below}"]
