"""Plant I/O around the pipeline: trigger mode (a PLC asks for one part's verdict within its cycle), the OPC
UA methods and counters, MQTT command topics, and each source's availability wherever a PLC or operator looks.

Owns: trigger.py, integrations.py (`Integrations`: the wiring), counters.py (OPC UA counters), mqtt_commands.py,
source_availability.py. May import: model, adapters, daemon.config,
daemon.telemetry, daemon.learning (and what it may import).
"""
