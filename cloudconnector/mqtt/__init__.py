"""Cloud Connector."""
