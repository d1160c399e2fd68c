"""The frame path: source queues → intake threads (each takes and decodes, byte budget) → `DynamicBatcher` → model worker →
result writer (artifacts, one database transaction with its outbox rows), with dead letters for frames that keep
failing.

Owns: pipeline.py (`Pipeline`, wiring the stages), intake.py, budget.py, batcher.py, worker.py, record.py (the one
`FrameRecord` the stages pass along), results.py, writer.py, dead_letter.py. May import: model, adapters,
daemon.config, daemon.telemetry, daemon.detectors, daemon.zero_label.
"""
