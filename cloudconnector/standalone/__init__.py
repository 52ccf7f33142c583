"""Standalone mode: the operator's core and the proxy in one process, without Kubernetes.

``cloud-connector run -f DIR`` reads Endpoint, Group, Device (and v1 Secret) manifests from DIR,
validates them with the CRDs' schemas, reconciles them with :mod:`cloudconnector.core` (the code the
kopf operator runs), keeps objects and status in SQLite (:mod:`.store`), keys in the embedded
encrypted store or in Vault (:mod:`.keys`), and serves the proxy from the same routes
(:mod:`.serve`). ``cloud-connector status`` prints the ``kubectl get`` columns from the store.

Modules: :mod:`.manifests` (reading DIR), :mod:`.runner` (one reconcile pass, the watch loop),
:mod:`.app` (wiring), :mod:`.table` (status output).
"""
