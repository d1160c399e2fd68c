"""Model versions: the registry (`model_versions`), activation and rollback, and the daemon's active-model watcher.

A version is a detector kind plus its learned-weights file (`<models dir>/<version>.safetensors`, the models dir
being `[retraining].output_dir`, default `<[storage].dir>/models`); its status is candidate | active | retired and
exactly one version is active. `activate_version(sessions, version)` only changes the database (the version
becomes active with `activated_at` now, the previous one retired); every running daemon sharing that database
notices through its `ModelWatcher`, which polls the active version, builds its detector off the inspection path
and swaps it into the worker between two batches, so no frame is dropped and each row carries the version that
scored it. Rollback is activating an older version (`rollback` picks the previously active one).

At start (`startup_detector`) the configured model is registered on first use: its prompts are copied into the
models dir under its version name, and it becomes active when nothing is active yet or when the configured prompts
are new to the registry (editing [model].prompts is a deliberate choice); otherwise the registry's active version
is what the daemon runs, so a promotion survives restarts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from adapters.db.history import list_versions
from adapters.db.repository import active_model_version
from adapters.db.tables import ModelVersion, utcnow

if TYPE_CHECKING:
    from daemon.config.settings import Settings

log = logging.getLogger("anomalyd.models")

STATUSES = ("candidate", "active", "retired")
VERSION_SUFFIX = ".safetensors"


class ModelVersionError(ValueError):
    """A version that cannot be registered or activated; the message names it and why."""


class VersionExistsError(ModelVersionError):
    """A version name that is already in the registry."""


class UnknownVersionError(ModelVersionError):
    """No such version in the registry."""


# --- paths -------------------------------------------------------------------------------------------------------


def models_dir(settings: Settings) -> Path:
    """Where version files live: `[retraining].output_dir`, default `<[storage].dir>/models` (created)."""
    configured = getattr(settings.retraining, "output_dir", None)
    path = settings.resolve(configured) if configured else settings.resolve(settings.storage.dir) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def version_file(settings: Settings, version: str) -> Path:
    return models_dir(settings) / f"{version}{VERSION_SUFFIX}"


# --- registry ----------------------------------------------------------------------------------------------------


def get_version(session: Session, version: str) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.version == version)).one_or_none()


def register_version(
    session: Session,
    *,
    version: str,
    kind: str,
    prompts_path: str | Path | None,
    metrics: dict[str, Any] | None = None,
    status: str = "candidate",
    notes: str | None = None,
) -> ModelVersion:
    """Add a version (not active: use `activate_version`); the caller's session owns the transaction."""
    if status not in ("candidate", "retired"):
        raise ModelVersionError(f"a version is registered as candidate or retired, not {status!r}")
    if not version or "/" in version or version.startswith("."):
        raise ModelVersionError(f"model version name {version!r} is not usable as a file name")
    if get_version(session, version) is not None:
        raise VersionExistsError(f"model version {version!r} is already registered")
    row = ModelVersion(version=version, kind=kind, prompts_path=str(prompts_path) if prompts_path else None,
                       metrics=metrics, status=status, notes=notes)
    session.add(row)
    session.flush()
    return row


def _make_active(session: Session, row: ModelVersion) -> None:
    session.execute(update(ModelVersion).where(ModelVersion.status == "active", ModelVersion.id != row.id)
                    .values(status="retired"))
    row.status = "active"
    row.activated_at = utcnow()


def activate_version(sessions: sessionmaker[Session], version: str) -> ModelVersion:
    """Make `version` the active one (the previously active version is retired) and record `activated_at`.

    Running daemons hot-swap to it within their watcher's poll interval. Raises UnknownVersionError for a
    version not in the registry, ModelVersionError when its weights file is gone.
    """
    with sessions() as session, session.begin():
        row = get_version(session, version)
        if row is None:
            known = ", ".join(v.version for v in list_versions(session)[:10]) or "none"
            raise UnknownVersionError(f"no model version {version!r} (known: {known})")
        if row.prompts_path and not Path(row.prompts_path).is_file():
            raise ModelVersionError(f"model version {version!r}: its weights file {row.prompts_path} is missing")
        if row.status != "active":
            _make_active(session, row)
            log.info("model version %s activated", version)
        return row


def rollback(sessions: sessionmaker[Session]) -> ModelVersion:
    """Activate the version that was active before the current one."""
    with sessions() as session:
        current = active_model_version(session)
        previous = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.status != "active", ModelVersion.activated_at.is_not(None))
            .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())
        ).first()
    if previous is None:
        where = f" than {current.version!r}" if current is not None else ""
        raise ModelVersionError(f"no earlier active model version{where} to roll back to")
    return activate_version(sessions, previous.version)


