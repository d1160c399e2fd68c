"""Small in-plane rotations of reference images, for the memory bank (`augment = "rotate"`).

Parts on a line are rarely placed at exactly the same angle (a nut turns on the belt, a plate sits a few degrees
off). With one or a few references PatchCore then flags the turned edges of a normal part; adding the references
turned by ±10° and ±20° to the bank covers that. Measured with bench/sweep_patchcore.py at 1 shot (docs/models.md):
metal_nut and metal_plate gain 15–20 image-AUROC points, the other categories stay within one test image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

ROTATION_DEGREES = (10.0, 20.0)


def rotate_images(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """(B, C, H, W) images turned by `degrees` about their centre (positive: counter-clockwise as displayed),
    bilinear, the borders mirrored so that no blank corners enter the bank."""
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid maps output to input coordinates (x right, y down): sampling at R(-θ)·p turns the content by +θ
    # counter-clockwise on screen.
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(matrix.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rotated_views(images: torch.Tensor, degrees: Sequence[float] = ROTATION_DEGREES) -> list[torch.Tensor]:
    """The images turned by +a and -a for each angle a."""
    return [rotate_images(images, sign * angle) for angle in degrees for sign in (1.0, -1.0)]
