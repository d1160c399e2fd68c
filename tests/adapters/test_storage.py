"""ArtifactStore: what the mask, heatmap and frame files hold, where they go, and what `anomalous` mode skips."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone

import cv2
import numpy as np
import pytest

from adapters.storage import ArtifactStore

WHEN = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


def frame_and_map(height: int = 48, width: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 1] = 100  # a green frame
    anomaly_map = np.zeros((height, width), np.float32)
    anomaly_map[:16, :16] = 1.0  # hot top-left corner
    return rgb, anomaly_map, anomaly_map >= 0.5


def test_mask_heatmap_and_frame_hold_what_they_should(tmp_path):
    store = ArtifactStore(tmp_path)
    rgb, anomaly_map, mask = frame_and_map()
    paths = store.write("k1", WHEN, rgb=rgb, anomaly_map=anomaly_map, mask=mask)
    assert paths.mask == "2026/03/04/k1_mask.png" and paths.heatmap == "2026/03/04/k1_heatmap.jpg"

    stored_mask = cv2.imread(str(store.path(paths.mask)), cv2.IMREAD_UNCHANGED)
    assert stored_mask.shape == mask.shape and set(np.unique(stored_mask)) == {0, 255}
    assert np.array_equal(stored_mask > 0, mask)

    heatmap = cv2.cvtColor(cv2.imread(str(store.path(paths.heatmap))), cv2.COLOR_BGR2RGB).astype(int)
    assert heatmap.shape == rgb.shape
    hot, cold = heatmap[4:12, 4:12].mean(axis=(0, 1)), heatmap[30:40, 40:60].mean(axis=(0, 1))
    # JET: 1.0 is dark red, 0.0 dark blue; blended half and half over the green frame.
    assert hot[0] > 50 and hot[2] < 20 and cold[2] > 50 and cold[0] < 20
    assert abs(hot[1] - 50) < 12 and abs(cold[1] - 50) < 12

    frame = cv2.cvtColor(cv2.imread(str(store.path(paths.frame))), cv2.COLOR_BGR2RGB)
    assert np.abs(frame.astype(int) - rgb).max() < 8


def test_received_jpeg_is_kept_byte_for_byte(tmp_path):
    store = ArtifactStore(tmp_path)
    rgb, anomaly_map, mask = frame_and_map()
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    paths = store.write("k2", WHEN, rgb=rgb, anomaly_map=anomaly_map, mask=mask, frame_bytes=jpeg)
    assert store.path(paths.frame).read_bytes() == jpeg
    png = cv2.imencode(".png", rgb)[1].tobytes()
    paths = store.write("k3", WHEN, rgb=rgb, anomaly_map=anomaly_map, mask=mask, frame_bytes=png)
    assert store.path(paths.frame).read_bytes()[:3] == b"\xff\xd8\xff"  # re-encoded as JPEG


def test_empty_masks_of_different_sizes(tmp_path):
    """The empty mask PNG is encoded once per size: each size must still get its own."""
    store = ArtifactStore(tmp_path)
    for key, (height, width) in {"a": (48, 64), "b": (30, 20), "c": (48, 64)}.items():
        rgb, anomaly_map, _ = frame_and_map(height, width)
        paths = store.write(key, WHEN, rgb=rgb, anomaly_map=anomaly_map * 0, mask=np.zeros((height, width), bool))
        stored = cv2.imread(str(store.path(paths.mask)), cv2.IMREAD_UNCHANGED)
        assert stored.shape == (height, width) and not stored.any()


def test_anomalous_mode_writes_maps_only_for_anomalous_frames(tmp_path):
    store = ArtifactStore(tmp_path, artifacts="anomalous")
    rgb, anomaly_map, mask = frame_and_map()
    normal = store.write("n", WHEN, rgb=rgb, anomaly_map=anomaly_map, mask=mask, anomalous=False)
    assert normal.mask is None and normal.heatmap is None and normal.frame is not None
    flagged = store.write("a", WHEN, rgb=rgb, anomaly_map=anomaly_map, mask=mask, anomalous=True)
    assert all(store.path(p).is_file() for p in flagged.all()) and len(flagged.all()) == 3
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "a_frame.jpg", "a_heatmap.jpg", "a_mask.png", "n_frame.jpg"]
    with pytest.raises(ValueError, match="artifacts"):
        ArtifactStore(tmp_path, artifacts="some")


def test_paths_cannot_escape_and_a_removed_day_folder_is_made_again(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(ValueError, match="outside"):
        store.path("../elsewhere.png")
    rgb, anomaly_map, mask = frame_and_map()
    old = store.write("old", datetime(2026, 1, 1, tzinfo=timezone.utc), rgb=rgb, anomaly_map=anomaly_map, mask=mask)
    new = store.write("new", WHEN, rgb=rgb, anomaly_map=anomaly_map, mask=mask)
    shutil.rmtree(store.path(old.frame).parent)  # what retention (daemon/process/retention.py) does to an emptied day
    assert not any(store.path(p).exists() for p in old.all()) and all(store.path(p).exists() for p in new.all())
    late = store.write("late", datetime(2026, 1, 1, tzinfo=timezone.utc), rgb=rgb, anomaly_map=anomaly_map, mask=mask)
    assert all(store.path(p).is_file() for p in late.all())  # the purged day's folder is made again
