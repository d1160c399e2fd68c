"""AdaCLIP (Cao et al., ECCV 2024): hybrid static + dynamic learnable prompts in both CLIP towers, projection
heads on patch and global features, class-aware text prompts. Behaviour follows the official implementation
(caoyunkang/AdaCLIP, commit e27ee32); see ../shared/spec/adaclip.md.

Differences from the official code, none of which changes a float32 result:
- real batches: the official code only works with batch 1; here the dynamic prompts, the per-image text pass
  ((B x 48) prompt sentences in one pass) and the losses are batched;
- the text pass stops at the longest prompt's end-of-text token (causal attention: later tokens cannot change it);
- the tap logits are averaged on the patch grid before the (linear) upsampling;
- hybrid semantic fusion (HSF) uses a deterministic batched k-means (k-means++ seeding from fixed draws) in torch
  instead of sklearn's, and is off by default (the golden fixture is HSF-off).

Only the six learned parts (their official names, see `LEARNED_MODULES`) have trainable parameters.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model._backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_PRETRAINED,
    ClipBackbone,
    load_backbone,
    resize_position_embedding,
)
from model._transformer import embed_patches, standard_block
from model.checkpoints import CheckpointError, read_safetensors
from model.factory import Prediction, file_digest, register_model
from model.gaussian import gaussian_blur
from model.losses import dice_loss, focal_loss

log = logging.getLogger(__name__)

LOGIT_SCALE = 100.0
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = ("a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}.")
LEARNED_MODULES = ("text_prompter", "visual_prompter", "patch_token_layer", "cls_token_layer",
                   "dynamic_visual_prompt_generator", "dynamic_text_prompt_generator")
OFFICIAL_PREFIX = "clip_model."
FORMAT_NAME = "anomalyd-adaclip"
FORMAT_VERSION = 1
HSF_ALPHA = 0.2  # weight of the clustered patch feature against the global feature
HSF_TOKENS_PER_CLUSTER = 5  # the official HSF keeps 5 * k_clusters most anomalous patches


class ClassNameError(ValueError):
    """Class names missing or not matching the batch; AdaCLIP's text prompts need one per image."""


def default_taps(n_layers: int) -> tuple[int, ...]:
    """The official hierarchy: quarter, half, three quarters and all of the vision blocks (6, 12, 18, 24)."""
    step = n_layers // 4
    return (step, 2 * step, 3 * step, 4 * step)


