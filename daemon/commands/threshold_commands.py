"""`anomalyd calibrate` (a source's thresholds from a folder of known-good frames) and `anomalyd thresholds
show|history|pin|unpin` (what is in effect, every change, and an operator's fixed value).

`calibrate` scores the `--good` frames with the detector the source runs (its own reference bank included), leaves
out the files of that bank (a reference scores about 0 against its own bank; a WARNING names them), and stores the
thresholds for the model version the source runs: a running daemon uses them within seconds, a restart keeps them.
With `--false-reject-rate R` both thresholds come from the bound of daemon/references/calibration.py; without it the image
threshold is the `--method` quantile/max plus `--margin` (`model.fewshot.calibrate_threshold`). `--write` also
writes the image threshold into the config file. Every stored value is a `threshold_history` row.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from daemon.commands.context import (
    config_argument,
    config_path,
    current_user,
    database,
    good_images,
    import_factory,
    load_settings,
    load_tensors,
    store,
    usage,
)


def _source(settings: Any, source_id: str) -> Any:
    try:
        return settings.source(source_id)
    except KeyError:
        raise usage(f"--source {source_id!r}: not a [[sources]] id in the configuration "
                     f"({', '.join(s.id for s in settings.sources) or 'none configured'})") from None


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _without_bank_files(files: list[Path], bank_files: list[Path], source_id: str) -> list[Path]:
    """`files` less the ones whose content is one of the bank's own references (named in a WARNING)."""
    own = {_digest(f) for f in bank_files if f.suffix != ".safetensors" and f.is_file()}
    kept = [f for f in files if _digest(f) not in own]
    left_out = [f for f in files if f not in kept]
    if left_out:
        print(f"warning: {len(left_out)} of the --good frames are references of source {source_id}'s bank and "
              f"score about 0 against it; left out: {', '.join(str(f) for f in left_out)}", file=sys.stderr)
    if not kept:
        raise usage(f"every --good frame is a reference of source {source_id}'s bank: calibrating needs "
                     "known-good frames the bank has not seen")
    return kept


@contextlib.contextmanager
def _optional_database(settings: Any) -> Any:
    """The configured database's session factory, or None (with a warning) when there is none yet."""
    from daemon.commands.database import NoDatabaseError

    with contextlib.ExitStack() as stack:
        try:
            sessions = stack.enter_context(database(settings))
        except NoDatabaseError as exc:
            print(f"warning: {exc}; the threshold is not stored", file=sys.stderr)
            sessions = None
        yield sessions


def _source_detector(settings: Any, sessions: Any, source: Any, args: argparse.Namespace) -> tuple[Any, str, list]:
    """(detector on the daemon's scale, model version, reference files) of the source, as the daemon runs it."""
    from daemon.process.service import build_detector
    from daemon.references.manager import ReferenceManager

    factory = import_factory(args.detector_factory) if args.detector_factory else build_detector
    manager = ReferenceManager(settings, sessions, store(settings), source_ids=[source.id],
                               auto_calibrate=False)
    routed = manager.route(factory(settings))
    if source.id in routed.per_source:
        detector = routed.per_source[source.id]
    elif source.id in manager.unavailable:
        raise usage(manager.unavailable[source.id])
    else:
        detector = routed.base
    return detector, routed.version_for(source.id), manager.states[source.id].files


