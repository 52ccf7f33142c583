"""The reconcile core shared by the kopf operator and the standalone mode (no Kubernetes here)."""
