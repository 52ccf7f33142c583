# Cloud Connector operator: stores device credentials but can never read them back.

# Write device secrets (new versions); no read.
path "secret/data/cloud-connector/*" {
  capabilities = ["create", "update"]
}

# Non-secret facts for resume checks; delete removes every version.
path "secret/metadata/cloud-connector/*" {
  capabilities = ["create", "update", "read", "delete"]
}

# Each device's own key: create, config, delete.
path "transit/keys/cc-*" {
  capabilities = ["create", "update", "delete"]
}

# Encrypt with a device key; there is no decrypt grant.
path "transit/encrypt/cc-*" {
  capabilities = ["update"]
}