class VersionRegistry:
    """The model versions of one database, as the HTTP API and the CLI use them."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def list(self) -> list[ModelVersion]:
        with self.sessions() as session:
            return list_versions(session)

    def activate(self, version: str) -> ModelVersion:
        """See `activate_version`: UnknownVersionError / ModelVersionError."""
        return activate_version(self.sessions, version)

    def rollback(self) -> ModelVersion:
        return rollback(self.sessions)


# --- detectors ---------------------------------------------------------------------------------------------------


def _shared_backbone(current: Any) -> Any:
    """The loaded CLIP backbone of the running detector (for families whose versions differ only in weights)."""
    from model import ClipBackbone

    backbone = getattr(getattr(current, "model", None), "backbone", None)
    return backbone if isinstance(backbone, ClipBackbone) else None


def build_version_detector(settings: Settings, row: ModelVersion, current: Any = None) -> Any:
    """The detector of a registered version with the [model]/[runtime] settings; shares `current`'s backbone."""
    from model import create_detector, get_family

    if get_family(row.kind).caps.needs_references:  # patchcore / patchcore-head: built per source on its references
        return reference_version_base(settings, row)
    from daemon.config.model_options import clip_model_options

    backbone: Any = None
    if get_family(row.kind).caps.versions_share_backbone and getattr(current, "name", None) == row.kind:
        backbone = _shared_backbone(current)
    backbone = backbone or settings.backbone_file()
    if row.prompts_path and not Path(row.prompts_path).is_file():
        raise ModelVersionError(f"model version {row.version!r}: its weights file {row.prompts_path} is missing")
    options = clip_model_options(settings, backbone=backbone, prompts=row.prompts_path, family=row.kind)
    detector = create_detector(row.kind, **options)
    if str(detector.version) != row.version:  # rows must carry the registry's name for the version
        detector.version = row.version
    _warm_up(detector)
    if getattr(settings.runtime, "engine", "torch") != "torch":  # the new version is exported and checked first
        from daemon.detectors.engines import with_engine

        return with_engine(settings, detector)
    return detector


def reference_version_base(settings: Settings, row: ModelVersion) -> Any:
    """The base of a version of a model built on references (daemon/references/manager.py builds each source's detector
    from it): its name, the registry's version name and its learned weights file (a trained head), if any."""
    from daemon.config.model_options import reference_model_options
    from daemon.references.manager import NeedsReferences

    if row.prompts_path and not Path(row.prompts_path).is_file():
        raise ModelVersionError(f"model version {row.version!r}: its weights file {row.prompts_path} is missing")
    size = int(reference_model_options(settings).get("image_size", 256))
    return NeedsReferences(row.kind, row.version, size, weights=row.prompts_path)


def _warm_up(detector: Any) -> None:
    """Compute AnomalyCLIP's cached text features now, not on the first batch after the swap."""
    model = getattr(detector, "model", None)
    if model is not None and hasattr(model, "text_features"):
        import torch

        with torch.inference_mode():
            model.text_features()


def _copy_prompts(source: str, target: Path, version: str, kind: str) -> Path | str:
    """The configured weights as the version's own file, tagged with its version name, when the family's
    checkpoint format imports them (AnomalyCLIP's prompts); else the configured file itself."""
    from model import get_family

    checkpoint = get_family(kind).checkpoint
    if checkpoint is None or checkpoint.import_weights is None:
        return source
    return checkpoint.import_weights(source, target, version)


def _register_configured(settings: Settings, sessions: sessionmaker[Session], version: str,
                         kind: str) -> ModelVersion | None:
    """Register the configured model if new; the registry's active version to run instead, or None for the
    configured one."""
    with sessions() as session, session.begin():
        row = get_version(session, version)
        new = row is None
        if new:
            try:
                prompts = settings.prompts_file()
            except Exception:  # e.g. released prompts not fetched: the detector in hand was built without them
                prompts = None
            path: Path | str | None = None
            if prompts and Path(prompts).is_file():
                path = _copy_prompts(prompts, version_file(settings, version), version, kind)
            row = register_version(session, version=version, kind=kind, prompts_path=path,
                                   notes="the configured model ([model] section)")
            log.info("registered the configured model as version %s", version)
        active = active_model_version(session)
        if active is None or new:
            if active is not None:
                log.info("[model] names a new model: version %s replaces %s as the active one", version,
                         active.version)
            _make_active(session, row)
            return None
        return None if active.version == version else active


