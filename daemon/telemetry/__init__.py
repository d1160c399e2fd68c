"""What the process tells the outside about itself: Prometheus metrics, the health checks behind
readiness, and systemd notification.

Owns: metrics.py (`Metrics`, one registry per service), health.py, systemd.py. May import: model, adapters; nothing
of daemon.
"""
