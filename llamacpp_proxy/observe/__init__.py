"""Observing: logs and the access log."""
