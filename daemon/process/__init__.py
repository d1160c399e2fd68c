"""The daemon's lifecycle: `Service` builds and starts everything, serves until SIGTERM/SIGINT, drains and
shuts down; readiness (`GET /health/ready`, the systemd watchdog) and retention.

Owns: service.py, background.py (model watcher, retraining schedule, retention), capture.py (`--role capture`),
readiness.py, retention.py. May import: every package of daemon except commands (it is the
composition root of the running daemon).
"""
