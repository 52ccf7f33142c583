"""The kopf operator: thin handlers over :mod:`cloudconnector.core`; entry point in ``main``."""
