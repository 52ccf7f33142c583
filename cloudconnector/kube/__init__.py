"""A minimal Kubernetes API client (aiohttp) and its connection settings."""

from cloudconnector.kube.client import EVENTS, SECRETS, KubeClient, KubeError, Resource
from cloudconnector.kube.config import KubeConfig

__all__ = ["EVENTS", "SECRETS", "KubeClient", "KubeConfig", "KubeError", "Resource"]