def cmd_calibrate(args: argparse.Namespace) -> int:
    from daemon.references import calibration
    from daemon.references.bank import score_files
    from daemon.references.thresholds import Calibration, apply_calibration

    settings = load_settings(args)
    source = _source(settings, args.source)
    rate = args.false_reject_rate
    if rate is not None and not 0.0 < rate < 1.0:
        raise usage(f"--false-reject-rate must be between 0 and 1 (e.g. 0.005), not {rate}")
    if not 0.0 < args.quantile <= 1.0:
        raise usage(f"--quantile must be in (0, 1], not {args.quantile}")
    if not 0.0 < args.confidence < 1.0:
        raise usage(f"--confidence must be between 0 and 1, not {args.confidence}")
    files = good_images(Path(args.good))
    class_name = source.class_name or settings.model.class_name
    skipped = 0
    with _optional_database(settings) as sessions:
        detector, version, bank_files = _source_detector(settings, sessions, source, args)
        files = _without_bank_files(files, bank_files, source.id)
        stored = calibration.stored_threshold(sessions, source.id, version) if sessions is not None else None
        if rate is not None:
            scores, maxima = score_files(detector, files, class_name)
            image, pixel_bound = calibration.calibrated_bounds(scores, maxima, rate, args.confidence,
                                                               what=f"source {source.id}")
            threshold, pixel, rule, n = image.value, pixel_bound.value, image.rule, len(scores)
            if image.extrapolated:
                print(f"warning: {n} known-good frames cannot bound a {100 * rate:g}% false-reject rate; "
                      f"that needs {image.needed}: the threshold is extrapolated", file=sys.stderr)
        else:
            from model.fewshot import calibrate_threshold

            images, problems = load_tensors(files, int(detector.image_size), settings.model.reference_preprocessing)
            for problem in problems:
                print(f"skipped {problem}", file=sys.stderr)
            skipped = len(problems)
            threshold = min(1.0, max(0.0, calibrate_threshold(detector, images, method=args.method,
                                                              quantile=args.quantile, margin=args.margin,
                                                              class_name=class_name)))
            pixel = stored.pixel_threshold if stored is not None else float(source.map_threshold)
            rule = (f"{args.method}{f' q={args.quantile}' if args.method == 'quantile' else ''} of the --good "
                    f"scores + margin {args.margin}")
            n = int(images.shape[0])
        if sessions is not None:  # explicit: applied to the version the source runs (a restart keeps it)
            threshold, pixel = apply_calibration(sessions, Calibration(
                source=source.id, model_version=version, threshold=threshold, pixel_threshold=pixel,
                rule=f"{rule}; --good {args.good}", set_by=f"anomalyd calibrate ({current_user()})",
                false_reject_rate=rate, n_good=n, method=f"anomalyd calibrate --good {args.good}"))
    result = {"source": source.id, "model_version": version, "threshold": round(threshold, 6),
              "pixel_threshold": round(pixel, 6), "false_reject_rate": rate, "images": n, "rule": rule,
              "skipped": skipped, "stored": sessions is not None, "margin": args.margin, "quantile": args.quantile,
              "previous": stored.threshold if stored is not None else source.threshold, "written": None,
              "method": args.method if rate is None else "false-reject-rate"}
    if args.write:
        config = config_path(args.config)
        if config is None:
            raise usage("--write needs a configuration file (--config)")
        write_source_threshold(config, source.id, result["threshold"])
        result["written"] = str(config)
    if args.json:
        print(json.dumps(result))
        return 0
    stored_text = ("stored in the database (running daemons use it within seconds, restarts keep it)"
                   if result["stored"] else "not stored (no database)")
    print(f"source {source.id}, model version {version}: threshold {threshold:.4f}, pixel_threshold {pixel:.4f} "
          f"from {n} known-good frames ({rule}); {stored_text}; was {result['previous']}")
    if result["written"]:
        print(f"written to {result['written']}")
    else:
        print(f'to keep it in the configuration, set in the [[sources]] table with id = "{source.id}":\n'
              f'  threshold = {result["threshold"]}')
    return 0


# --- thresholds ----------------------------------------------------------------------------------------------------


def cmd_thresholds(args: argparse.Namespace) -> int:
    from daemon.references import thresholds
    from daemon.references.thresholds import recorded_version, summary

    settings = load_settings(args)
    sources = [_source(settings, args.source)] if args.source else list(settings.sources)
    if args.thresholds_command in ("pin", "unpin") and not args.source:
        raise usage(f"thresholds {args.thresholds_command} needs --source")
    with database(settings) as sessions:
        if args.thresholds_command == "show":
            items: Any = [summary(settings, sessions, s) for s in sources]
        elif args.thresholds_command == "history":
            items = thresholds.history(sessions, args.source, limit=args.limit)
        elif args.thresholds_command == "pin":
            try:
                items = thresholds.pin(sessions, args.source, recorded_version(settings, sessions, args.source),
                                       args.threshold, args.pixel_threshold, set_by=f"cli ({current_user()})")
            except ValueError as exc:
                raise usage(str(exc)) from None
        else:
            try:
                items = thresholds.unpin(sessions, args.source, recorded_version(settings, sessions, args.source),
                                         set_by=f"cli ({current_user()})")
            except LookupError as exc:
                raise usage(str(exc).strip("'\"")) from None
    if args.json:
        print(json.dumps(items))
        return 0
    if args.thresholds_command == "show":
        for item in items:
            print(f"{item['source']}: threshold {item['threshold']:.4f}, pixel {item['pixel_threshold']:.4f} "
                  f"({item['origin']}, model version {item['model_version']})")
    elif args.thresholds_command == "history":
        for row in items:
            print(f"{row['created_at']}  {row['source']}  {row['action']:<8} {row['threshold']:.4f}  "
                  f"by {row['set_by']}  ({row['rule']})")
    else:
        print(f"source {items['source']}: threshold {items['threshold']:.4f} {items['action']} "
              "(running daemons use it within seconds)")
    return 0


