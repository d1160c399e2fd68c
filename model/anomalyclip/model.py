"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic learned prompts on a frozen CLIP, scored against DPAM
patch features. Behaviour follows the official implementation (zqhang/AnomalyCLIP, May 2025); see
../shared/spec/anomalyclip.md. Only `PromptLearner` has trainable parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model._backbone import ClipBackbone, resize_position_embedding
from model._text import encode_text, tokenize
from model._transformer import encode_image_dpam, fp16_round
from model.gaussian import gaussian_blur

TEMPERATURE = 0.07
NORMAL_TEMPLATE = "{ctx} object."
ANOMALOUS_TEMPLATE = "{ctx} damaged object."
PROJECTION_WIDTH = 896  # width of the official (unused) compound prompt projections


class PromptLearner(nn.Module):
    """The two object-agnostic prompts and the deep text prompts, with the official checkpoint's key names."""

    def __init__(self, backbone: ClipBackbone, n_ctx: int = 12, depth: int = 9, deep_length: int = 4) -> None:
        super().__init__()
        width = backbone.text_width
        self.n_ctx, self.depth, self.deep_length = n_ctx, depth, deep_length
        # Parameter creation and init order follow the official learner, so a seed gives the same start.
        self.ctx_pos = nn.Parameter(torch.empty(1, 1, n_ctx, width))
        self.ctx_neg = nn.Parameter(torch.empty(1, 1, n_ctx, width))
        nn.init.normal_(self.ctx_pos, std=0.02)
        nn.init.normal_(self.ctx_neg, std=0.02)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(deep_length, width)) for _ in range(depth - 1)]
        )
        for prompt in self.compound_prompts_text:
            nn.init.normal_(prompt, std=0.02)
        projection = nn.Linear(width, PROJECTION_WIDTH)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(projection) for _ in range(depth - 1)])

        placeholder = " ".join(["X"] * n_ctx)
        token_ids = tokenize([NORMAL_TEMPLATE.format(ctx=placeholder), ANOMALOUS_TEMPLATE.format(ctx=placeholder)])
        with torch.no_grad():
            embeddings = backbone.clip.token_embedding(token_ids).float()
        for row, kind in enumerate(("pos", "neg")):
            self.register_buffer(f"token_prefix_{kind}", embeddings[row : row + 1, :1].unsqueeze(0).clone())
            self.register_buffer(f"token_suffix_{kind}", embeddings[row : row + 1, 1 + n_ctx :].unsqueeze(0).clone())
            self.register_buffer(f"tokenized_prompts_{kind}", token_ids[row : row + 1].unsqueeze(0).int().clone())

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Prompt embeddings (2, L, C) [normal, anomalous], their token ids (2, L), and the deep prompts."""
        normal = torch.cat([self.token_prefix_pos, self.ctx_pos, self.token_suffix_pos], dim=2)
        anomalous = torch.cat([self.token_prefix_neg, self.ctx_neg, self.token_suffix_neg], dim=2)
        embeddings = torch.cat([normal.flatten(0, 1), anomalous.flatten(0, 1)], dim=0)
        token_ids = torch.cat([self.tokenized_prompts_pos.flatten(0, 1), self.tokenized_prompts_neg.flatten(0, 1)])
        return embeddings, token_ids, list(self.compound_prompts_text)


@dataclass
class AnomalyCLIPOutput:
    """Everything one image pass gives; `probabilities` only when asked for (training)."""

    image_logits: torch.Tensor  # (B, 2) cosine similarities / temperature, [normal, anomalous]
    token_probs: torch.Tensor  # (B, n_taps, g*g, 2) per-patch softmax, CLS dropped
    probabilities: list[torch.Tensor] | None  # per tap (B, 2, S, S), upsampled bilinearly

    @property
    def scores(self) -> torch.Tensor:
        return self.image_logits.softmax(dim=-1)[:, 1]


class AnomalyCLIP(nn.Module):
    """AnomalyCLIP on a frozen open_clip backbone.

    layers: 1-indexed vision blocks whose DPAM features are scored (default (24,), the paper's (6, 12, 18, 24));
    dpam_blocks: how many final blocks carry the V-V path (19 for ViT-L/14: blocks 6..24).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        *,
        layers: Sequence[int] = (24,),
        image_size: int = 518,
        n_ctx: int = 12,
        depth: int = 9,
        deep_length: int = 4,
        dpam_blocks: int = 19,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        n_layers = backbone.vision_layers
        layers = tuple(int(layer) for layer in layers)
        if not layers or any(not 1 <= layer <= n_layers for layer in layers):
            raise ValueError(f"layers {list(layers)} must be vision blocks between 1 and {n_layers}")
        if image_size % backbone.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {backbone.patch_size}")
        if not 1 <= dpam_blocks < n_layers:
            raise ValueError(f"dpam_blocks {dpam_blocks} must be between 1 and {n_layers - 1}")
        self.backbone = backbone
        self.clip = backbone.clip
        self.layers = layers
        self.image_size = image_size
        self.grid = image_size // backbone.patch_size
        self.dpam_start = n_layers - dpam_blocks + 1
        self.sigma = sigma
        pos = resize_position_embedding(self.clip.visual.positional_embedding.detach(), self.grid, "bilinear")
        self.register_buffer("vision_pos", pos, persistent=False)
        self.prompt_learner = PromptLearner(backbone, n_ctx=n_ctx, depth=depth, deep_length=deep_length)
        self._text_cache: torch.Tensor | None = None

    # -- text ------------------------------------------------------------------------------------------------
    def encode_text(self) -> torch.Tensor:
        """Normalised text features (2, E): row 0 normal, row 1 anomalous. Differentiable w.r.t. the prompts."""
        embeddings, token_ids, deep = self.prompt_learner()
        x = embeddings + self.clip.positional_embedding.to(embeddings.dtype)

        def splice_deep_prompts(index: int, x: torch.Tensor) -> torch.Tensor:
            # Before text block i (1 <= i <= len(deep)) the n positions after SOS become deep[i - 1].
            if not 1 <= index <= len(deep):
                return x
            ctx = fp16_round(deep[index - 1]).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            return torch.cat([x[:, :1], ctx, x[:, 1 + ctx.shape[1]:]], dim=1)

        features = encode_text(self.clip, x, token_ids, before_block=splice_deep_prompts).float()
        return features / features.norm(dim=-1, keepdim=True)

    def text_features(self) -> torch.Tensor:
        """Text features for inference: they do not depend on the image, so they are computed once and cached."""
        if self.training or torch.is_grad_enabled():
            return self.encode_text()
        if self._text_cache is None or self._text_cache.device != self.vision_pos.device:
            self._text_cache = self.encode_text()
        return self._text_cache

    def invalidate_text_cache(self) -> None:
        self._text_cache = None

    def load_prompt_state(self, state: dict[str, torch.Tensor]) -> None:
        self.prompt_learner.load_state_dict(state, strict=True)
        self.invalidate_text_cache()

    # -- image -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global features (B, E) (ori CLS @ proj, no ln_post: an official quirk) and per-tap patch features
        (B, 1 + g*g, E) = ln_post(vv) @ proj. CLIP is frozen, so no gradients flow here."""
        visual = self.clip.visual
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])}, the model expects {self.image_size}x{self.image_size}"
            )
        ori, taps = encode_image_dpam(visual, images, self.vision_pos, self.layers, self.dpam_start)
        global_features = ori[:, 0] @ visual.proj
        patch_features = [visual.ln_post(tap) @ visual.proj for tap in taps]
        return global_features, patch_features

    def forward(self, images: torch.Tensor, *, with_probabilities: bool = False) -> AnomalyCLIPOutput:
        global_features, patch_features = self.encode_image(images)
        text = self.text_features()
        global_features = global_features.float()
        global_features = global_features / global_features.norm(dim=-1, keepdim=True)
        image_logits = global_features @ text.t() / TEMPERATURE
        token_probs = []
        for features in patch_features:
            features = features[:, 1:].float()
            features = features / features.norm(dim=-1, keepdim=True)
            token_probs.append((features @ text.t() / TEMPERATURE).softmax(dim=-1))
        stacked = torch.stack(token_probs, dim=1)
        probabilities = None
        if with_probabilities:
            probabilities = [self._upsample(p) for p in token_probs]
        return AnomalyCLIPOutput(image_logits=image_logits, token_probs=stacked, probabilities=probabilities)

    def _upsample(self, token_probs: torch.Tensor) -> torch.Tensor:
        """(B, g*g, C) → (B, C, S, S), bilinear, align_corners False."""
        batch, _, channels = token_probs.shape
        grid = token_probs.transpose(1, 2).reshape(batch, channels, self.grid, self.grid)
        return F.interpolate(grid, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

    def anomaly_maps(self, token_probs: torch.Tensor) -> torch.Tensor:
        """(B, n_taps, g*g, 2) → (B, S, S): per tap (p_a + 1 - p_n)/2, summed over taps, upsampled, blurred.

        Upsampling is linear, so summing on the patch grid first and upsampling once equals the official
        order (upsample each tap, then sum) up to float rounding, at a fraction of the cost.
        """
        per_tap = (token_probs[..., 1] + 1.0 - token_probs[..., 0]) / 2.0
        summed = per_tap.sum(dim=1, keepdim=True).transpose(1, 2)  # (B, g*g, 1)
        upsampled = self._upsample(summed)[:, 0]
        return gaussian_blur(upsampled, self.sigma)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and anomaly maps (B, S, S), float32."""
        output = self.forward(images)
        return output.scores.float(), self.anomaly_maps(output.token_probs.float()).float()
