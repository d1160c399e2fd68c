"""Zero-label start and drift: a source with no references is inspected by mutual scoring on its own
recent frames, proposes its own references, and reports a changed line as one drift event.

Owns: start.py (mutual detectors per source, reference proposals), drift.py (`DriftTracker`, drift events through
the outbox). May import: model, adapters, daemon.config, daemon.detectors.
"""
