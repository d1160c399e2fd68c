"""PatchCore's small-rotation reference augmentation (`augment = "rotate"`, model/patchcore/rotation.py): the turns
are exact where they can be checked, the bank holds the turned views, and a normal part placed at another angle
scores lower against it while a defect still stands out."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from model.patchcore import augment_references, build_patchcore
from model.patchcore.rotation import ROTATION_DEGREES, rotate_images
from model.preprocess import OPENAI_MEAN, OPENAI_STD

SIZE = 128


def test_turns_are_exact_rotations() -> None:
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(rotate_images(images, 0.0), images)
    # a quarter turn maps pixel centres onto pixel centres: exactly torch.rot90 (counter-clockwise as displayed)
    torch.testing.assert_close(rotate_images(images, 90.0), torch.rot90(images, 1, dims=(-2, -1)))
    torch.testing.assert_close(rotate_images(images, -90.0), torch.rot90(images, 3, dims=(-2, -1)))
    # mirrored borders: a uniform image stays uniform at any angle (no blank corners)
    flat = torch.full((1, 3, 16, 16), 0.7)
    torch.testing.assert_close(rotate_images(flat, 17.0), flat)


def test_rotate_adds_the_turned_views_and_unknown_modes_are_named() -> None:
    images = torch.randn(3, 3, 16, 16)
    views = augment_references(images, "rotate")
    assert views.shape[0] == 3 * (1 + 2 * len(ROTATION_DEGREES))
    assert torch.equal(views[:3], images)
    torch.testing.assert_close(views[3:6], rotate_images(images, ROTATION_DEGREES[0]))
    torch.testing.assert_close(views[6:9], rotate_images(images, -ROTATION_DEGREES[0]))
    with pytest.raises(ValueError, match="'spin' is not one of none, flip, rot90, d4, rotate"):
        augment_references(images, "spin")


def _part(angle: float, defect: bool = False) -> torch.Tensor:
    """A grey plate with a dark asymmetric bracket turned by `angle`, CLIP-normalised (1, 3, S, S)."""
    image = np.full((SIZE, SIZE, 3), 170, np.uint8)
    centre = SIZE / 2
    outline = [(-40, -12), (40, -12), (40, 12), (10, 12), (10, 34), (-10, 34), (-10, 12), (-40, 12)]
    theta = math.radians(angle)
    points = [(centre + x * math.cos(theta) + y * math.sin(theta), centre - x * math.sin(theta) + y * math.cos(theta))
              for x, y in outline]
    cv2.fillPoly(image, [np.round(np.array(points)).astype(np.int32)], (40, 40, 40))
    if defect:
        cv2.circle(image, (int(centre) + 20, int(centre) - 30), 5, (250, 250, 250), -1)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(255).unsqueeze(0)
    return (pixels - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def test_a_part_placed_at_another_angle_scores_lower_with_turned_references() -> None:
    reference, turned, defective = _part(0.0), _part(15.0), _part(15.0, defect=True)
    scores = {}
    for augment in ("none", "rotate"):
        detector = build_patchcore(image_size=SIZE, device="cpu", augment=augment)
        bank = detector.set_references(reference)
        assert bank.metadata["augment"] == augment
        assert bank.rows.shape[0] == (SIZE // 8) ** 2 * (1 if augment == "none" else 1 + 2 * len(ROTATION_DEGREES))
        scores[augment] = detector.predict(torch.cat([turned, defective])).scores.tolist()
    (none_turned, _), (rotate_turned, rotate_defective) = scores["none"], scores["rotate"]
    print(scores)
    assert rotate_turned < 0.8 * none_turned
    assert rotate_defective > 1.5 * rotate_turned
