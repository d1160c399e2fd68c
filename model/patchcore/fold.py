"""Batch normalisation folded into the convolution before it: `fold_batchnorm(net)`.

The backbone is frozen and BatchNorm runs on its running statistics, so each BatchNorm is an affine map per channel
that can be folded into the preceding convolution's weights and bias (computed in float64, stored in float32):
one pass over the activations fewer per layer. On Lite0 at batch 1 the CNN took 0.78-0.82x its unfolded time on 2 CPU
threads (bench/profile_frame.py --levers). The features equal the unfolded net's to fp32 rounding (~2e-6 of their size;
tests/model/test_patchcore_speed.py), well inside the golden parity tolerance (1e-4 of each tap's maximum).
Folded: timm's EfficientNet(-Lite) stem and blocks and ResNet stems, blocks and downsample branches; any other
layer is left as it is (still correct, only not faster).
"""

from __future__ import annotations

import torch
from torch import nn

# (convolution, normalisation) attribute pairs per module class name, in the order the forward pass runs them
_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "EfficientNet": (("conv_stem", "bn1"),),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "ResNet": (("conv1", "bn1"),),
    "BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}


def _after_norm(norm: nn.Module) -> nn.Module:
    """What the normalisation module does after normalising: timm's BatchNormAct2d applies drop and activation."""
    drop, act = getattr(norm, "drop", None), getattr(norm, "act", None)
    parts = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = (norm.weight.double() if norm.affine else 1.0) / (norm.running_var.double() + norm.eps).sqrt()
    shift = (norm.bias.double() if norm.affine else 0.0) - norm.running_mean.double() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    conv.weight = nn.Parameter((conv.weight.double() * scale.view(-1, 1, 1, 1)).float(), requires_grad=False)
    conv.bias = nn.Parameter(shift.float(), requires_grad=False)


def _foldable(conv: object, norm: object) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and not norm.training
            and norm.track_running_stats and norm.running_mean is not None and norm.num_features == conv.out_channels)


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> int:
    """Fold every BatchNorm of `net` (frozen, eval mode) that directly follows a convolution into it, in place;
    returns how many were folded."""
    folded = 0
    for module in list(net.modules()):
        pairs = list(_PAIRS.get(type(module).__name__, ()))
        downsample = getattr(module, "downsample", None)
        if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
            pairs.append(("downsample.0", "downsample.1"))
        for conv_name, norm_name in pairs:
            conv, norm = module.get_submodule(conv_name), module.get_submodule(norm_name)
            if not _foldable(conv, norm):
                continue
            _fold(conv, norm)
            parent_name, _, child = norm_name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, _after_norm(norm))
            folded += 1
    return folded
