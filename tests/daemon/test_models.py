"""Model versions: the registry on SQLite and PostgreSQL (register, activate, rollback, errors), startup
registration, and the running daemon hot-swapping to an activated version (and back on rollback) while frames keep
flowing through a folder source: every frame gets exactly one row, and rows carry the version that scored them.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from pathlib import Path

import cv2
import pytest
import torch
from sqlalchemy import create_engine, select, text

from adapters.db import Inspection, ModelVersion, RejectedFrame, make_engine, make_session_factory, upgrade
from daemon.config.settings import load_config
from daemon.learning import versions as registry
from daemon.process.service import Service
from tests.daemon.test_retraining import small_rgb, write_config


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/registry.db"
    else:
        server = request.getfixturevalue("postgres").url
        name = f"t_{uuid.uuid4().hex[:12]}"
        admin = create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = server.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def test_register_activate_and_roll_back(sessions, tmp_path):
    files = {}
    for name in ("v1", "v2", "v3"):
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(b"weights")
    with sessions() as session, session.begin():
        for name in ("v1", "v2", "v3"):
            registry.register_version(session, version=name, kind="anomalyclip", prompts_path=files[name],
                                      metrics={"image_auroc": 0.5})
        with pytest.raises(registry.ModelVersionError, match="already registered"):
            registry.register_version(session, version="v1", kind="anomalyclip", prompts_path=None)
    with pytest.raises(registry.UnknownVersionError, match="no model version 'v9'"):
        registry.activate_version(sessions, "v9")
    with pytest.raises(registry.ModelVersionError, match="no earlier active"):
        registry.rollback(sessions)

    assert registry.activate_version(sessions, "v1").status == "active"
    registry.activate_version(sessions, "v2")
    with sessions() as session:
        by_name = {v.version: v for v in registry.list_versions(session)}
        assert [by_name[n].status for n in ("v1", "v2", "v3")] == ["retired", "active", "candidate"]
        assert by_name["v2"].activated_at >= by_name["v1"].activated_at
        assert len(session.scalars(select(ModelVersion).where(ModelVersion.status == "active")).all()) == 1

    assert registry.rollback(sessions).version == "v1"
    with sessions() as session:
        assert registry.get_version(session, "v1").status == "active"
        assert registry.get_version(session, "v2").status == "retired"
    assert registry.rollback(sessions).version == "v2"  # rolling back a rollback

    files["v3"].unlink()
    with pytest.raises(registry.ModelVersionError, match=r"weights file .* is missing"):
        registry.activate_version(sessions, "v3")
    with sessions() as session:
        assert registry.get_version(session, "v2").status == "active"


def _perturbed_prompts(settings, golden_dir: Path, version: str) -> Path:
    from model import load_prompts, save_prompts

    original = load_prompts(golden_dir / "prompts_official_format.pth")
    generator = torch.Generator().manual_seed(7)
    state = {k: v + 0.5 * torch.randn(v.shape, generator=generator) if k.startswith("ctx_") else v
             for k, v in original.state.items()}
    return save_prompts(registry.version_file(settings, version), state, {"version": version})


def test_hot_swap_and_rollback_while_frames_flow(tmp_path, golden_dir, samples_dir):
    config = write_config(tmp_path, golden_dir, extra="""
