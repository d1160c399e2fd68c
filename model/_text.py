"""The CLIP text side every family shares: one BPE tokenizer and one text-tower pass.

The tower is causal and a sentence's feature is read at its end-of-text token (the argmax of the token ids), so a
caller may pass token ids cut after the longest sentence's end-of-text token: the features do not change and the
pass is shorter. `before_block` lets a family splice prompt tokens in before a block (AnomalyCLIP's deep prompts,
AdaCLIP's hybrid prompts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from model._transformer import forward_blocks, standard_block

CONTEXT_LENGTH = 77


@functools.cache
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(texts: Sequence[str], context_length: int = CONTEXT_LENGTH, *, truncate: bool = False,
             error: type[Exception] = ValueError) -> torch.Tensor:
    """CLIP BPE token ids (len(texts), context_length), int64, with SOT/EOT.

    A text longer than the context raises `error`, or with `truncate` is cut with EOT as its last token (what
    `open_clip.tokenize` does)."""
    tokenizer = _tokenizer()
    sot, eot = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [sot, *tokenizer.encode(text), eot]
        if len(ids) > context_length:
            if not truncate:
                raise error(f"prompt {text!r} is longer than the context length {context_length}")
            ids = ids[:context_length]
            ids[-1] = eot
        result[row, : len(ids)] = torch.tensor(ids)
    return result


def used_length(token_ids: torch.Tensor, minimum: int = 1) -> int:
    """How many leading positions a text pass needs: up to the last end-of-text token (at least `minimum`)."""
    return max(int(token_ids.argmax(dim=-1).max()) + 1, minimum)


def encode_text(
    clip: nn.Module,
    embeddings: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Text features (N, E), not normalised, for token embeddings with positions added (N, L, C).

    `token_ids` (N, >= L) locate each sentence's end-of-text token. `before_block(index, x)` (index 0-based) may
    replace tokens before each block. The causal mask is cut to L."""
    length = embeddings.shape[1]
    mask = None
    if clip.attn_mask is not None:
        mask = clip.attn_mask[:length, :length].to(device=embeddings.device, dtype=embeddings.dtype)

    def step(index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if before_block is not None:
            x = before_block(index - 1, x)
        return standard_block(block, x, mask)

    x, _ = forward_blocks(clip.transformer.resblocks, embeddings, step=step)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
    projection = clip.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection
