"""Cloud Connector: per-device cloud identities for SIM-identified IoT devices.

The package is named ``cloudconnector`` (not ``operator``) so that it never shadows the standard
library's ``operator`` module; the top-level ``operator/`` and ``proxy/`` folders only hold what each
component ships (Dockerfile, entry point).
"""

__version__ = "0.1.0"
