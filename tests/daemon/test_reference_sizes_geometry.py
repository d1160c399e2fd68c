"""References of one source may differ in size beyond the 10 % tolerance when its geometry feeds every frame at its
own shape (resize "fit" or "tile", no ROI or ignore polygon; issue 20): the daemon runs `patchcore` (real
EfficientNet-Lite0 weights) on a bank of differently sized references and alerts on a defect; under "squash", or
with an ROI (frame pixels that would land elsewhere on a frame of another size), the same set is refused naming the
sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from adapters.db import Inspection
from daemon.config.settings import load_config
from daemon.process.service import Service
from daemon.references import geometry_overrides as overrides
from daemon.references.files import sizes_may_differ
from daemon.references.manager import ReferenceManager
from tests.daemon.test_e2e_geometry import _write
from tests.model.test_geometry import draw_defect, texture
from tests.waiting import wait_until

SIZES = [(256, 512), (256, 300), (320, 640)]  # (height, width): 300 is 41 % narrower than 512


def _settings(tmp_path: Path, resize: str):
    return load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "references": str(tmp_path / "references")},
        "runtime": {"device": "cpu", "max_batch_delay_ms": 20, "shutdown_grace_s": 20, "max_batch_size": 4},
        "sources": [{"id": "line", "kind": "folder", "uri": str(tmp_path / "inbox"), "settle_s": 0.05,
                     "poll_interval_s": 0.05, "resize": resize}],
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")}, "api": {"enabled": False},
    })


def _references(tmp_path: Path) -> None:
    for seed, (height, width) in enumerate(SIZES, start=1):
        _write(tmp_path / "references" / f"good-{seed}.png", texture(height, width, seed))


class _Base:
    name, version, image_size, device = "patchcore", "fake", 256, "cpu"


@pytest.mark.parametrize("resize", ["squash", "roi"])
def test_references_of_other_sizes_are_refused_when_the_geometry_needs_one_size(tmp_path, resize):
    _references(tmp_path)
    settings = _settings(tmp_path, "squash" if resize == "squash" else "fit")
    if resize == "roi":
        overrides.save_override(settings, "line", {"roi": [0, 0, 256, 256]}, set_by="test")
    assert not sizes_may_differ(settings, "line")
    manager = ReferenceManager(settings, builder=lambda base, files, cache: object(), source_ids=["line"],
                               auto_calibrate=False)
    manager.route(_Base())
    message = manager.unavailable["line"]
    assert "reference good-2.png is 300x256" in message and "good-1.png is 512x256" in message, message
    assert "more than 10 % from 512 px" in message and 'resize = "fit" or "tile" without roi' in message


def test_fit_runs_on_references_of_different_sizes_and_alerts_on_a_defect(tmp_path):
    _references(tmp_path)
    (tmp_path / "inbox").mkdir()
    settings = _settings(tmp_path, "fit")
    assert sizes_may_differ(settings, "line")
    service = Service(settings, serve_http=False)
    service.start()
    try:
        state = service.references.states["line"]
        assert "line" not in service.references.unavailable and state.detector is not None, state.error
        assert state.version and "-fit+ref-" in state.version and state.version.endswith("-k3"), state.version
        _write(tmp_path / "inbox" / "good.png", texture(256, 400, 7))
        _write(tmp_path / "inbox" / "bad.png", draw_defect(texture(256, 400, 8), 300, 120, radius=10))

        def rows() -> dict[str, Inspection]:
            with service.sessions() as session:
                return {Path(r.frame_name).name: r for r in session.scalars(select(Inspection))}

        assert wait_until(lambda: len(rows()) == 2, timeout=180), f"{len(rows())} of 2 inspected"
        found = rows()
        assert found["bad.png"].is_anomalous and not found["good.png"].is_anomalous
        assert found["bad.png"].error is None and found["bad.png"].regions
    finally:
        service.stop()
