"""The `anomalyd` subcommands: one module per group (`run`, `eval`, `export`, `models`, `references`, `thresholds`,
`retrain`, `tokens`, `stats`, `config`, ...), each with a `register(subparsers)` that daemon/cli.py calls lazily.

Owns: the command modules, context.py (what they share: configuration, database, store, usage errors, output, by
public names; no command module imports another), database.py, model_options.py (the one `[model]` → detector
options builder of the CLI) and geometry_options.py. May import every other package of daemon; nothing imports it
but daemon/cli.py.
"""
