"""Names of the custom resources, shared by the operator, the proxy, the CLI and the chart tests."""

from typing import Final

GROUP: Final = "cloudconnector.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

# Plural "endpoints" also exists in core Kubernetes: users type endpoints.cloudconnector.io, the short
# name "cce" or the category "cloudconnector".
ENDPOINTS: Final = "endpoints"
GROUPS: Final = "groups"
DEVICES: Final = "devices"

KIND_ENDPOINT: Final = "Endpoint"
KIND_GROUP: Final = "Group"
KIND_DEVICE: Final = "Device"
PLURALS: Final = {KIND_ENDPOINT: ENDPOINTS, KIND_GROUP: GROUPS, KIND_DEVICE: DEVICES}

FINALIZER: Final = f"{GROUP}/cloud-identity"
ROTATE_ANNOTATION: Final = f"{GROUP}/rotate"
