"""A patchcore-head model version in the registry: what the model watcher (and a restart) builds from it, and
rollback to PatchCore. The per-source detectors are built from this base by daemon/references/manager.py."""

from __future__ import annotations

import pytest

from daemon.config.settings import load_config
from daemon.learning.versions import (
    ModelVersionError,
    activate_version,
    build_version_detector,
    register_version,
    rollback,
)
from daemon.references.manager import NeedsReferences
from tests.daemon.test_api import sqlite_env  # noqa: F401  (the fixture)


def test_a_head_version_builds_a_reference_base_carrying_its_head(sqlite_env, tmp_path):  # noqa: F811
    settings = load_config(None, environ={}, overrides={"model": {"name": "patchcore", "image_size": 160},
                                                        "storage": {"dir": str(tmp_path / "artifacts")}})
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"not read here")
    with sqlite_env.sessions() as session, session.begin():
        register_version(session, version="patchcore-efficientnet-lite0-s160", kind="patchcore", prompts_path=None)
        register_version(session, version="patchcore-head-r1", kind="patchcore-head", prompts_path=head)
    activate_version(sqlite_env.sessions, "patchcore-efficientnet-lite0-s160")
    row = activate_version(sqlite_env.sessions, "patchcore-head-r1")

    base = build_version_detector(settings, row)
    assert isinstance(base, NeedsReferences)
    assert (base.name, base.version, base.image_size, base.weights) == ("patchcore-head", "patchcore-head-r1", 160,
                                                                     str(head))
    # rollback: the PatchCore version again, without a head
    previous = rollback(sqlite_env.sessions)
    base = build_version_detector(settings, previous)
    assert (base.name, base.version, base.weights) == ("patchcore", "patchcore-efficientnet-lite0-s160", None)

    head.unlink()  # a version whose head file is gone is refused, naming it
    with pytest.raises(ModelVersionError, match=r"head\.safetensors is missing"):
        build_version_detector(settings, row)
