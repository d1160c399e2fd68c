"""From a model output to what is stored: map at frame size, mask, regions (the MQTT payloads are in
`adapters.mqtt`, with the rest of the MQTT contract).

Regions are the 8-connected components of the thresholded anomaly map (at the frame's size), each with its
bounding box, area in pixels and peak map value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class Region:
    x: int
    y: int
    w: int
    h: int
    area: int
    peak: float

    def as_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h, "area": self.area, "peak": round(self.peak, 6)}


def map_to_frame(anomaly_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """A model-space (S,S) map resized (bilinear) to the frame's (height, width), float32."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.shape == (height, width):
        return anomaly_map
    return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)


def threshold_mask(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels at or above `threshold` (bool)."""
    return np.asarray(anomaly_map) >= threshold


def extract_regions(
    anomaly_map: np.ndarray, threshold: float, *, min_area: int = 1, max_regions: int = 50
) -> tuple[np.ndarray, list[Region]]:
    """Connected components (8-connectivity) of `anomaly_map >= threshold`.

    Returns the binary mask (bool, same shape) and the regions, largest peak first, at most `max_regions`;
    components smaller than `min_area` pixels are dropped from the list and the mask.
    """
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    mask = threshold_mask(anomaly_map, threshold)
    if not mask.any():
        return mask, []
    binary = mask.view(np.uint8)
    try:
        # 16-bit labels: 3x faster than 32-bit ones on a 640x480 frame (half the memory to fault in); OpenCV
        # raises instead of wrapping when a noisy map has 65535 components or more.
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_16U)
    except cv2.error:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    regions: list[Region] = []
    small: list[int] = []
    for index in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[index])
        if area < min_area:
            small.append(index)
            continue
        window = anomaly_map[y:y + h, x:x + w]
        peak = float(window[labels[y:y + h, x:x + w] == index].max())
        regions.append(Region(x=x, y=y, w=w, h=h, area=area, peak=peak))
    if small:
        mask &= ~np.isin(labels, small)
    regions.sort(key=lambda region: (-region.peak, -region.area))
    return mask, regions[:max_regions]
