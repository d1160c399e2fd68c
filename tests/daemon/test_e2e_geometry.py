"""End to end: the daemon runs `patchcore` (real EfficientNet-Lite0 weights) on large non-square frames with a
per-source geometry (resize "fit", an ROI, an ignore polygon): the bank and the calibration go through that
geometry, and a small defect drawn at a known spot of a 1800 x 600 frame alerts with a region box on it, in the
frame's own pixels; a dark mark under the ignore polygon and one outside the ROI give no region."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import select

from adapters.db import Inspection, SourceThreshold
from daemon.config.settings import ConfigError, load_config
from daemon.process.service import Service
from tests.model.test_geometry import draw_defect, texture
from tests.waiting import wait_until

DEFECT = (1400, 200)  # x, y in frame pixels
IGNORED = (500, 330)
OUTSIDE_ROI = (40, 300)
ROI = [100, 0, 1700, 600]
IGNORE = [[[400, 230], [600, 230], [600, 430], [400, 430]]]  # the mark and a margin around it


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _settings(tmp_path: Path, **model):
    return load_config(None, environ={}, overrides={
        "model": {"name": "patchcore", "references": str(tmp_path / "references"), **model},
        "runtime": {"device": "cpu", "max_batch_delay_ms": 20, "shutdown_grace_s": 20, "max_batch_size": 4},
        "sources": [{"id": "line", "kind": "folder", "uri": str(tmp_path / "inbox"), "settle_s": 0.05,
                     "poll_interval_s": 0.05, "resize": "fit", "roi": ROI, "ignore_polygons": IGNORE}],
        "mqtt": {"enabled": False}, "database": {"url": f"sqlite:///{tmp_path}/anomalyd.db"},
        "storage": {"dir": str(tmp_path / "artifacts")}, "api": {"enabled": False},
    })


def test_large_frame_defect_alerts_with_a_box_on_it(tmp_path):
    for seed in (1, 2, 3):
        _write(tmp_path / "references" / f"good-{seed}.png", texture(600, 1800, seed))
    good = texture(600, 1800, 7)
    bad = draw_defect(draw_defect(draw_defect(texture(600, 1800, 8), *DEFECT, radius=14), *IGNORED, radius=20),
                      *OUTSIDE_ROI, radius=20)
    masked_only = draw_defect(draw_defect(texture(600, 1800, 9), *IGNORED, radius=20), *OUTSIDE_ROI, radius=20)
    settings = _settings(tmp_path)
    (tmp_path / "inbox").mkdir()
    service = Service(settings, serve_http=False)
    service.start()
    try:
        version = service.references.states["line"].version
        assert version and "-fit-roi100x0x1700x600-ign" in version, version
        with service.sessions() as session:
            calibration = session.scalars(select(SourceThreshold)).one()
        assert calibration.model_version == version and calibration.n_frames == 3 + 3 * 8
        for name, rgb in (("good.png", good), ("bad.png", bad), ("masked.png", masked_only)):
            _write(tmp_path / "inbox" / name, rgb)

        def rows() -> dict[str, Inspection]:
            with service.sessions() as session:
                return {Path(r.frame_name).name: r for r in session.scalars(select(Inspection))}

        assert wait_until(lambda: len(rows()) == 3, timeout=300), f"{len(rows())} of 3 inspected"
        by_name = rows()
        print({name: (round(row.score, 3), row.regions) for name, row in by_name.items()},
              calibration.threshold, calibration.pixel_threshold)
        assert (by_name["bad.png"].width, by_name["bad.png"].height) == (1800, 600)
        assert by_name["bad.png"].is_anomalous and not by_name["good.png"].is_anomalous
        assert not by_name["masked.png"].is_anomalous  # its only marks are ignored or outside the ROI
        regions = by_name["bad.png"].regions
        assert regions
        for region in regions:  # every box is on the defect, none on the ignored or cropped marks
            assert region["x"] - 20 <= DEFECT[0] <= region["x"] + region["w"] + 20, region
            assert region["y"] - 20 <= DEFECT[1] <= region["y"] + region["h"] + 20, region
    finally:
        service.stop()


def test_geometry_for_a_clip_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="resize 'tile', roi and ignore_polygons need model patchcore"):
        load_config(None, environ={}, overrides={"model": {"name": "anomalyclip", "resize": "tile"}})
    with pytest.raises(ConfigError, match=r"roi \[0, 0, 4, 4\]"):
        load_config(None, environ={}, overrides={"model": {"name": "patchcore", "roi": [0, 0, 4, 4]}})
