"""PatchCore's anomaly map as two small matrix products: `upsampled_blurred(scores, grid, size, sigma)`.

`PatchcoreModel.anomaly_maps` upsamples the (h, w) patch scores to the input's (H, W) (nearest) and blurs them
(Gaussian, torch's reflect padding): a 2-D convolution pass over H x W pixels per map, 33 taps each way at sigma 4.
Every step is linear and acts on each axis alone, so the map is A·S·Bᵀ with A (H, h) and B (W, w) the same steps
applied to the rows of an identity: a (256, 32) matrix instead of a padded 288 x 288 convolution, 0.09-0.1x
the time (bench/profile_frame.py --levers). The matrices are built once per shape by running the very
functions `anomaly_maps` runs (so the two cannot drift apart) and cached; the values equal the convolution's up to
fp32 rounding (tests/model/test_patchcore_speed.py: max |Δ| ≤ 1e-5 relative). Exported graphs and traces keep the
convolution (`anomaly_maps`), which needs no constant per shape.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from model.gaussian import gaussian_blur


@functools.lru_cache(maxsize=16)
def axis_matrix(cells: int, pixels: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(pixels, cells): nearest upsampling of `cells` values to `pixels`, then the Gaussian blur along that axis.

    Built in float64 by the 2-D path itself on `cells` basis images that are constant along the other axis (in
    float64 the blur along that axis leaves them constant to 1e-16)."""
    width = 2 * int(4.0 * sigma + 0.5) + 2  # the other axis: wider than the blur's padding needs
    basis = torch.eye(cells, dtype=torch.float64).view(cells, 1, cells, 1).expand(cells, 1, cells, width)
    upsampled = F.interpolate(basis, size=(pixels, width), mode="nearest")
    blurred = gaussian_blur(upsampled, sigma, padding="reflect")[:, 0, :, width // 2]  # (cells, pixels)
    return blurred.t().contiguous().to(device=device, dtype=dtype)


def upsampled_blurred(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], sigma: float,
                      ) -> torch.Tensor:
    """(B, H, W) maps of patch scores (B, h·w) on the (h, w) grid, as `PatchcoreModel.anomaly_maps` makes them."""
    rows = axis_matrix(int(grid[0]), int(size[0]), float(sigma), scores.device, scores.dtype)
    columns = axis_matrix(int(grid[1]), int(size[1]), float(sigma), scores.device, scores.dtype)
    return rows @ scores.reshape(-1, *grid) @ columns.t()