@functools.cache
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def class_prompts(class_name: str) -> tuple[list[str], int]:
    """The 48 prompt sentences for a class (normal states first) and how many are normal. As in the official
    code, '-' becomes a space; '_' is kept."""
    name = class_name.replace("-", " ")
    normal = [template.format(state.format(name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [template.format(state.format(name)) for state in ANOMALOUS_STATES for template in TEMPLATES]
    return normal + anomalous, len(normal)


@functools.lru_cache(maxsize=256)
def _class_token_ids(class_name: str, context_length: int) -> torch.Tensor:
    tokenizer = _tokenizer()
    sot, eot = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]
    sentences, _ = class_prompts(class_name)
    ids = torch.zeros(len(sentences), context_length, dtype=torch.long)
    for row, sentence in enumerate(sentences):
        tokens = [sot, *tokenizer.encode(sentence), eot]
        if len(tokens) > context_length:
            raise ClassNameError(f"class name {class_name!r} is too long: prompt {sentence!r} exceeds "
                                 f"{context_length} tokens")
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


def _fp16_round(tensor: torch.Tensor) -> torch.Tensor:
    # The official code splices prompts in with `.half()`; keep that rounding so float32 runs match it.
    return tensor.half().to(tensor.dtype)


def _uses_quick_gelu(clip: nn.Module) -> bool:
    """What the tower actually computes (the flag a loader records can disagree with the built modules)."""
    act = clip.visual.transformer.resblocks[0].mlp[1]
    return type(act).__name__ == "QuickGELU"


class PromptLayer(nn.Module):
    """Static prompts of one tower: `depth` learned (length, width) tensors, N(0, 0.02) (official names)."""

    def __init__(self, width: int, length: int, depth: int) -> None:
        super().__init__()
        self.length, self.depth = length, depth
        self.static_prompts = nn.ParameterList([nn.Parameter(torch.empty(length, width)) for _ in range(depth)])
        for prompt in self.static_prompts:
            nn.init.normal_(prompt, std=0.02)


class ProjectLayer(nn.Module):
    """`replicas` independent linear heads (official names: head.N.weight / head.N.bias)."""

    def __init__(self, in_width: int, out_width: int, replicas: int) -> None:
        super().__init__()
        self.head = nn.ModuleList([nn.Linear(in_width, out_width) for _ in range(replicas)])

    def each(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Head i on inputs[i]."""
        return [head(x) for head, x in zip(self.head, inputs, strict=True)]

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """Every head on the same input, stacked on a new axis 1: (B, C) → (B, replicas, out)."""
        return torch.stack([head(x) for head in self.head], dim=1)


@dataclass
class AdaCLIPOutput:
    """One forward pass. Logits are 100 · cosine similarities; column 0 normal, column 1 anomalous."""

    image_probs: torch.Tensor  # (B, 2) softmax of the image logits (after HSF when on)
    tap_logits: list[torch.Tensor]  # per tap (B, g*g, 2), CLS dropped
    text_features: torch.Tensor  # (B, E, 2) per-image text features, normalised over E
    global_features: torch.Tensor  # (B, E) projected, normalised CLS feature (before HSF)
    patch_features: list[torch.Tensor]  # per tap (B, g*g, E) projected, normalised patch features

    @property
    def scores(self) -> torch.Tensor:
        return self.image_probs[:, 1]


class AdaCLIP(nn.Module):
    """AdaCLIP on a frozen open_clip backbone.

    taps: 1-indexed vision blocks whose tokens are scored (default: `default_taps`, 6/12/18/24 on ViT-L/14).
    prompt_length / prompt_depth: the hybrid prompts (5 / 4). use_hsf: hybrid semantic fusion for the image score.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        *,
        taps: Sequence[int] | None = None,
        image_size: int = 518,
        prompt_length: int = 5,
        prompt_depth: int = 4,
        use_hsf: bool = False,
        k_clusters: int = 20,
        hsf_seed: int = 111,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        n_layers = backbone.vision_layers
        taps = tuple(int(t) for t in (taps if taps is not None else default_taps(n_layers)))
        if not taps or any(not 1 <= t <= n_layers for t in taps):
            raise ValueError(f"taps {list(taps)} must be vision blocks between 1 and {n_layers}")
        if image_size % backbone.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {backbone.patch_size}")
        if not 1 <= prompt_depth <= min(n_layers, len(backbone.clip.transformer.resblocks)):
            raise ValueError(f"prompt depth {prompt_depth} must be between 1 and the number of blocks")
        if backbone.embed_dim != backbone.text_width:
            # The official text prompts are sized by the joint width and spliced into the text tower.
            raise ValueError(f"AdaCLIP needs a backbone whose joint width ({backbone.embed_dim}) equals its text "
                             f"width ({backbone.text_width})")
        self.backbone = backbone
        self.clip = backbone.clip
        self.taps = taps
        self.image_size = image_size
        self.grid = image_size // backbone.patch_size
        self.prompt_length, self.prompt_depth = prompt_length, prompt_depth
        self.use_hsf, self.k_clusters, self.hsf_seed = use_hsf, k_clusters, hsf_seed
        self.sigma = sigma
        self.quick_gelu = _uses_quick_gelu(self.clip)
        pos = resize_position_embedding(self.clip.visual.positional_embedding.detach(), self.grid, "bicubic")
        self.register_buffer("vision_pos", pos, persistent=False)

        joint, vision = backbone.embed_dim, backbone.vision_width
        # Creation order as in the official model, so the same seed gives the same initial parameters.
        self.text_prompter = PromptLayer(joint, prompt_length, prompt_depth)
        self.visual_prompter = PromptLayer(vision, prompt_length, prompt_depth)
        self.patch_token_layer = ProjectLayer(vision, joint, len(taps))
        self.cls_token_layer = ProjectLayer(joint, joint, 1)
        self.dynamic_visual_prompt_generator = ProjectLayer(joint, vision, prompt_length)
        self.dynamic_text_prompt_generator = ProjectLayer(joint, joint, prompt_length)

    # -- parameters --------------------------------------------------------------------------------------------
    def learned_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n.split(".", 1)[0] in LEARNED_MODULES]

    def learned_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.learned_named_parameters()]

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        """The learned tensors under their official names without the `clip_model.` prefix."""
        return {n: p.detach() for n, p in self.learned_named_parameters()}

    def load_learned_state(self, state: Mapping[str, torch.Tensor], *, source: str = "state") -> list[str]:
        """Load the learned tensors; every one must be there with the right shape. Returns the unexpected keys
        (logged: the official loader ignores them silently)."""
        expected = {n: tuple(p.shape) for n, p in self.learned_named_parameters()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing:
            raise CheckpointError(f"{source}: missing AdaCLIP tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                                  f" (prompt length {self.prompt_length}, depth {self.prompt_depth}, "
                                  f"{len(self.taps)} taps)")
        wrong = [f"{k}: file {tuple(state[k].shape)} vs model {shape}" for k, shape in expected.items()
                 if tuple(state[k].shape) != shape]
        if wrong:
            raise CheckpointError(f"{source}: AdaCLIP tensors do not fit backbone {self.backbone.name} "
                                  f"(vision width {self.backbone.vision_width}, joint width {self.backbone.embed_dim}): "
                                  f"{wrong[:4]}")
        if unexpected:
            log.warning("%s: ignoring %d unexpected keys %s", source, len(unexpected), unexpected[:8])
        with torch.no_grad():
            for name, param in self.learned_named_parameters():
                param.copy_(state[name].to(param.dtype))
        return unexpected

    # -- image tower -------------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape)}, the model expects (B, 3, {self.image_size}, "
                             f"{self.image_size})")

    @torch.no_grad()
    def plain_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """u = ln_post(CLS) @ proj of the prompt-free frozen tower (B, E): the dynamic prompts' input."""
        visual = self.clip.visual
        x = embed_patches(visual, images, self.vision_pos)
        for block in visual.transformer.resblocks:
            x = standard_block(block, x)
        return visual.ln_post(x[:, 0]) @ visual.proj

    def encode_image(self, images: torch.Tensor, dynamic: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The prompted vision pass. dynamic: (B, length, vision width). Returns ln_post(CLS) @ proj (B, E) and per
        tap the residual tokens without the prompt tokens (B, 1 + g*g, vision width)."""
        visual = self.clip.visual
        length = self.prompt_length
        x = embed_patches(visual, images, self.vision_pos)
        wanted = set(self.taps)
        tapped: dict[int, torch.Tensor] = {}
        for index, block in enumerate(visual.transformer.resblocks):
            if index < self.prompt_depth:
                context = _fp16_round(self.visual_prompter.static_prompts[index] + dynamic).to(x.dtype)
                # Block 0 appends the context after the image tokens; the next blocks replace it.
                kept = x if index == 0 else x[:, :-length]
                x = torch.cat([kept, context], dim=1)
            x = standard_block(block, x)
            if index + 1 in wanted:
                tapped[index + 1] = x[:, :-length]
        pooled = visual.ln_post(x[:, 0]) @ visual.proj
        return pooled, [tapped[t] for t in self.taps]

    # -- text tower --------------------------------------------------------------------------------------------
    def encode_text(self, class_names: Sequence[str], dynamic: torch.Tensor) -> torch.Tensor:
        """Per-image text features (B, E, 2) [normal, anomalous]: each image's 48 class prompts with its own
        dynamic text prompts (B, length, E), all in one pass of (B * 48) sequences."""
        clip = self.clip
        device = dynamic.device
        context_length = clip.positional_embedding.shape[0]
        ids = torch.stack([_class_token_ids(name, context_length) for name in class_names]).to(device)
        batch, n_prompts, _ = ids.shape
        ids = ids.flatten(0, 1)
        eot = ids.argmax(dim=-1)
        # Causal attention: tokens after the last end-of-text cannot change any feature we read.
        used = max(int(eot.max()) + 1, self.prompt_length + 2)
        ids = ids[:, :used]
        x = clip.token_embedding(ids) + clip.positional_embedding[:used]
        mask = clip.attn_mask[:used, :used].to(device=device, dtype=x.dtype) if clip.attn_mask is not None else None
        length = self.prompt_length
        for index, block in enumerate(clip.transformer.resblocks):
            if 1 <= index < self.prompt_depth:
                context = _fp16_round(self.text_prompter.static_prompts[index] + dynamic).to(x.dtype)
                context = context.unsqueeze(1).expand(-1, n_prompts, -1, -1).flatten(0, 1)
                x = torch.cat([x[:, :1], context, x[:, 1 + length:]], dim=1)
            x = standard_block(block, x, mask)
        x = clip.ln_final(x)
        features = x[torch.arange(x.shape[0], device=device), eot] @ clip.text_projection
        features = F.normalize(features.float(), dim=-1).view(batch, n_prompts, -1)
        _, n_normal = class_prompts(class_names[0])
        normal = F.normalize(features[:, :n_normal].mean(dim=1), dim=-1)
        anomalous = F.normalize(features[:, n_normal:].mean(dim=1), dim=-1)
        return torch.stack([normal, anomalous], dim=2)

    # -- full pass ---------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, class_names: Sequence[str]) -> AdaCLIPOutput:
        """Differentiable w.r.t. the learned parameters (the CLIP towers are frozen)."""
        self._check_images(images)
        if len(class_names) != images.shape[0]:
            raise ClassNameError(f"{len(class_names)} class names for a batch of {images.shape[0]} images")
        u = self.plain_image_features(images)
        dynamic_visual = self.dynamic_visual_prompt_generator.stacked(u)
        dynamic_text = self.dynamic_text_prompt_generator.stacked(u)
        pooled, tap_tokens = self.encode_image(images, dynamic_visual)
        text = self.encode_text(class_names, dynamic_text)

        patch_features = [F.normalize(f.float(), dim=-1)
                          for f in self.patch_token_layer.each([t[:, 1:] for t in tap_tokens])]
        global_features = F.normalize(self.cls_token_layer.head[0](pooled).float(), dim=-1)
        tap_logits = [LOGIT_SCALE * torch.bmm(p, text) for p in patch_features]
        image_features = global_features
        if self.use_hsf:
            clustered = self.hybrid_semantic_fusion(patch_features, tap_logits)
            image_features = F.normalize(HSF_ALPHA * clustered + (1 - HSF_ALPHA) * global_features, dim=-1)
        image_logits = LOGIT_SCALE * torch.bmm(image_features.unsqueeze(1), text).squeeze(1)
        return AdaCLIPOutput(image_probs=image_logits.softmax(dim=-1), tap_logits=tap_logits,
                             text_features=text, global_features=global_features,
                             patch_features=patch_features)

    def hybrid_semantic_fusion(self, patch_features: list[torch.Tensor], tap_logits: list[torch.Tensor]) -> torch.Tensor:
        """HSF: the most anomalous patches' multi-tap features, clustered; the mean of the cluster centres (B, E),
        normalised. Cluster assignment is deterministic and per image (a batch gives what single calls give)."""
        probability = torch.stack(tap_logits, dim=1).mean(dim=1).softmax(dim=-1)[..., 1]  # (B, g*g)
        keep = min(probability.shape[1], HSF_TOKENS_PER_CLUSTER * self.k_clusters)
        top = probability.topk(keep, dim=1).indices
        selected = [f.gather(1, top.unsqueeze(-1).expand(-1, -1, f.shape[-1])) for f in patch_features]
        with torch.no_grad():
            labels = kmeans(torch.cat(selected, dim=-1), self.k_clusters, seed=self.hsf_seed)
        k = int(labels.max()) + 1
        one_hot = F.one_hot(labels, k).to(selected[0].dtype)  # (B, N, k)
        # Official centre of a cluster: the mean of its tokens from every tap; empty clusters are left out.
        layer_mean = torch.stack(selected, dim=0).mean(dim=0)  # (B, N, E)
        counts = one_hot.sum(dim=1)  # (B, k)
        centres = one_hot.transpose(1, 2) @ layer_mean / counts.clamp(min=1).unsqueeze(-1)
        present = (counts > 0).to(centres.dtype).unsqueeze(-1)
        fused = (centres * present).sum(dim=1) / present.sum(dim=1)
        return F.normalize(fused, dim=-1)

    # -- outputs -----------------------------------------------------------------------------------------------
    def _upsample(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, g*g, 2) → (B, 2, S, S), bilinear, align_corners True (as the official code)."""
        batch = logits.shape[0]
        grid = logits.transpose(1, 2).reshape(batch, -1, self.grid, self.grid)
        return F.interpolate(grid, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)

    def tap_probabilities(self, output: AdaCLIPOutput) -> list[torch.Tensor]:
        """Training maps: per tap the upsampled logits' softmax (B, 2, S, S)."""
        return [self._upsample(logits).softmax(dim=1) for logits in output.tap_logits]

    def anomaly_maps(self, output: AdaCLIPOutput) -> torch.Tensor:
        """Test maps (B, S, S): tap logits averaged, upsampled, softmax, (p_a + 1 - p_n) / 2, Gaussian blur."""
        mean_logits = torch.stack(output.tap_logits, dim=0).mean(dim=0)
        probs = self._upsample(mean_logits.float()).softmax(dim=1)
        maps = (probs[:, 1] + 1.0 - probs[:, 0]) / 2.0
        return gaussian_blur(maps, self.sigma)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and anomaly maps (B, S, S), float32."""
        output = self.forward(images, class_names)
        return output.scores.float(), self.anomaly_maps(output).float()


def kmeans_plus_plus(data: torch.Tensor, k: int, *, seed: int = 111) -> torch.Tensor:
    """k-means++ seeds (B, k, D) for data (B, N, D), from draws of a seeded CPU generator shared by every image,
    so an image's seeds do not depend on the rest of its batch."""
    batch, n_points, _ = data.shape
    draws = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(data.device)
    rows = torch.arange(batch, device=data.device)
    first = (draws[0] * n_points).long().clamp(max=n_points - 1).expand(batch)
    centres = [data[rows, first]]
    nearest = ((data - centres[0].unsqueeze(1)) ** 2).sum(-1)  # (B, N) squared distance to the closest seed
    for j in range(1, k):
        cdf = nearest.cumsum(dim=1)
        target = (draws[j] * cdf[:, -1]).to(cdf.dtype).unsqueeze(1)
        pick = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=n_points - 1)
        centres.append(data[rows, pick])
        nearest = torch.minimum(nearest, ((data - centres[-1].unsqueeze(1)) ** 2).sum(-1))
    return torch.stack(centres, dim=1)


def kmeans(data: torch.Tensor, k: int, *, seed: int = 111, iterations: int = 300) -> torch.Tensor:
    """Deterministic batched k-means: data (B, N, D) → labels (B, N) in [0, k).

    `kmeans_plus_plus` seeds, then Lloyd iterations until no image's labels change (an empty cluster keeps its
    centre). Runs in float64.
    """
    n_points = data.shape[1]
    k = max(1, min(k, n_points))
    x = data.double()
    centre = kmeans_plus_plus(x, k, seed=seed)
    labels = torch.cdist(x, centre).argmin(dim=-1)
    for _ in range(iterations):
        one_hot = F.one_hot(labels, k).double()
        counts = one_hot.sum(dim=1).unsqueeze(-1)
        updated = one_hot.transpose(1, 2) @ x / counts.clamp(min=1)
        centre = torch.where(counts > 0, updated, centre)
        new_labels = torch.cdist(x, centre).argmin(dim=-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


# -- training ----------------------------------------------------------------------------------------------------
@dataclass
class AdaCLIPLoss:
    """The loss with its parts, for logging and the parity tests."""

    total: torch.Tensor
    classification: torch.Tensor
    segmentation: torch.Tensor
    per_tap: list[tuple[float, float, float]] = field(default_factory=list)  # focal, dice, normal dice


def adaclip_loss(
    model: AdaCLIP,
    output: AdaCLIPOutput,
    labels: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    has_mask: torch.Tensor | None = None,
) -> AdaCLIPLoss:
    """focal(image probs, label) + Σ_taps [focal(p, m) + dice(p_a, m) + dice(p_n, 1 - m)].

    labels (B,) in {0, 1}; masks (B, S, S) thresholded at 0.5. Images without a pixel annotation (has_mask False)
    are left out of the segmentation term. Dice is per image, as in the golden fixture (the official batch-1
    path squeezes the mask batch, which can turn its dice into a mean over image rows).
    """
    probs = output.image_probs
    target = (labels.to(probs.device).float() > 0.5).long()
    classification = focal_loss(probs.reshape(*probs.shape, 1, 1), target.view(-1, 1, 1))
    segmentation = probs.new_zeros(())
    per_tap: list[tuple[float, float, float]] = []
    if masks is not None and (has_mask is None or bool(has_mask.any())):
        keep = slice(None) if has_mask is None else has_mask.to(probs.device).bool()
        gt = (masks.to(probs.device)[keep].float() > 0.5).float()
        for tap in model.tap_probabilities(output):
            tap = tap[keep].float()
            focal = focal_loss(tap, gt)
            dice_anomalous = dice_loss(tap[:, 1], gt)
            dice_normal = dice_loss(tap[:, 0], 1 - gt)
            segmentation = segmentation + focal + dice_anomalous + dice_normal
            per_tap.append((focal.item(), dice_anomalous.item(), dice_normal.item()))
    return AdaCLIPLoss(total=classification + segmentation, classification=classification,
                       segmentation=segmentation, per_tap=per_tap)


def build_optimizer(model: AdaCLIP, *, lr: float = 0.01, betas: tuple[float, float] = (0.5, 0.999),
                    weight_decay: float = 0.01) -> torch.optim.AdamW:
    """The official optimiser: AdamW over the learned parameters (lr 0.01, betas (0.5, 0.999), decay 0.01)."""
    return torch.optim.AdamW(model.learned_parameters(), lr=lr, betas=betas, weight_decay=weight_decay)


def training_step(
    model: AdaCLIP,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    class_names: Sequence[str],
    labels: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    has_mask: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> AdaCLIPLoss:
    """One optimisation step on a batch (the official `train_one_batch`, batched). Parameters stay float32;
    `autocast_dtype` runs the forward under autocast (the official code uses fp16 on GPUs)."""
    model.train()
    context = (torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
    with context:
        output = model(images, class_names)
    loss = adaclip_loss(model, output, labels, masks, has_mask=has_mask)
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    optimizer.step()
    return loss


# -- checkpoints -------------------------------------------------------------------------------------------------
@dataclass
class AdaCLIPCheckpoint:
    state: dict[str, torch.Tensor]  # official names without the `clip_model.` prefix
    metadata: dict[str, Any] = field(default_factory=dict)
    format: str = "anomalyd"  # or "official"
    path: Path | None = None
    unexpected: list[str] = field(default_factory=list)  # keys found in the file that AdaCLIP does not use

    def _count(self, prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in self.state if k.startswith(prefix)})

    @property
    def shape(self) -> dict[str, int]:
        """prompt length and depth, number of taps, vision and joint widths of the model these tensors fit."""
        try:
            visual = self.state["visual_prompter.static_prompts.0"]
            text = self.state["text_prompter.static_prompts.0"]
            return {"prompt_length": int(visual.shape[0]),
                    "prompt_depth": self._count("visual_prompter.static_prompts."),
                    "n_taps": self._count("patch_token_layer.head."),
                    "vision_width": int(visual.shape[1]), "joint_width": int(text.shape[1])}
        except (KeyError, IndexError) as exc:
            raise CheckpointError(f"{self.path or 'checkpoint'}: not an AdaCLIP checkpoint (missing {exc})") from exc


def _known(key: str) -> bool:
    return key.split(".", 1)[0] in LEARNED_MODULES


def load_adaclip_checkpoint(path: str | Path) -> AdaCLIPCheckpoint:
    """Read the official flat state dict (`clip_model.*`, a released `pretrained_*.pth`) or an anomalyd
    `.safetensors`. Keys AdaCLIP does not use are kept in `unexpected` (and logged); none known is an error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"AdaCLIP checkpoint {path} does not exist")
    metadata: dict[str, Any]
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path, FORMAT_NAME)
        kind = "anomalyd"
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a flat state dict, found {type(obj).__name__}")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        # The released AdaCLIP weights were trained on a tower built with nn.GELU.
        metadata = {"source": str(path), "gelu": "gelu"}
        kind = "official"
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in tensors.items():
        name = key.removeprefix("module.").removeprefix(OFFICIAL_PREFIX)
        if _known(name):
            state[name] = value.float()
        else:
            unexpected.append(key)
    if not state:
        raise CheckpointError(f"{path}: no AdaCLIP tensors ({OFFICIAL_PREFIX}text_prompter.* ...) found; keys "
                              f"{sorted(tensors)[:5]}")
    if unexpected:
        log.warning("%s: %d keys that AdaCLIP does not use: %s", path, len(unexpected), unexpected[:8])
    checkpoint = AdaCLIPCheckpoint(state=state, metadata=metadata, format=kind, path=path, unexpected=unexpected)
    checkpoint.shape  # noqa: B018  (validates the layout early, naming the file)
    return checkpoint


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def export_official(model: AdaCLIP, path: str | Path) -> Path:
    """The official layout: `torch.save` of a flat dict `clip_model.<name>` (loadable by the official code)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({OFFICIAL_PREFIX + k: v for k, v in _cpu(model.learned_state_dict()).items()}, tmp)
    tmp.replace(path)
    return path


def model_metadata(model: AdaCLIP, class_names: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "model": "adaclip",
        "gelu": "quick_gelu" if model.quick_gelu else "gelu",
        "backbone": model.backbone.name,
        "image_size": model.image_size,
        "taps": list(model.taps),
        "prompt_length": model.prompt_length,
        "prompt_depth": model.prompt_depth,
        "class_names": sorted(set(class_names)),
    }


def save_adaclip(model: AdaCLIP, path: str | Path, *, class_names: Sequence[str] = (),
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """anomalyd format for a `.safetensors` path (tensors under the official `clip_model.*` names plus JSON
    metadata: activation, backbone, image size, taps, training class names); any other suffix writes the
    official `.pth` layout."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return export_official(model, path)
    from safetensors.torch import save_file

    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    meta.update(model_metadata(model, class_names))
    meta.update(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")  # one per writer: workers may race
    save_file({OFFICIAL_PREFIX + k: v for k, v in _cpu(model.learned_state_dict()).items()}, str(tmp),
              metadata={"anomalyd": json.dumps(meta, default=str)})
    tmp.replace(path)
    return path


def build_adaclip(
    backbone: ClipBackbone,
    checkpoint: AdaCLIPCheckpoint | None = None,
    *,
    taps: Sequence[int] | None = None,
    image_size: int | None = None,
    use_hsf: bool = False,
    k_clusters: int = 20,
) -> AdaCLIP:
    """An AdaCLIP sized for the checkpoint with its tensors loaded; official random init when it is None
    (e.g. to start training). Taps: `taps`, else the checkpoint's metadata, else `default_taps`."""
    if checkpoint is None:
        model = AdaCLIP(backbone, taps=taps, image_size=image_size or 518, use_hsf=use_hsf, k_clusters=k_clusters)
        return model.eval()
    where = checkpoint.path or "checkpoint"
    shape = checkpoint.shape
    if shape["vision_width"] != backbone.vision_width or shape["joint_width"] != backbone.embed_dim:
        raise CheckpointError(
            f"{where}: AdaCLIP tensors are for vision width {shape['vision_width']} / joint width "
            f"{shape['joint_width']}, but backbone {backbone.name} has {backbone.vision_width} / "
            f"{backbone.embed_dim}: they belong to another backbone"
        )
    wanted_gelu = checkpoint.metadata.get("gelu")
    actual_gelu = "quick_gelu" if _uses_quick_gelu(backbone.clip) else "gelu"
    if wanted_gelu in ("gelu", "quick_gelu") and wanted_gelu != actual_gelu:
        raise CheckpointError(f"{where}: trained on a tower with {wanted_gelu} but backbone {backbone.name} was "
                              f"built with {actual_gelu}; load the backbone with quick_gelu={wanted_gelu == 'quick_gelu'}")
    if taps is None and checkpoint.metadata.get("taps"):
        taps = checkpoint.metadata["taps"]
    if taps is None:
        taps = default_taps(backbone.vision_layers)
    if len(taps) != shape["n_taps"]:
        raise CheckpointError(f"{where}: has {shape['n_taps']} patch heads but {len(taps)} taps {list(taps)} were "
                              "asked for")
    model = AdaCLIP(backbone, taps=taps, image_size=image_size or int(checkpoint.metadata.get("image_size", 518)),
                    prompt_length=shape["prompt_length"], prompt_depth=shape["prompt_depth"], use_hsf=use_hsf,
                    k_clusters=k_clusters)
    model.load_learned_state(checkpoint.state, source=str(where))
    return model.eval()


# -- detector ----------------------------------------------------------------------------------------------------
class AdaCLIPDetector:
    """AdaCLIP behind the Detector protocol: device placement, autocast, class names per image."""

    name = "adaclip"

    def __init__(self, model: AdaCLIP, *, device: torch.device, dtype: torch.dtype, version: str,
                 class_name: str | None = None) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.dtype = dtype
        self.version = version
        self.image_size = model.image_size
        self.class_name = class_name

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _class_names(self, batch: int, class_names: Sequence[str] | str | None) -> list[str]:
        if isinstance(class_names, str):
            class_names = [class_names] * batch
        if class_names is None:
            if self.class_name is None:
                raise ClassNameError(
                    "AdaCLIP needs the object class of each image for its text prompts: pass class_names=[...] "
                    "(one per image) to predict, or class_name=... (the source's configured class) to create_detector"
                )
            return [self.class_name] * batch
        names = list(class_names)
        if len(names) != batch:
            raise ClassNameError(f"{len(names)} class names for a batch of {batch} images")
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ClassNameError(f"class names must be non-empty strings, got {bad[:3]}")
        return names

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | str | None = None) -> Prediction:
        names = self._class_names(images.shape[0], class_names)
        images = images.to(self.device, non_blocking=True)
        with self._autocast():
            scores, maps = self.model.predict(images, names)
        return Prediction(scores=scores.float(), maps=maps.float())


@register_model("adaclip")
def _create_adaclip(
    *,
    backbone: str | Path | ClipBackbone = DEFAULT_BACKBONE,
    backbone_config: str | Path | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    prompts: str | Path | AdaCLIPCheckpoint | None = None,
    taps: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    image_size: int | None = None,
    class_name: str | None = None,
    hsf: bool = False,
    k_clusters: int = 20,
    device: torch.device,
    dtype: torch.dtype,
    **_: Any,
) -> AdaCLIPDetector:
    if prompts is None:
        raise CheckpointError(
            "AdaCLIP needs its learned weights: pass --prompts FILE (a released AdaCLIP pretrained_*.pth or an "
            "anomalyd .safetensors from training), or choose a training-free model with --model"
        )
    checkpoint = prompts if isinstance(prompts, AdaCLIPCheckpoint) else load_adaclip_checkpoint(prompts)
    if not isinstance(backbone, ClipBackbone):
        quick_gelu = checkpoint.metadata.get("gelu", "gelu") == "quick_gelu"
        backbone = load_backbone(backbone, config=backbone_config, pretrained=pretrained, quick_gelu=quick_gelu)
    if taps is None and layers is not None:
        # `layers` is the common CLI option; it only applies when it matches this checkpoint's patch heads.
        if len(tuple(layers)) == checkpoint.shape["n_taps"]:
            taps = layers
        else:
            log.info("adaclip: ignoring layers %s (the checkpoint has %d patch heads)", list(layers),
                     checkpoint.shape["n_taps"])
    model = build_adaclip(backbone, checkpoint, taps=taps, image_size=image_size, use_hsf=hsf,
                          k_clusters=k_clusters)
    digest = file_digest(checkpoint.path) if checkpoint.path is not None else "memory"
    version = checkpoint.metadata.get("version") or f"adaclip-{digest}{'-hsf' if hsf else ''}"
    return AdaCLIPDetector(model, device=device, dtype=dtype, version=str(version), class_name=class_name)
