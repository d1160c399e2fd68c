"""Frame geometry (model/geometry.py): squash / fit / tile plans, maps stitched back into the frame's own pixels with
the ROI offset and the ignore polygons applied, and PatchCore on the real EfficientNet-Lite0 weights finding a
small drawn defect in a large non-square frame at its place."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from model.detector import Prediction
from model.geometry import Geometry, GeometryError, make_geometry, plan_frame, predict_frames
from model.patchcore import build_patchcore


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """Blurred noise: a texture whose patches all look alike, shifted, turned or not (as the calibration's views
    are), and unlike a dark spot."""
    import cv2

    noise = np.random.default_rng(seed).normal(0, 1, (height, width)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 3)
    gray = 128 + 40 * blurred / blurred.std()
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def draw_defect(rgb: np.ndarray, x: int, y: int, radius: int = 12) -> np.ndarray:
    out = rgb.copy()
    yy, xx = np.mgrid[0:rgb.shape[0], 0:rgb.shape[1]]
    out[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = 10
    return out


class Darkness:
    """A stand-in detector: its map is how dark each input pixel is (0-1), its score the map's maximum."""

    name, image_size, device = "darkness", 256, torch.device("cpu")

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def predict(self, images: torch.Tensor, class_names=None) -> Prediction:
        self.shapes.append(tuple(images.shape))
        maps = (1.0 - (images[:, 0] * 0.26862954 + 0.48145466)).clamp(0, 1)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)


def test_plans_keep_the_aspect_or_tile_at_native_resolution():
    squash = plan_frame((600, 1800), Geometry("squash"), 256)
    assert squash.input_hw == (256, 256) and len(squash.origins) == 1
    fit = plan_frame((600, 1800), Geometry("fit"), 256)
    assert fit.input_hw == (256, 768)  # short side to 256, long side 3x, a multiple of 32
    assert plan_frame((285, 122), Geometry("fit"), 256).input_hw == (608, 256)  # 2.34 x 256 rounded to 32
    tile = plan_frame((600, 1800), Geometry("tile", tile_overlap=0.25), 256)
    assert tile.scaled == (600, 1800) and tile.input_hw == (256, 256)  # native: nothing resized
    ys, xs = sorted({o[0] for o in tile.origins}), sorted({o[1] for o in tile.origins})
    assert ys[0] == 0 and ys[-1] == 600 - 256 and xs[0] == 0 and xs[-1] == 1800 - 256
    assert all(b - a <= 256 * 0.75 + 1 for a, b in itertools.pairwise(xs))  # overlap at least 25 %
    small = plan_frame((122, 285), Geometry("tile"), 256)  # short side below S: padded (reflected), not enlarged
    assert small.scaled == (122, 285) and small.padded == (256, 285) and len(small.origins) == 2
    roi = plan_frame((600, 1800), Geometry("fit", roi=(100, 50, 900, 300)), 256)
    assert roi.roi == (100, 50, 900, 300) and roi.input_hw == (256, 768)


def test_auto_tiles_long_frames_at_their_short_side_and_squashes_the_others():
    auto = Geometry("auto")
    # the long part: tiles of its short side, exactly what tile with tile_size = 500 cuts
    long_part = plan_frame((500, 1263), auto, 256)
    assert long_part == plan_frame((500, 1263), Geometry("tile", tile_size=500), 256)
    assert long_part.scaled == (256, 647) and len(long_part.origins) == 4
    assert plan_frame((1263, 500), auto, 256).scaled == (647, 256)  # upright too
    # near-square frames, and long ones too small to lose detail to squashing, are squashed
    for hw in [(512, 512), (480, 640), (2048, 2448), (285, 122), (200, 450)]:
        assert plan_frame(hw, auto, 256) == plan_frame(hw, Geometry("squash"), 256), hw
    # the rule looks at the ROI, not the frame; tile_size, when set, sizes the tiles
    roi = Geometry("auto", roi=(0, 100, 1800, 600))
    assert plan_frame((1000, 2000), roi, 256) == plan_frame((1000, 2000), Geometry("tile", roi=(0, 100, 1800, 600),
                                                                                    tile_size=600), 256)
    assert plan_frame((500, 1263), Geometry("auto", tile_size=250), 256).scaled == (512, 1293)
    assert auto.may_tile and Geometry("tile").may_tile and not Geometry("fit").may_tile
    assert auto.bank_tag == "auto-o25" and not auto.plain


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(GeometryError, match="resize 'stretch'"):
        Geometry("stretch")
    with pytest.raises(GeometryError, match="roi"):
        make_geometry("fit", roi=[0, 0, 4, 100])
    with pytest.raises(GeometryError, match="at least 3 points"):
        make_geometry("fit", ignore=[[[0, 0], [5, 5]]])
    with pytest.raises(GeometryError, match="outside the 1800x600 frame"):
        plan_frame((600, 1800), Geometry("fit", roi=(1900, 0, 50, 50)), 256)


