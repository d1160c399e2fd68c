"""Alembic migration scripts for the daemon's database (applied by `anomalyd db upgrade` and at daemon start)."""
