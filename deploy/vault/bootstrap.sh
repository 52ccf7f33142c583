#!/bin/sh
# Prepare Vault or OpenBao for Cloud Connector; safe to run again.
#
# Needs an admin token (VAULT_ADDR/VAULT_TOKEN or BAO_ADDR/BAO_TOKEN) and the `bao` or `vault` CLI.
# Enables KV v2 and transit when missing, writes the operator and proxy policies from this folder
# and, when CC_KUBERNETES_AUTH=1, enables Kubernetes auth with one role per component.
#
# Settings (environment, defaults in brackets):
#   VAULT_CLI                          CLI to use [bao, else vault]
#   CLOUDCONNECTOR_VAULT_KV_MOUNT      KV v2 mount [secret]
#   CLOUDCONNECTOR_VAULT_PREFIX        path prefix inside it [cloud-connector]
#   CLOUDCONNECTOR_VAULT_TRANSIT_MOUNT transit mount [transit]
#   CC_KUBERNETES_AUTH                 1 to configure auth/kubernetes [0]
#   CC_KUBERNETES_HOST                 API server URL as seen from Vault [https://kubernetes.default.svc]
#   CC_KUBERNETES_CA_FILE              API server CA, when Vault runs outside the cluster [in-cluster CA]
#   CC_NAMESPACE                       namespace of the release [cloud-connector]
#   CC_OPERATOR_SA / CC_PROXY_SA       service accounts [cloud-connector-operator / cloud-connector-proxy]
#   CC_OPERATOR_ROLE / CC_PROXY_ROLE   Vault role names [cloud-connector-operator / cloud-connector-proxy]
set -eu

here=$(cd "$(dirname "$0")" && pwd)
cli=${VAULT_CLI:-$(command -v bao || command -v vault || true)}
[ -n "$cli" ] || { echo "bootstrap: neither bao nor vault is installed" >&2; exit 2; }

# The bao CLI reads BAO_*, the vault CLI VAULT_*; accept either.
export BAO_ADDR="${BAO_ADDR:-${VAULT_ADDR:-}}" VAULT_ADDR="${VAULT_ADDR:-${BAO_ADDR:-}}"
export BAO_TOKEN="${BAO_TOKEN:-${VAULT_TOKEN:-}}" VAULT_TOKEN="${VAULT_TOKEN:-${BAO_TOKEN:-}}"
export BAO_CACERT="${BAO_CACERT:-${VAULT_CACERT:-}}" VAULT_CACERT="${VAULT_CACERT:-${BAO_CACERT:-}}"

kv=${CLOUDCONNECTOR_VAULT_KV_MOUNT:-secret}
prefix=${CLOUDCONNECTOR_VAULT_PREFIX:-cloud-connector}
transit=${CLOUDCONNECTOR_VAULT_TRANSIT_MOUNT:-transit}

mounted() { "$cli" read -format=json "sys/mounts/$1" >/dev/null 2>&1; }

if mounted "$kv"; then
    echo "bootstrap: $kv/ already mounted (it must be KV version 2)"
else
    "$cli" secrets enable -path="$kv" -version=2 kv
fi
if mounted "$transit"; then
    echo "bootstrap: $transit/ already mounted"
else
    "$cli" secrets enable -path="$transit" transit
fi

# The policy files are written for the default layout; rewrite the path prefixes for another one.
render() {
    sed -e "s#\"secret/data/cloud-connector/#\"$kv/data/$prefix/#" \
        -e "s#\"secret/metadata/cloud-connector/#\"$kv/metadata/$prefix/#" \
        -e "s#\"transit/#\"$transit/#" "$here/$1"
}
render operator.hcl | "$cli" policy write cloud-connector-operator -
render proxy.hcl | "$cli" policy write cloud-connector-proxy -

if [ "${CC_KUBERNETES_AUTH:-0}" = 1 ]; then
    ns=${CC_NAMESPACE:-cloud-connector}
    "$cli" auth list -format=json | grep -q '"kubernetes/"' || "$cli" auth enable kubernetes
    if [ -n "${CC_KUBERNETES_CA_FILE:-}" ]; then
        # Vault outside the cluster: trust this CA and review each login with the caller's own JWT.
        "$cli" write auth/kubernetes/config kubernetes_host="${CC_KUBERNETES_HOST:-https://kubernetes.default.svc}" \
            kubernetes_ca_cert=@"$CC_KUBERNETES_CA_FILE" disable_local_ca_jwt=true
    else
        "$cli" write auth/kubernetes/config kubernetes_host="${CC_KUBERNETES_HOST:-https://kubernetes.default.svc}"
    fi
    "$cli" write "auth/kubernetes/role/${CC_OPERATOR_ROLE:-cloud-connector-operator}" \
        bound_service_account_names="${CC_OPERATOR_SA:-cloud-connector-operator}" \
        bound_service_account_namespaces="$ns" token_policies=cloud-connector-operator token_ttl=1h
    "$cli" write "auth/kubernetes/role/${CC_PROXY_ROLE:-cloud-connector-proxy}" \
        bound_service_account_names="${CC_PROXY_SA:-cloud-connector-proxy}" \
        bound_service_account_namespaces="$ns" token_policies=cloud-connector-proxy token_ttl=1h
fi
echo "bootstrap: done"
