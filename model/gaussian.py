"""A Gaussian filter in torch that matches `scipy.ndimage.gaussian_filter` (mode "reflect", truncate 4.0).

scipy's "reflect" repeats the edge sample (d c b a | a b c d | d c b a), which is torch's "symmetric" padding, not
torch's "reflect"; the kernel is scipy's: exp(-x²/2σ²) normalised, radius int(truncate·σ + 0.5).
`padding="reflect"` gives anomalib's `GaussianBlur2d` instead (same kernel: 33 taps for sigma 4; torch's
"reflect" padding, d c b | a b c d | c b a): PatchCore's map.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def _kernel(sigma: float, truncate: float) -> torch.Tensor:
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def _symmetric_index(size: int, radius: int, device: torch.device) -> torch.Tensor:
    index = torch.arange(-radius, size + radius, device=device)
    period = 2 * size
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - 1 - index, index)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0,
                  padding: str = "symmetric") -> torch.Tensor:
    """Blur (..., H, W) maps over their last two axes; same dtype and device as the input. `padding`:
    "symmetric" (scipy's "reflect", the default) or "reflect" (torch's, as anomalib's GaussianBlur2d)."""
    if sigma <= 0:
        return maps
    if padding not in ("symmetric", "reflect"):
        raise ValueError(f"padding {padding!r} is not one of symmetric, reflect")
    kernel = _kernel(float(sigma), float(truncate)).to(device=maps.device, dtype=maps.dtype)
    radius = (kernel.numel() - 1) // 2
    shape = maps.shape
    height, width = shape[-2:]
    x = maps.reshape(-1, 1, height, width)
    if padding == "reflect":
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(F.conv2d(x, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))
        return x.reshape(shape)
    x = x.index_select(2, _symmetric_index(height, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = x.index_select(3, _symmetric_index(width, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.reshape(shape)
