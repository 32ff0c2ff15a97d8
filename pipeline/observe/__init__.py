"""Observability: logs, Prometheus metrics, the finish webhook."""
