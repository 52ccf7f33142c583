import boto3
import hvac


def test_bao_and_moto_are_real_servers(bao, moto_server):
    client = hvac.Client(url=bao.url, token=bao.token)
    assert client.sys.is_initialized()
    iot = boto3.client(
        "iot",
        region_name="eu-west-1",
        endpoint_url=moto_server.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    iot.create_thing(thingName="smoke")
    assert [t["thingName"] for t in iot.list_things()["things"]] == ["smoke"]
    moto_server.reset()
    assert iot.list_things()["things"] == []
