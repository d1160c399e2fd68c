"""Forward passes over open_clip CLIP blocks, written out so detectors can change what flows through them.

All attention runs through `F.scaled_dot_product_attention`, so no N x N attention map is ever kept (on a GPU the
fused kernels never materialise it). Tensors are batch-first (B, N, C).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def fp16_round(tensor: torch.Tensor) -> torch.Tensor:
    """The official AnomalyCLIP and AdaCLIP code splice prompts in with `.half()`; keeping that rounding makes
    float32 runs match theirs."""
    return tensor.half().to(tensor.dtype)


def split_qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a block's attention for the already layer-normed input x: each (B, heads, N, head_dim)."""
    attn = block.attn
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    batch, tokens, _ = x.shape
    heads = attn.num_heads
    qkv = qkv.view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(block: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) → out_proj(B, N, C)."""
    batch, _, tokens, _ = out.shape
    out = out.transpose(1, 2).reshape(batch, tokens, -1)
    return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias)


def attention(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The block's standard multi-head self-attention on the layer-normed input x."""
    q, k, v = split_qkv(block, x)
    return merge_heads(block, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))


def mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.ls_2(block.mlp(block.ln_2(x)))


def standard_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One CLIP residual block: x + attn(ln_1 x), then + mlp(ln_2 x)."""
    x = x + block.ls_1(attention(block, block.ln_1(x), attn_mask))
    return x + mlp(block, x)


def dual_path_block(block: nn.Module, ori: torch.Tensor, vv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A DPAM block: the ori stream as CLIP computes it, and a V-V attention residual added to the vv stream.

    Both attentions read ln_1(ori) and share the block's q, k, v and out_proj; the vv path has no MLP.
    """
    q, k, v = split_qkv(block, block.ln_1(ori))
    ori_attn = merge_heads(block, F.scaled_dot_product_attention(q, k, v))
    vv_attn = merge_heads(block, F.scaled_dot_product_attention(v, v, v))
    ori = ori + block.ls_1(ori_attn)
    ori = ori + mlp(block, ori)
    return ori, vv + vv_attn


def embed_patches(visual: nn.Module, images: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """conv1 patches + CLS + position table (already resized to this grid) → ln_pre; (B, 1 + g*g, C)."""
    x = visual.conv1(images)
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
    return visual.ln_pre(x)


def forward_blocks(
    blocks: Sequence[nn.Module],
    state: Any,
    *,
    taps: Sequence[int] = (),
    step: Callable[[int, nn.Module, Any], Any] | None = None,
    tap: Callable[[int, Any], torch.Tensor] | None = None,
    stop_early: bool = False,
) -> tuple[Any, list[torch.Tensor]]:
    """Run `state` through the blocks and keep intermediates, in the spirit of timm's `forward_intermediates`.

    Blocks are 1-indexed. `step(index, block, state)` runs one block (default: `standard_block` on a tensor);
    `tap(index, state)` is what is kept after a block listed in `taps` (default: the state itself). With
    `stop_early` the pass ends after the last tapped block. Returns the last state and the kept tensors in the
    order of `taps`.
    """
    wanted = set(taps)
    last = max(wanted) if stop_early and wanted else None
    tapped: dict[int, torch.Tensor] = {}
    for index, block in enumerate(blocks, start=1):
        state = step(index, block, state) if step is not None else standard_block(block, state)
        if index in wanted:
            tapped[index] = tap(index, state) if tap is not None else state
        if last is not None and index >= last:
            break
    return state, [tapped[t] for t in taps]


def encode_image_dpam(
    visual: nn.Module,
    images: torch.Tensor,
    pos: torch.Tensor,
    taps: Sequence[int],
    dpam_start: int,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """AnomalyCLIP's image pass.

    Blocks are 1-indexed; blocks >= dpam_start carry the extra V-V stream, which starts from the output of block
    dpam_start - 1. Returns the ori stream after the last block (B, N, C) and, per tap, the vv stream (or the
    ordinary stream for taps before dpam_start) after that block, CLS included.
    """

    def step(index: int, block: nn.Module, state: tuple[torch.Tensor, torch.Tensor | None]):
        x, vv = state
        if index < dpam_start:
            return standard_block(block, x), None
        return dual_path_block(block, x, x if vv is None else vv)

    def tap(index: int, state: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        return state[0] if index < dpam_start else state[1]

    (x, _), tapped = forward_blocks(visual.transformer.resblocks, (embed_patches(visual, images, pos), None),
                                    taps=taps, step=step, tap=tap)
    return x, tapped
