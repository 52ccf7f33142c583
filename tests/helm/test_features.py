"""What each value switches on shows up in the rendered objects: the device Service, scaling,
peering, the 8883 certificate, Vault settings and monitoring."""

from __future__ import annotations

from tests.helm.chart import Rendered, env_of

PROXY = "cc-cloud-connector-proxy"
OPERATOR = "cc-cloud-connector-operator"


def _container(rendered: Rendered, deployment: str) -> dict:
    return rendered.one("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def test_default_service_keeps_device_addresses(renderings: dict[str, Rendered]) -> None:
    svc = renderings["defaults"].one("Service", PROXY)["spec"]
    assert svc["type"] == "LoadBalancer"
    assert svc["externalTrafficPolicy"] == "Local"
    assert [(p["name"], p["port"]) for p in svc["ports"]] == [("mqtt", 1883), ("mqtts", 8883)]


def test_fixed_address_through_the_load_balancer(renderings: dict[str, Rendered]) -> None:
    r = renderings["production"]
    svc = r.one("Service", PROXY)
    assert svc["spec"]["loadBalancerIP"] == "198.18.8.3"
    assert svc["metadata"]["annotations"] == {
        "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"
    }
    env = env_of(_container(r, PROXY))
    # The PROXY protocol switch reaches the proxy as the list of sources that must send a header.
    assert env["CC_PROXY_TRUSTED_PROXIES"] == "10.96.0.0/24"
    assert env["CC_PROXY_IDENTITY"] == "ip,username"
    assert env_of(_container(renderings["defaults"], PROXY))["CC_PROXY_TRUSTED_PROXIES"] == ""


def test_fixed_address_on_bare_metal(renderings: dict[str, Rendered]) -> None:
    r = renderings["bare-metal"]
    svc = r.one("Service", PROXY)["spec"]
    assert svc["type"] == "NodePort"
    assert svc["externalIPs"] == ["198.18.8.3"]
    assert svc["externalTrafficPolicy"] == "Local"
    assert [p["port"] for p in svc["ports"]] == [8883]  # plain MQTT switched off
    container = _container(r, PROXY)
    assert env_of(container)["CC_PROXY_MQTT_PORT"] == "off"
    assert [p["name"] for p in container["ports"]] == ["mqtts", "http"]
    assert container["image"] == "registry.example.net/mirror/ghcr.io/cloud-connector/proxy:0.1.0"


def test_proxy_scaling_and_disruption(renderings: dict[str, Rendered]) -> None:
    defaults = renderings["defaults"]
    assert defaults.one("Deployment", PROXY)["spec"]["replicas"] == 2
    assert defaults.of_kind("HorizontalPodAutoscaler") == []
    assert defaults.one("PodDisruptionBudget", PROXY)["spec"]["maxUnavailable"] == 1
    spread = defaults.one("Deployment", PROXY)["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]

    prod = renderings["production"]
    hpa = prod.one("HorizontalPodAutoscaler", PROXY)["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": PROXY}
    # With an HPA the Deployment leaves the replica count alone, so upgrades do not reset it.
    assert "replicas" not in prod.one("Deployment", PROXY)["spec"]


def test_one_operator_without_peering(renderings: dict[str, Rendered]) -> None:
    r = renderings["defaults"]
    spec = r.one("Deployment", OPERATOR)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}  # never two at once during a rollout
    assert env_of(_container(r, OPERATOR))["CLOUDCONNECTOR_PEERING"] == "off"
    assert r.of_kind("ClusterKopfPeering") == [] and r.of_kind("KopfPeering") == []


def test_standby_operator_with_peering(renderings: dict[str, Rendered]) -> None:
    r = renderings["production"]
    spec = r.one("Deployment", OPERATOR)["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    env = env_of(_container(r, OPERATOR))
    assert env["CLOUDCONNECTOR_PEERING"] == "cloud-connector"
    assert env["CLOUDCONNECTOR_NAMESPACES"] == "fleet,lab"
    # A namespaced operator peers through a KopfPeering in each namespace it watches.
    peerings = r.of_kind("KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["fleet", "lab"]
    assert {p["metadata"]["name"] for p in peerings} == {"cloud-connector"}
    # The pod name is kopf's peer identity.
    pod_id = next(e for e in _container(r, OPERATOR)["env"] if e["name"] == "POD_ID")
    assert pod_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_server_certificate_from_a_secret(renderings: dict[str, Rendered]) -> None:
    r = renderings["defaults"]
    volumes = r.one("Deployment", PROXY)["spec"]["template"]["spec"]["volumes"]
    tls = next(v for v in volumes if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "cc-cloud-connector-proxy-tls"
    mount = next(m for m in _container(r, PROXY)["volumeMounts"] if m["name"] == "tls")
    assert "subPath" not in mount  # a renewed certificate must appear in the running pod
    env = env_of(_container(r, PROXY))
    assert env["CC_PROXY_TLS_CERT_FILE"] == mount["mountPath"] + "/tls.crt"
    assert env["CC_PROXY_TLS_KEY_FILE"] == mount["mountPath"] + "/tls.key"
    assert r.of_kind("Certificate") == []


def test_server_certificate_from_cert_manager(renderings: dict[str, Rendered]) -> None:
    r = renderings["production"]
    cert = r.one("Certificate", PROXY)["spec"]
    assert cert["secretName"] == "cc-cloud-connector-proxy-tls"
    assert cert["dnsNames"] == ["mqtt.iot.example.net"] and cert["ipAddresses"] == ["198.18.8.3"]
    assert cert["issuerRef"] == {"name": "private-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def test_vault_settings_reach_both_components(renderings: dict[str, Rendered]) -> None:
    r = renderings["production"]
    for deployment, role in ((OPERATOR, "cloud-connector-operator"), (PROXY, "cloud-connector-proxy")):
        container = _container(r, deployment)
        env = env_of(container)
        assert env["VAULT_ADDR"] == "https://vault.vault.svc:8200"
        assert env["CLOUDCONNECTOR_VAULT_ROLE"] == role
        assert env["CLOUDCONNECTOR_VAULT_AUTH"] == "kubernetes"
        assert env["VAULT_CACERT"] == "/etc/cloud-connector/vault-ca/ca.crt"
        assert env["CLOUDCONNECTOR_VAULT_JWT_FILE"] == "/var/run/secrets/vault/token"
        pod = r.one("Deployment", deployment)["spec"]["template"]["spec"]
        projected = next(v for v in pod["volumes"] if v["name"] == "vault-token")["projected"]
        assert projected["sources"][0]["serviceAccountToken"]["audience"] == "vault"
        ca = next(v for v in pod["volumes"] if v["name"] == "vault-ca")
        assert ca["secret"]["secretName"] == "vault-ca"


def test_vault_token_login_reads_a_secret(renderings: dict[str, Rendered]) -> None:
    r = renderings["bare-metal"]
    for deployment, secret in ((OPERATOR, "vault-token-operator"), (PROXY, "vault-token-proxy")):
        token = next(e for e in _container(r, deployment)["env"] if e["name"] == "VAULT_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "token"}
    # Inline CA: the chart makes the ConfigMap the pods mount.
    assert r.one("ConfigMap", "cc-cloud-connector-vault-ca")["data"]["ca.crt"].startswith("-----BEGIN")
    delegator = r.one("ClusterRoleBinding", "cc-cloud-connector-vault-auth-delegator")
    assert delegator["roleRef"]["name"] == "system:auth-delegator"
    assert {s["name"] for s in delegator["subjects"]} == {OPERATOR, PROXY}


def test_service_monitor_scrapes_the_metrics_service(renderings: dict[str, Rendered]) -> None:
    r = renderings["production"]
    monitor = r.one("ServiceMonitor", PROXY)
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    metrics = r.one("Service", PROXY + "-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    assert renderings["defaults"].of_kind("ServiceMonitor") == []


def test_operator_only_install(renderings: dict[str, Rendered]) -> None:
    r = renderings["operator-only"]
    assert [d["metadata"]["name"] for d in r.of_kind("Deployment")] == [OPERATOR]
    assert r.of_kind("Service") == []
    image = _container(r, OPERATOR)["image"]
    assert image == "ghcr.io/cloud-connector/operator@sha256:" + "ab" * 32
    env = env_of(_container(r, OPERATOR))
    assert (env["CLOUDCONNECTOR_VAULT_AUTH"], env["CLOUDCONNECTOR_VAULT_AUTH_MOUNT"]) == ("jwt", "jwt-k8s")