@pytest.mark.parametrize("resize", ["squash", "fit", "tile"])
def test_maps_come_back_in_frame_pixels_with_roi_and_ignore(resize):
    frame = np.full((600, 1800, 3), 230, np.uint8)
    frame[180:220, 1380:1420] = 0  # the defect, at (1400, 200)
    frame[380:420, 480:520] = 0  # a dark fixture, ignored
    frame[10:40, 20:60] = 0  # outside the ROI
    geometry = make_geometry(resize, roi=[100, 0, 1700, 600],
                             ignore=[[[450, 350], [550, 350], [550, 450], [450, 450]]])
    detector = Darkness()
    scores, maps = predict_frames(detector, [frame], geometry)
    frame_map = maps[0]
    assert frame_map.shape == (600, 1800)
    y, x = np.unravel_index(np.argmax(frame_map), frame_map.shape)
    assert abs(x - 1400) <= 25 and abs(y - 200) <= 25, (x, y)
    assert frame_map[:, :100].max() == 0.0  # outside the ROI: not inspected
    assert frame_map[350:451, 450:551].max() == 0.0  # ignored pixels score 0
    assert scores[0] == pytest.approx(frame_map.max(), abs=1e-5)
    if resize == "tile":
        assert detector.shapes[0][-2:] == (256, 256) and sum(s[0] for s in detector.shapes) > 10  # batched tiles


def test_patchcore_finds_a_small_defect_in_a_large_frame():
    """Real Lite0 weights: references and the inspected frame go through the same tiling; the map's peak is on
    the 24-pixel defect of a 1200 x 400 frame (2 % of its width)."""
    geometry = Geometry("tile")
    detector = build_patchcore(device="cpu", image_size=256, max_bank_rows=4096, geometry=geometry)
    references = [texture(400, 1200, seed) for seed in (1, 2)]
    from model.geometry import frame_inputs

    bank = detector.set_references([frame_inputs(r, geometry, 256) for r in references])
    assert bank.metadata["geometry"] == "tile-o25" and "tile-o25" in detector.version
    good = texture(400, 1200, 3)
    bad = draw_defect(good, 950, 130)
    scores, maps = detector.predict_frames([good, bad])
    assert maps[1].shape == (400, 1200)
    y, x = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert abs(x - 950) <= 30 and abs(y - 130) <= 30, (x, y)
    assert scores[1] > 1.5 * scores[0]


