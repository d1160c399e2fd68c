"""The daemon: the process, its HTTP API and its command line, wired from model/ (the families) and adapters/ (the
edges). One package per concern, each importing only the packages before it in this order (tests/test_layout.py):

config → telemetry, detectors → zero_label → frames, references → learning → plant, api → process → commands, cli

Each package's docstring says what it owns. docs/architecture.md draws the frame's path through them.
"""
