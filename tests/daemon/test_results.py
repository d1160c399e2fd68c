"""Regions from hand-made maps; payloads follow the contract."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from adapters.mqtt import alert_payload, inspection_payload
from adapters.timeutil import rfc3339
from daemon.frames.results import extract_regions, map_to_frame


def test_two_components_with_boxes_area_and_peak():
    anomaly_map = np.zeros((20, 30), np.float32)
    anomaly_map[2:5, 3:7] = 0.7  # 3x4 block
    anomaly_map[3, 4] = 0.9
    anomaly_map[10:20, 25:30] = 0.6  # 10x5 block at the corner
    mask, regions = extract_regions(anomaly_map, 0.5)
    assert mask.sum() == 12 + 50
    assert [r.as_dict() for r in regions] == [
        {"x": 3, "y": 2, "w": 4, "h": 3, "area": 12, "peak": 0.9},
        {"x": 25, "y": 10, "w": 5, "h": 10, "area": 50, "peak": 0.6},
    ]


def test_diagonal_pixels_are_one_region_and_threshold_is_inclusive():
    anomaly_map = np.zeros((5, 5), np.float32)
    anomaly_map[0, 0] = anomaly_map[1, 1] = 0.5
    _, regions = extract_regions(anomaly_map, 0.5)
    assert len(regions) == 1 and regions[0].area == 2


def test_nothing_above_threshold_and_min_area():
    anomaly_map = np.full((8, 8), 0.2, np.float32)
    mask, regions = extract_regions(anomaly_map, 0.5)
    assert not mask.any() and regions == []
    anomaly_map[0, 0] = 0.8
    anomaly_map[4:7, 4:7] = 0.8
    mask, regions = extract_regions(anomaly_map, 0.5, min_area=2)
    assert [r.area for r in regions] == [9] and mask.sum() == 9 and not mask[0, 0]


def test_more_components_than_16_bit_labels_hold():
    """Isolated pixels on every other row and column: 76,800 components, past the 16-bit label range."""
    anomaly_map = np.zeros((480, 640), np.float32)
    anomaly_map[::2, ::2] = np.linspace(0.6, 0.9, 320 * 240, dtype=np.float32).reshape(240, 320)
    mask, regions = extract_regions(anomaly_map, 0.5, max_regions=3)
    assert mask.sum() == 76_800
    assert [(r.x, r.y, r.area) for r in regions] == [(638, 478, 1), (636, 478, 1), (634, 478, 1)]
    assert regions[0].peak == np.float32(0.9)


def test_map_to_frame_resizes_to_frame_shape():
    resized = map_to_frame(np.ones((16, 16), np.float32) * 0.25, width=40, height=30)
    assert resized.shape == (30, 40) and np.allclose(resized, 0.25)


def test_payloads_have_the_contract_keys():
    ts = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=timezone.utc)
    alert = alert_payload(inspection_id=7, frame_id="f", captured_at=ts, source="s", line="l", score=0.93,
                          threshold=0.6, model_version="v1", regions=[])
    assert set(alert) == {"id", "inspection_id", "frame_id", "ts", "source", "line", "score", "threshold",
                          "model_version", "regions", "mask_url", "heatmap_url"}
    assert alert["ts"] == "2026-01-02T03:04:05.600Z" == rfc3339(ts)
    assert alert["mask_url"] == "/api/inspections/7/mask.png"
    assert alert["heatmap_url"] == "/api/inspections/7/heatmap.jpg"
    event = inspection_payload(inspection_id=7, frame_id="f", captured_at=ts, source="s", line="l", score=0.1,
                               is_anomalous=False, model_version="v1")
    assert set(event) == {"id", "frame_id", "ts", "source", "line", "score", "is_anomalous", "verdict",
                          "model_version"}
    assert event["verdict"] == "normal"
    undecided = inspection_payload(inspection_id=8, frame_id="g", captured_at=ts, source="s", line="l", score=None,
                                   is_anomalous=None, model_version="mutual-v1")  # a window-filling frame
    assert (undecided["verdict"], undecided["is_anomalous"], undecided["score"]) == ("no_decision", None, None)
