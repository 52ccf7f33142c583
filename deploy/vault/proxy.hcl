# Cloud Connector proxy: reads device credentials at connect time, changes nothing.

# Read device secrets.
path "secret/data/cloud-connector/*" {
  capabilities = ["read"]
}

# Decrypt with a device key.
path "transit/decrypt/cc-*" {
  capabilities = ["update"]
}
