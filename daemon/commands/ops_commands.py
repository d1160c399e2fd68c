"""Operator commands working directly on the database (no running daemon needed):
`anomalyd defects`, `anomalyd label`, `anomalyd models list|activate`, `anomalyd calibrate` (and `anomalyd retrain`
from `daemon.commands.retrain_commands`).

`calibrate` scores known-good frames of one source with the configured detector and derives that source's
alert threshold (`model.fewshot.calibrate_threshold`: a quantile of the good scores, or their maximum, plus a
margin). The daemon reads per-source thresholds from `[[sources]].threshold` in the configuration, so that is
where the value goes: printed as the TOML line to use, and written into the config file itself with `--write`
(a line edit of that source's table: comments and layout are kept; the file is re-validated afterwards and
restored if the edit did not give the expected value).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.commands.run_commands import _load

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Connection
    from sqlalchemy.orm import Session, sessionmaker

    from adapters.storage import ArtifactStore
    from daemon.config import Settings



def _usage(message: str) -> Exception:
    from daemon.cli import UsageError

    return UsageError(message)


def _database(settings: Settings, config: str | None = None) -> contextlib.AbstractContextManager[sessionmaker[Session]]:
    """A session factory on the configured database, which must exist (only `run` and `db upgrade` create one)."""
    from daemon.commands.database import existing_database

    return existing_database(settings.database_options(), config)


def _history_database(args: argparse.Namespace) -> contextlib.AbstractContextManager[Callable[[], Connection]]:
    """`_database` for the commands that need nothing but the history (defects, label, models list, stats): the
    configuration's [database] alone is read, without the validation models, when it plainly can be, and the
    connections are Core ones (`adapters.db.history` needs no ORM)."""
    from daemon.commands.database import configured_database, existing_database

    return existing_database(configured_database(args.config), args.config, orm=False)


def _print_json(items: Any) -> None:
    json.dump(items, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _store(settings: Settings) -> ArtifactStore:
    from adapters.storage import ArtifactStore

    return ArtifactStore(settings.resolve(settings.storage.dir), save_frames=settings.storage.save_frames,
                         jpeg_quality=settings.storage.jpeg_quality)


# --- defects -----------------------------------------------------------------------------------------------------


def _time_window(args: argparse.Namespace) -> tuple[Any, Any]:
    """(after, before) from --since / --until (RFC 3339 or a duration back from now); a bad value is a usage error."""
    from adapters.history_args import HistoryError, parse_when

    try:
        after = parse_when(args.since, name="--since") if args.since else None
        before = parse_when(args.until, name="--until") if args.until else None
    except HistoryError as exc:
        raise _usage(str(exc)) from None
    return after, before


def cmd_defects(args: argparse.Namespace) -> int:
    after, before = _time_window(args)
    if args.limit < 1 or args.limit > 1000:
        raise _usage(f"--limit must be between 1 and 1000, not {args.limit}")
    with _history_database(args) as sessions, sessions() as session:
        from adapters.db import InspectionFilter, history  # SQLAlchemy: only once there is a database

        filters = InspectionFilter(source=args.source, line=args.line, after=after, before=before,
                                   min_score=args.min_score, anomalous=None if args.all else True, label=args.label)
        page = history.list_page(session, filters, sort=args.sort, limit=args.limit)
        items = [history.inspection_dict(row, page.labels.get(row.id)) for row in page.rows]
    if args.json:
        _print_json(items)
        return 0
    _print_table(items)
    return 0


def _print_table(items: list[dict[str, Any]]) -> None:
    headers = ("id", "captured_at", "source", "line", "score", "threshold", "anomalous", "label", "regions")
    rows = [(str(item["id"]), (item["captured_at"] or "")[:19].replace("T", " "), item["source"], item["line"],
             "-" if item["score"] is None else f"{item['score']:.3f}", f"{item['threshold']:.3f}",
             "yes" if item["is_anomalous"] else "no", (item["label"] or {}).get("label", "-"),
             str(len(item["regions"]))) for item in items]
    widths = [max(len(header), *(len(row[i]) for row in rows)) if rows else len(header)
              for i, header in enumerate(headers)]
    print("  ".join(header.ljust(width) for header, width in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(no inspections match)")


# --- label -------------------------------------------------------------------------------------------------------


def cmd_label(args: argparse.Namespace) -> int:
    mask = None
    if args.mask:
        try:
            mask = Path(args.mask).read_bytes()
        except OSError as exc:
            raise _usage(f"--mask {args.mask}: cannot read: {exc.strerror or exc}") from None
    author = args.author or f"cli:{_user()}"
    with _history_database(args) as sessions:
        from adapters.db import history  # SQLAlchemy: only once there is a database

        store = _store(_load(args)) if mask is not None else None  # a label mask is kept with the artifacts
        try:
            row = history.apply_label(sessions, store, args.inspection_id,
                                      args.label, author=author, mask=mask, mask_name=f"--mask {args.mask}")
        except history.NotFound as exc:  # a runtime failure (exit 1), not a usage error
            raise RuntimeError(str(exc)) from None
        except history.HistoryError as exc:
            raise _usage(str(exc)) from None
    extra = f" with mask {row.mask_path}" if row.mask_path else ""
    print(f"inspection {args.inspection_id} labelled {row.label} by {author}{extra} (label id {row.id})")
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


# --- models ------------------------------------------------------------------------------------------------------


def cmd_models_list(args: argparse.Namespace) -> int:
    with _history_database(args) as sessions, sessions() as session:
        from adapters.db import history  # SQLAlchemy: only once there is a database

        items = [history.model_dict(row) for row in history.list_versions(session)]
    if args.json:
        _print_json(items)
        return 0
    if not items:
        print("(no model versions recorded)")
        return 0
    for item in items:
        metrics = ", ".join(f"{key}={value:.4g}" if isinstance(value, int | float) else f"{key}={value}"
                            for key, value in sorted((item["metrics"] or {}).items())
                            if not isinstance(value, dict | list))
        print(f"{item['version']:<32} {item['status']:<9} {item['kind']:<11} {(item['created_at'] or '')[:19]}  "
              f"{metrics}".rstrip())
    return 0


def cmd_models_activate(args: argparse.Namespace) -> int:
    settings = _load(args)
    from daemon.versions import UnknownVersionError, VersionRegistry

    with _database(settings, args.config) as sessions:
        try:
            VersionRegistry(sessions).activate(args.version)
        except UnknownVersionError as exc:
            raise _usage(str(exc)) from None
    print(f"model version {args.version} is now active (running daemons switch to it within their model watcher's poll interval)")
    return 0


# --- calibrate ---------------------------------------------------------------------------------------------------


def _good_images(directory: Path) -> list[Path]:
    from model.preprocess import IMAGE_SUFFIXES

    if not directory.is_dir():
        raise _usage(f"--good {directory}: not a directory")
    files = sorted(path for path in directory.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not files:
        raise _usage(f"--good {directory}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def _load_tensors(files: list[Path], size: int, reference: bool) -> tuple[Any, list[str]]:
    """(N,3,S,S) tensor of the decodable files and the problems with the others (named, not fatal)."""
    import torch

    from model.preprocess import ImageDecodeError, decode_image, fast_transform, open_pil, reference_transform

    tensors, problems = [], []
    for path in files:
        try:
            if reference:
                tensors.append(reference_transform(open_pil(path), size))
            else:
                tensors.append(fast_transform(decode_image(path), size))
        except (ImageDecodeError, OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
    if not tensors:
        raise _usage(f"no decodable known-good image among {len(files)} files: " + "; ".join(problems[:3]))
    return torch.stack(tensors), problems


def cmd_calibrate(args: argparse.Namespace) -> int:
    from daemon.commands.threshold_commands import cmd_calibrate as calibrate

    return calibrate(args)


_HEADER = re.compile(r"^\s*\[")
_ID_LINE = re.compile(r"""^\s*id\s*=\s*(["'])(?P<id>[^"']*)\1\s*(#.*)?$""")
_THRESHOLD_LINE = re.compile(r"^(?P<indent>\s*)threshold\s*=\s*[^#\n]*(?P<comment>#.*)?$")


def write_source_threshold(config: Path, source_id: str, threshold: float) -> None:
    """Set `threshold` in the `[[sources]]` table with `id = source_id` of the TOML file, keeping the rest."""
    from daemon.config import ConfigError, load_config

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


# --- registration ------------------------------------------------------------------------------------------------


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="configuration file (default: $ANOMALYD_CONFIG or ./config.toml)")


def register(subparsers: argparse._SubParsersAction) -> None:
    defects = subparsers.add_parser("defects", help="query the inspection history (anomalous ones by default)")
    _config_argument(defects)
    defects.add_argument("--source", help="only this source id")
    defects.add_argument("--line", help="only this production line")
    defects.add_argument("--since", help="captured at or after: ISO time (UTC if no offset) or a duration (24h, 7d)")
    defects.add_argument("--until", help="captured before: ISO time or a duration ago")
    defects.add_argument("--min-score", type=float, help="only scores >= this")
    defects.add_argument("--label", choices=("normal", "anomalous", "none"), help="latest operator label (none = unlabelled)")
    defects.add_argument("--all", action="store_true", help="include inspections not flagged anomalous")
    defects.add_argument("--sort", choices=("time_desc", "time_asc", "score_desc", "score_asc"), default="time_desc")
    defects.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50, max 1000)")
    defects.add_argument("--json", action="store_true", help="JSON list instead of a table")
    defects.set_defaults(func=cmd_defects, short_lived=True)

    label = subparsers.add_parser("label", help="record operator feedback on an inspection (used by retraining)")
    _config_argument(label)
    label.add_argument("inspection_id", type=int, metavar="INSPECTION_ID")
    label.add_argument("label", choices=("normal", "anomalous"))
    label.add_argument("--mask", metavar="FILE", help="defect mask: PNG, BMP or TIFF of the frame's size, "
                       "non-zero = defect")
    label.add_argument("--author", help="who labels (default cli:<user>)")
    label.set_defaults(func=cmd_label, short_lived=True)

    models = subparsers.add_parser("models", help="model versions")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    models_sub.required = True
    listing = models_sub.add_parser("list", help="versions with status and metrics")
    _config_argument(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_models_list, short_lived=True)
    activate = models_sub.add_parser("activate", help="make VERSION the active model")
    _config_argument(activate)
    activate.add_argument("version", metavar="VERSION")
    activate.set_defaults(func=cmd_models_activate, short_lived=True)

    calibrate_parser = subparsers.add_parser("calibrate", help="per-source threshold from known-good frames")
    _config_argument(calibrate_parser)
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