def test_tile_size_cuts_fewer_coarser_tiles_and_maps_come_back_in_frame_pixels():
    """A long part of 500 x 1263 tiled by its short side (`tile_size = 500`): 4 tiles instead of 21, each 500
    frame pixels resized to the model's 256, and the map of a defect drawn near the far end back at its place."""
    assert len(plan_frame((500, 1263), Geometry("tile"), 256).origins) == 21
    plan = plan_frame((500, 1263), Geometry("tile", tile_size=500), 256)
    assert plan.scaled == (256, 647) and plan.input_hw == (256, 256) and len(plan.origins) == 4
    assert Geometry("tile", tile_size=500).bank_tag == "tile-o25-t500" and Geometry("tile").bank_tag == "tile-o25"
    assert Geometry("tile", tile_size=500).as_dict()["tile_size"] == 500 and "tile_size" not in Geometry().as_dict()
    frame = np.full((500, 1263, 3), 230, np.uint8)
    frame[300:320, 1100:1120] = 0
    detector = Darkness()
    _, maps = predict_frames(detector, [frame], Geometry("tile", tile_size=500))
    assert maps[0].shape == (500, 1263) and detector.shapes == [(4, 3, 256, 256)]
    y, x = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    assert 295 <= y < 325 and 1095 <= x < 1125, (x, y)
    with pytest.raises(GeometryError, match="tile_size 8"):
        Geometry("tile", tile_size=8)


def test_a_frame_smaller_than_a_tile_is_padded_not_enlarged():
    """magnetic_tile-like frames (122 x 285): tiled at their own scale, the padding's map dropped."""
    frame = np.full((122, 285, 3), 230, np.uint8)
    frame[50:60, 200:210] = 0
    detector = Darkness()
    _, maps = predict_frames(detector, [frame], Geometry("tile"))
    assert maps[0].shape == (122, 285) and detector.shapes == [(2, 3, 256, 256)]
    y, x = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    assert 50 <= y < 60 and 200 <= x < 210


def test_tiles_held_at_once_stay_bounded_whatever_the_batch_of_frames(monkeypatch):
    """Many large tiled frames in one call: the inputs cut and not yet stitched never exceed `max_inputs` (the
    memory bound), small frames still share model batches, and the maps are those of frames run one by one."""
    import model.geometry as geometry_module

    frames = [draw_defect(texture(700, 1000, seed), 100 + 100 * seed, 300) for seed in range(5)]
    per_frame = len(plan_frame((700, 1000), Geometry("tile"), 256).origins)
    assert per_frame == 20
    frames += [draw_defect(texture(256, 256, 9 + seed), 128, 128) for seed in range(3)]  # 1 tile each
    held, peak = [0], [0]
    cut, stitch = geometry_module.cut_frame, geometry_module.stitch_maps

    def counting_cut(rgb, plan):
        held[0] += len(plan.origins)
        peak[0] = max(peak[0], held[0])
        return cut(rgb, plan)

    def counting_stitch(maps, plan, geometry):
        held[0] -= len(plan.origins)
        return stitch(maps, plan, geometry)

    monkeypatch.setattr(geometry_module, "cut_frame", counting_cut)
    monkeypatch.setattr(geometry_module, "stitch_maps", counting_stitch)
    detector = Darkness()
    scores, maps = predict_frames(detector, frames, Geometry("tile"), max_inputs=40, batch_size=8)
    assert peak[0] == 40 and held[0] == 0  # two 20-tile frames at a time, never all 103 tiles
    assert max(shape[0] for shape in detector.shapes) == 8
    # tiles of different frames share model calls: 40 + 40 + (20 + 3) inputs in 5 + 5 + 3, not 5 x 3 + 3 calls
    assert len(detector.shapes) == 13

    monkeypatch.setattr(geometry_module, "cut_frame", cut)
    monkeypatch.setattr(geometry_module, "stitch_maps", stitch)
    for index, rgb in enumerate(frames):
        alone_scores, alone_maps = predict_frames(Darkness(), [rgb], Geometry("tile"))
        assert scores[index] == pytest.approx(alone_scores[0])
        np.testing.assert_allclose(maps[index], alone_maps[0], atol=1e-6)


@pytest.mark.parametrize("hw", [(2829, 4243), (3000, 4000), (7000, 7000), (600, 40000)])
def test_a_frame_of_any_size_is_at_most_max_tiles(hw):
    from model.geometry import MAX_TILES

    plan = plan_frame(hw, Geometry("tile"), 256)
    assert MAX_TILES - 40 <= len(plan.origins) <= MAX_TILES, len(plan.origins)