def _register_or_join(settings: Settings, sessions: sessionmaker[Session], version: str,
                      kind: str) -> ModelVersion | None:
    """`_register_configured`, once more when another worker sharing this database registered the same version
    between our read and our insert."""
    try:
        return _register_configured(settings, sessions, version, kind)
    except (VersionExistsError, IntegrityError):
        return _register_configured(settings, sessions, version, kind)


def configured_version(settings: Any) -> str | None:
    """The version name of the [model] section's model, read without building it (its family's `version_of`: the
    weights file's metadata or digest); None when its family must build it to name it, or cannot read it now (the
    build then says why)."""
    from model.factory import get_family

    m = settings.model
    try:
        version_of = get_family(m.name).version_of
        if version_of is None:
            return None
        # the options `build_detector` (daemon/process/service.py) creates it with: the backbone as the file it loads
        version = version_of(prompts=settings.prompts_file(), backbone=settings.backbone_file(),
                             image_size=m.image_size, class_name=m.class_name)
    except Exception:
        return None
    return str(version) if version else None


def start_detector(
    settings: Any,
    sessions: sessionmaker[Session],
    factory: Callable[[Any], Any],
    build: Callable[[Any, ModelVersion, Any], Any] = build_version_detector,
) -> Any:
    """The detector the daemon starts with, built once: the configured model is registered under the version its
    family names without building it (`configured_version`), then the registry's active version is built: the
    configured model by `factory(settings)`, another version by `build` (a failing one: the configured model, as
    `startup_detector`). A family that must be built to be named goes through `startup_detector`."""
    version = configured_version(settings)
    if version is None:
        return startup_detector(settings, sessions, factory(settings), build)
    wanted = _register_or_join(settings, sessions, version, settings.model.name)
    if wanted is None:
        return factory(settings)
    try:
        chosen = build(settings, wanted, None)
    except Exception as exc:
        log.error("cannot load the active model version %s (%s); running the configured %s instead",
                  wanted.version, exc, version)
        return factory(settings)
    log.info("running the registry's active model version %s (the configured model is %s)", wanted.version, version)
    return chosen


def startup_detector(
    settings: Any,
    sessions: sessionmaker[Session],
    detector: Any,
    build: Callable[[Any, ModelVersion, Any], Any] = build_version_detector,
) -> Any:
    """Register the configured model (built: `detector`) on first use and return the detector the daemon should
    start with: `detector`, or the registry's active version built sharing its backbone where it can."""
    version, kind = str(detector.version), str(getattr(detector, "name", "unknown"))
    wanted = _register_or_join(settings, sessions, version, kind)
    if wanted is None:
        return detector
    try:
        chosen = build(settings, wanted, detector)
    except Exception as exc:
        log.error("cannot load the active model version %s (%s); running the configured %s instead",
                  wanted.version, exc, version)
        return detector
    log.info("running the registry's active model version %s (the configured model is %s)", wanted.version, version)
    return chosen


class ModelWatcher:
    """Polls the active version; when it differs from the running detector, builds it and swaps it in.

    `current()` returns the detector in use, `swap(detector)` installs one (returns an Event set once in use).
    A version that fails to load is logged once and retried only after the active version changes again.
    """

    def __init__(
        self,
        settings: Any,
        sessions: sessionmaker[Session],
        *,
        current: Callable[[], Any],
        swap: Callable[[Any], threading.Event],
        build: Callable[[Any, ModelVersion, Any], Any] = build_version_detector,
        poll_s: float = 2.0,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.current = current
        self.swap = swap
        self.build = build
        self.poll_s = poll_s
        self.last_error: str | None = None
        self.swaps = 0
        self._failed: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # e.g. the database briefly unreachable: try again next poll
                self.last_error = f"cannot check the active model version: {exc}"
                log.warning("%s", self.last_error)

    def check(self, wait_s: float = 60.0) -> bool:
        """Swap to the registry's active version if it is not the one running; True when swapped."""
        with self._lock:
            with self.sessions() as session:
                row = active_model_version(session)
            current = self.current()
            if row is None or row.version == str(getattr(current, "version", "")):
                self._failed = None
                return False
            if row.version == self._failed:
                return False
            try:
                detector = self.build(self.settings, row, current)
            except Exception as exc:
                self._failed = row.version
                self.last_error = f"cannot load model version {row.version}: {exc}"
                log.error("%s; still running %s", self.last_error, getattr(current, "version", "?"))
                return False
            in_use = self.swap(detector)
            if not in_use.wait(wait_s):
                log.warning("model version %s not in use after %.0fs (no batch yet?)", row.version, wait_s)
            self.swaps += 1
            self.last_error = None
            log.info("now inspecting with model version %s", row.version)
            return True
