"""Configuration: `Settings` (pydantic-settings, unknown keys refused), where its values come from (file,
environment, defaults), the `[mutual]` window, the retraining schedule's grammar and the per-source frame geometry.

Owns: settings.py (`Settings`, `load_config`), file.py (finding the file, the fast `[database]` read), sources.py,
mutual.py, schedule.py, geometry.py, model_options.py (the one `[model]` → detector options mapping). May import: model, adapters; nothing else of daemon (every other package reads
its settings from here).
"""
