"""Per-source references and the thresholds they calibrate: which files are a source's references, the
detector built on them, leave-one-out and labelled calibration, the history of every threshold change (pins, the
labelled-defect guard), runtime geometry overrides, and operator management of all of it.

Owns: manager.py (`ReferenceManager`: build, rebuild, calibrate, swap), files.py, bank.py, admin.py, history.py,
auto_accept.py, calibration.py, calibration_curve.py, operating_point.py, thresholds.py, known_good_cache.py,
geometry_overrides.py, geometry_events.py (each geometry change through the outbox). May import: model, adapters,
daemon.config, daemon.detectors, daemon.zero_label.
"""