[[sources]]
id = "inbox"
kind = "folder"
uri = "inbox"
line = "l1"
threshold = 0.5
settle_s = 0.02
poll_interval_s = 0.02
""")
    (tmp_path / "inbox").mkdir()
    settings = load_config(config, environ={})
    images = [small_rgb(p, 128) for p in sorted((samples_dir / "hazelnut" / "test" / "good").glob("*.jpg"))]
    service = Service(settings)
    service.start()
    initial = service.pipeline.detector.version
    written: list[str] = []
    stop_feeding = threading.Event()

    def feed() -> None:  # a frame every ~40 ms until told to stop
        index = 0
        while not stop_feeding.is_set() or index < 20:
            name = f"frame_{index:04d}.png"
            cv2.imwrite(str(tmp_path / "inbox" / f".{name}"), images[index % len(images)])
            (tmp_path / "inbox" / f".{name}").rename(tmp_path / "inbox" / name)
            written.append(name)
            index += 1
            time.sleep(0.04)

    def versions_in_rows() -> list[str]:
        with service.sessions() as session:
            return list(session.scalars(select(Inspection.model_version).order_by(Inspection.id)))

    def wait_rows(predicate, timeout=60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(versions_in_rows()):
                return True
            time.sleep(0.1)
        return False

    feeder = threading.Thread(target=feed)
    try:
        with service.sessions() as session:  # the configured model was registered as the active version
            row = registry.get_version(session, initial)
            assert row.status == "active" and Path(row.prompts_path).is_file()
        feeder.start()
        assert wait_rows(lambda v: len(v) >= 5)
        with service.sessions() as session, session.begin():
            registry.register_version(session, version="v2-test", kind="anomalyclip",
                                      prompts_path=_perturbed_prompts(settings, golden_dir, "v2-test"))
        registry.activate_version(service.sessions, "v2-test")  # what the API/CLI does; the watcher notices
        assert wait_rows(lambda v: v.count("v2-test") >= 5), "no rows from the activated version"
        registry.rollback(service.sessions)
        assert wait_rows(lambda v: "v2-test" in v and v[-1] == initial and v.count(initial) >= v.index("v2-test") + 5)
        stop_feeding.set()
        feeder.join()
        assert wait_rows(lambda v: len(v) >= len(written)), f"{len(versions_in_rows())} rows of {len(written)}"
    finally:
        stop_feeding.set()
        if feeder.is_alive():
            feeder.join()
        service.stop()

    assert service.models.swaps == 2 and service.pipeline.failed == 0
    with service.sessions() as session:
        rows = session.scalars(select(Inspection).order_by(Inspection.id)).all()
        names = [Path(r.frame_name).name for r in rows]
        assert sorted(names) == sorted(written)  # every frame exactly once, none lost
        assert session.scalars(select(RejectedFrame)).all() == []
        assert registry.get_version(session, initial).status == "active"
        assert registry.get_version(session, "v2-test").status == "retired"
    # one switch to v2 and one back, each row scored by exactly one model
    sequence = [r.model_version for r in rows]
    changes = [(a, b) for a, b in itertools.pairwise(sequence) if a != b]
    assert changes == [(initial, "v2-test"), ("v2-test", initial)]
    # the swapped-in model really is another one: the same image scores differently under it
    def image(row) -> int:
        return int(Path(row.frame_name).stem[-4:]) % len(images)

    v1_scores = {image(r): r.score for r in rows if r.model_version == initial}
    v2_scores = {image(r): r.score for r in rows if r.model_version == "v2-test"}
    common = set(v1_scores) & set(v2_scores)
    assert common and any(abs(v1_scores[i] - v2_scores[i]) > 1e-6 for i in common)


def test_startup_runs_the_registrys_active_version(tmp_path, golden_dir):
    settings = load_config(write_config(tmp_path, golden_dir), environ={})
    engine = make_engine(settings.database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    try:
        from daemon.process.service import build_detector

        configured = build_detector(settings)
        assert registry.startup_detector(settings, sessions, configured) is configured
        with sessions() as session, session.begin():
            registry.register_version(session, version="promoted", kind="anomalyclip",
                                      prompts_path=_perturbed_prompts(settings, golden_dir, "promoted"))
        registry.activate_version(sessions, "promoted")
        # a restart with the same [model] section keeps the promoted version, sharing the loaded backbone
        chosen = registry.startup_detector(settings, sessions, configured)
        assert chosen.version == "promoted"
        assert chosen.model.backbone is configured.model.backbone
        with sessions() as session:
            assert len(registry.list_versions(session)) == 2
    finally:
        engine.dispose()


def test_startup_builds_one_detector_the_active_versions(tmp_path, golden_dir):
    """The daemon's start builds one detector: the configured model is named from its prompts file alone
    (`ModelFamily.version_of`), registered, and only the registry's active version is built."""
    from daemon.process.service import build_detector

    settings = load_config(write_config(tmp_path, golden_dir), environ={})
    engine = make_engine(settings.database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    built = []

    def factory(s):
        built.append("configured")
        return build_detector(s)

    def build(s, row, current):
        built.append(row.version)
        return registry.build_version_detector(s, row, current)

    try:
        first = registry.start_detector(settings, sessions, factory, build)
        assert built == ["configured"] and first.version == registry.configured_version(settings)
        with sessions() as session:
            assert registry.active_model_version(session).version == first.version
        with sessions() as session, session.begin():
            registry.register_version(session, version="promoted", kind="anomalyclip",
                                      prompts_path=_perturbed_prompts(settings, golden_dir, "promoted"))
        registry.activate_version(sessions, "promoted")
        built.clear()
        chosen = registry.start_detector(settings, sessions, factory, build)  # a restart: the promoted version only
        assert built == ["promoted"] and chosen.version == "promoted"
        with sessions() as session, session.begin():
            registry.get_version(session, "promoted").prompts_path = str(tmp_path / "gone.safetensors")
        built.clear()
        fallback = registry.start_detector(settings, sessions, factory, build)  # it cannot load: the configured one
        assert built == ["promoted", "configured"] and fallback.version == first.version
    finally:
        engine.dispose()


def test_two_workers_registering_the_same_model_at_once(sessions, tmp_path, golden_dir, monkeypatch):
    """Two workers start against one database: the other one registers (and activates) the configured version
    while this one is copying its prompts. This one must start with it, not fail."""
    from types import SimpleNamespace

    settings = load_config(write_config(tmp_path, golden_dir), environ={})
    configured = SimpleNamespace(version="anomalyclip-shared", name="anomalyclip")
    copy = registry._copy_prompts
    raced = []

    def other_worker_wins(prompts, target, version, kind):
        if not raced:
            raced.append(version)
            with sessions() as session, session.begin():
                row = registry.register_version(session, version=version, kind="anomalyclip", prompts_path=None)
                registry._make_active(session, row)
        return copy(prompts, target, version, kind)

    monkeypatch.setattr(registry, "_copy_prompts", other_worker_wins)
    assert registry.startup_detector(settings, sessions, configured) is configured
    assert raced == ["anomalyclip-shared"]
    with sessions() as session:
        versions = registry.list_versions(session)
    assert [(v.version, v.status) for v in versions] == [("anomalyclip-shared", "active")]


@pytest.mark.parametrize("name", ["clip", "winclip"])
def test_a_baseline_is_named_without_building_so_the_daemon_builds_it_once(tmp_path, golden_dir, name):
    """The CLIP baselines declare `version_of` (the backbone file's digest): the configured version is known before
    any build, and it is the version the build gives."""
    from daemon.process.service import build_detector

    config = write_config(tmp_path, golden_dir)
    config.write_text(config.read_text().replace("[model]\n", f'[model]\nname = "{name}"\n', 1))
    settings = load_config(config, environ={})
    named = registry.configured_version(settings)
    assert named is not None and named.startswith(f"{name}-tiny_clip_openai_fp16-")
    assert build_detector(settings).version == named
