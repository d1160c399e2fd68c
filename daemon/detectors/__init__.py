"""The detector the model worker runs: built on an exported engine (ONNX Runtime, OpenVINO), routed per
source to its own references, and every family's scores brought to the daemon's 0–1 scale.

Owns: engines.py, routing.py (`RoutedDetector`), scale.py, drift_watch.py (a reference-built detector's drift
notes). May import: model, adapters, daemon.config.
"""
