"""`anomalyd config check`: validate a configuration and the files it names, without starting anything.

It loads the configuration the way every command finds it (`--config`, `$ANOMALYD_CONFIG`, `./config.toml`,
`/etc/anomalyd/config.toml`), then checks what a start would trip over: the model's weight files (in the cache or
given as paths), secret and TLS files, source folders and video files, and that the database and artifact folders
can be created. Nothing is created, downloaded or connected to. Exit status 0 when there is no error (warnings
are allowed), 1 when there is one, 2 when the file itself does not load.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def _writable_place(path: Path) -> bool:
    """The folder exists and is writable, or the nearest existing parent is (it can be created)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def check_settings(settings: Any) -> list[tuple[str, str]]:
    """(level, message) findings: level is "ok", "warning" or "error"."""
    from adapters.weights import WeightsError, required_weights
    from daemon.commands.database import sqlite_file

    findings: list[tuple[str, str]] = []
    m = settings.model
    try:
        needed = required_weights(m.name, settings.resolve_model_value(m.backbone),
                                  settings.resolve_model_value(m.prompts))
    except WeightsError as exc:
        findings.append(("error", f"[model]: {exc}"))
        needed = []
    for item in needed:
        found = item.found()
        if found:
            findings.append(("ok", f"{item.what}: {found}"))
        else:
            findings.append(("error", f"{item.what} is missing: `anomalyd weights fetch` downloads it "
                                      f"({item.urls[0]}), or put it at {item.path}"))
    for key in ("backbone", "backbone_config", "prompts"):
        value = getattr(m, key)
        if value and (Path(value).suffix or "/" in value) and not settings.resolve(value).exists():
            findings.append(("error", f"[model].{key}: {settings.resolve(value)} does not exist"))
    tls = settings.mqtt.tls
    if settings.mqtt.enabled and tls.enabled:
        for key in ("ca_certs", "certfile", "keyfile"):
            value = getattr(tls, key)
            if value and not settings.resolve(value).is_file():
                findings.append(("error", f"[mqtt.tls].{key}: {settings.resolve(value)} does not exist"))
    for source in settings.sources:
        if not source.enabled:
            findings.append(("ok", f"source {source.id}: disabled"))
            continue
        spec = source.source_spec(settings.base_dir)
        if source.kind == "folder":
            folder = Path(spec["uri"])
            if folder.is_dir():
                findings.append(("ok", f"source {source.id}: folder {folder}"))
            elif _writable_place(folder):
                findings.append(("warning", f"source {source.id}: folder {folder} does not exist yet (created at start)"))
            else:
                findings.append(("error", f"source {source.id}: folder {folder} does not exist and cannot be created"))
        elif source.kind == "video" and "://" not in spec["uri"] and not Path(spec["uri"]).is_file():
            findings.append(("error", f"source {source.id}: video file {spec['uri']} does not exist"))
        else:
            findings.append(("ok", f"source {source.id}: {source.kind} {spec['uri'] or ''}".rstrip()))
    findings += reference_findings(settings)
    database = sqlite_file(settings.database_url)
    if database is not None:
        if database.is_file():
            findings.append(("ok", f"database {database}"))
        elif _writable_place(database.parent):
            findings.append(("warning", f"database {database} does not exist yet (`anomalyd run` or "
                                        "`anomalyd db upgrade` creates it)"))
        else:
            findings.append(("error", f"database {database} cannot be created (folder not writable)"))
    storage = settings.resolve(settings.storage.dir)
    level = "ok" if storage.is_dir() or _writable_place(storage) else "error"
    findings.append((level, f"artifacts under {storage}" + ("" if level == "ok" else " cannot be created")))
    if settings.api.enabled and not settings.api.tokens:
        from daemon.api.tokens import stored_tokens, tokens_file

        stored = stored_tokens(settings)
        findings.append(("ok" if stored else "warning",
                         f"API tokens: {len(stored)} in {tokens_file(settings)}" if stored else
                         "API: no token configured; the first start creates an admin token and prints it in the log"))
    return findings


def reference_findings(settings: Any) -> list[tuple[str, str]]:
    """Each enabled source's references checked as the daemon checks them before building its bank (folders,
    readable images, one channel count, sizes within 10 % per side unless the geometry takes any size; a model
    that needs references has some)."""
    from daemon.references.files import ReferenceSetupError, check_images, reference_files, sizes_may_differ
    from model.factory import needs_references

    findings: list[tuple[str, str]] = []
    for source in settings.sources:
        if not source.enabled:
            continue
        try:
            files, _ = reference_files(settings, source.id)
            shape = check_images(files, source.id, sizes_may_differ(settings, source.id))
        except ReferenceSetupError as exc:
            findings.append(("error", f"{exc}"))
            continue
        if not files and needs_references(settings.model.name):
            findings.append(("error", f"source {source.id}: {settings.model.name} needs references: set "
                                      "[[sources]].references or [model].references to a folder of known-good images"))
        elif files:
            size = f" of {shape[1]}x{shape[0]} px" if shape else ""
            findings.append(("ok", f"source {source.id}: {len(files)} reference image(s){size}"))
    return findings


def cmd_config_check(args: argparse.Namespace) -> int:
    from daemon.commands.context import load_settings
    from daemon.config.settings import describe_config_search

    settings = load_settings(args)  # a file that does not load: exit 2 with every bad key named
    findings = check_settings(settings)
    errors = sum(level == "error" for level, _ in findings)
    if args.json:
        print(json.dumps({"config": describe_config_search(args.config), "errors": errors,
                          "findings": [{"level": level, "message": text} for level, text in findings]}, indent=2))
    else:
        print(f"{describe_config_search(args.config)}: valid")
        for level, text in findings:
            print(f"  {level:<7} {text}")
        print(f"{errors} error(s), {sum(level == 'warning' for level, _ in findings)} warning(s)")
    return 1 if errors else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="configuration: check it and the files it names")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    config_sub.required = True
    check = config_sub.add_parser("check", help="validate the configuration and its files; starts nothing")
    check.add_argument("--config", help="configuration file (default: $ANOMALYD_CONFIG, ./config.toml, "
                       "/etc/anomalyd/config.toml)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_config_check)
