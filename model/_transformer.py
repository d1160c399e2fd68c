"""Forward passes over open_clip CLIP blocks, written out so detectors can change what flows through them.

All attention runs through `F.scaled_dot_product_attention`, so no N x N attention map is ever kept (on a GPU the
fused kernels never materialise it). Tensors are batch-first (B, N, C).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
    x = embed_patches(visual, images, pos)
    tapped: dict[int, torch.Tensor] = {}
    vv: torch.Tensor | None = None
    wanted = set(taps)
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        if index < dpam_start:
            x = standard_block(block, x)
            if index in wanted:
                tapped[index] = x
        else:
            x, vv = dual_path_block(block, x, x if vv is None else vv)
            if index in wanted:
                tapped[index] = vv
    return x, [tapped[t] for t in taps]


def encode_text_deep(
    clip: nn.Module,
    prompt_embeddings: torch.Tensor,
    token_ids: torch.Tensor,
    deep_prompts: Sequence[torch.Tensor] = (),
    *,
    deep_prompt_cast: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Text features (B, E) for prompt embeddings (B, L, C) with deep prompts overwriting tokens 1..n.

    Before text block i (0-indexed, 1 <= i <= len(deep_prompts)) the n positions after SOS are replaced by
    deep_prompts[i - 1] (shared by every prompt). The feature is ln_final at the EOT position (argmax of the token
    ids) projected by text_projection; not normalised.
    """
    x = prompt_embeddings + clip.positional_embedding.to(prompt_embeddings.dtype)
    mask = clip.attn_mask.to(dtype=x.dtype, device=x.device) if clip.attn_mask is not None else None
    for index, block in enumerate(clip.transformer.resblocks):
        if 1 <= index <= len(deep_prompts):
            ctx = deep_prompts[index - 1]
            if deep_prompt_cast is not None:
                ctx = deep_prompt_cast(ctx)
            ctx = ctx.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + ctx.shape[1]:]], dim=1)
        x = standard_block(block, x, mask)
    x = clip.ln_final(x)
    eot = token_ids.argmax(dim=-1)
    return x[torch.arange(x.shape[0], device=x.device), eot] @ clip.text_projection
