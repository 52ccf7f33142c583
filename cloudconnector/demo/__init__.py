"""The README's one-command demo: local stand-ins for AWS IoT, the standalone core, simulated devices."""