_HEADER = re.compile(r"^\s*\[")
_ID_LINE = re.compile(r"""^\s*id\s*=\s*(["'])(?P<id>[^"']*)\1\s*(#.*)?$""")
_THRESHOLD_LINE = re.compile(r"^(?P<indent>\s*)threshold\s*=\s*[^#\n]*(?P<comment>#.*)?$")


def write_source_threshold(config: Path, source_id: str, threshold: float) -> None:
    """Set `threshold` in the `[[sources]]` table with `id = source_id` of the TOML file, keeping the rest."""
    from daemon.config.settings import ConfigError, load_config

    original = config.read_text(encoding="utf-8")
    lines = original.splitlines(keepends=True)
    start = None
    for index, line in enumerate(lines):
        if line.strip() == "[[sources]]":
            end = next((j for j in range(index + 1, len(lines)) if _HEADER.match(lines[j])), len(lines))
            if any((m := _ID_LINE.match(lines[j])) and m.group("id") == source_id for j in range(index + 1, end)):
                start = index
                break
    if start is None:
        raise RuntimeError(f"{config}: no [[sources]] table with id = {source_id!r} (set by the environment?); "
                           f"set threshold = {threshold} for it by hand")
    value = f"threshold = {threshold}"
    for j in range(start + 1, end):
        match = _THRESHOLD_LINE.match(lines[j])
        if match:
            comment = f"  {match.group('comment')}" if match.group("comment") else ""
            newline = "\n" if lines[j].endswith("\n") else ""
            lines[j] = f"{match.group('indent')}{value}{comment}{newline}"
            break
    else:
        id_line = next(j for j in range(start + 1, end) if _ID_LINE.match(lines[j]))
        if not lines[id_line].endswith("\n"):
            lines[id_line] += "\n"
        lines.insert(id_line + 1, value + "\n")
    config.write_text("".join(lines), encoding="utf-8")
    try:
        written = load_config(config).source(source_id).threshold
    except (ConfigError, KeyError) as exc:
        config.write_text(original, encoding="utf-8")
        raise RuntimeError(f"{config}: the edited file did not load ({exc}); left unchanged") from None
    if abs(written - threshold) > 1e-9:
        config.write_text(original, encoding="utf-8")
        raise RuntimeError(f"{config}: threshold for {source_id!r} reads {written} after the edit (an environment "
                           f"override?); file left unchanged")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("thresholds", help="the thresholds in effect, their history, pin/unpin")
    commands = parser.add_subparsers(dest="thresholds_command", metavar="ACTION")
    commands.required = True
    for name, text in (("show", "the thresholds each source runs with and their origin"),
                       ("history", "every change of a source's thresholds, newest first"),
                       ("pin", "fix a source's thresholds (every model version) until unpinned"),
                       ("unpin", "back to the calibrated or configured thresholds")):
        sub = commands.add_parser(name, help=text)
        config_argument(sub)
        sub.add_argument("--source", required=name in ("pin", "unpin"), help="the [[sources]] id")
        sub.add_argument("--json", action="store_true")
        if name == "history":
            sub.add_argument("--limit", type=int, default=50)
        if name == "pin":
            sub.add_argument("threshold", type=float, help="image threshold, 0-1 (the daemon's score scale)")
            sub.add_argument("--pixel-threshold", type=float, default=None, help="default: the image threshold")
        sub.set_defaults(func=cmd_thresholds)

    calibrate_parser = subparsers.add_parser("calibrate", help="per-source threshold from known-good frames")
    config_argument(calibrate_parser)
    calibrate_parser.add_argument("--source", required=True, help="the [[sources]] id")
    calibrate_parser.add_argument("--good", required=True, metavar="DIR", help="folder of known-good frames")
    calibrate_parser.add_argument("--method", choices=("quantile", "max"), default="quantile")
    calibrate_parser.add_argument("--quantile", type=float, default=0.99, help="score quantile (default 0.99)")
    calibrate_parser.add_argument("--margin", type=float, default=0.0, help="added to the quantile/max")
    calibrate_parser.add_argument("--write", action="store_true", help="write the threshold into the config file")
    calibrate_parser.add_argument("--false-reject-rate", type=float, default=None, metavar="RATE",
                                  help="set both thresholds (image and pixel) for this false-reject rate (e.g. "
                                       "0.005), stored in the database for the source and the model version")
    calibrate_parser.add_argument("--confidence", type=float, default=0.5, metavar="P",
                                  help="with --false-reject-rate: P(realised rate <= target) the bound aims at "
                                  "(default %(default)s; docs/models.md says how many frames it needs)")
    calibrate_parser.add_argument("--json", action="store_true")
    calibrate_parser.add_argument("--detector-factory", metavar="MODULE:CALLABLE", default=None,
                                  help=argparse.SUPPRESS)  # a callable(settings) -> Detector (tests, plugins)
    calibrate_parser.set_defaults(func=cmd_calibrate)
