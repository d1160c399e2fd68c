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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model._backbone import ClipBackbone, resize_position_embedding
from model._text import encode_text, used_length
from model._transformer import embed_patches, forward_blocks, fp16_round, standard_block
from model.adaclip.kmeans import kmeans
from model.adaclip.prompts import ClassNameError, class_prompts, class_token_ids
from model.checkpoints import CheckpointError
from model.gaussian import gaussian_blur

log = logging.getLogger(__name__)

LOGIT_SCALE = 100.0
LEARNED_MODULES = ("text_prompter", "visual_prompter", "patch_token_layer", "cls_token_layer",
                   "dynamic_visual_prompt_generator", "dynamic_text_prompt_generator")
HSF_ALPHA = 0.2  # weight of the clustered patch feature against the global feature
HSF_TOKENS_PER_CLUSTER = 5  # the official HSF keeps 5 * k_clusters most anomalous patches


def default_taps(n_layers: int) -> tuple[int, ...]:
    """The official hierarchy: quarter, half, three quarters and all of the vision blocks (6, 12, 18, 24)."""
    step = n_layers // 4
    return (step, 2 * step, 3 * step, 4 * step)


def uses_quick_gelu(clip: nn.Module) -> bool:
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
        self.quick_gelu = uses_quick_gelu(self.clip)
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
        x, _ = forward_blocks(visual.transformer.resblocks, embed_patches(visual, images, self.vision_pos))
        return visual.ln_post(x[:, 0]) @ visual.proj

    def encode_image(self, images: torch.Tensor, dynamic: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The prompted vision pass. dynamic: (B, length, vision width). Returns ln_post(CLS) @ proj (B, E) and per
        tap the residual tokens without the prompt tokens (B, 1 + g*g, vision width)."""
        visual = self.clip.visual
        length = self.prompt_length

        def step(index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if index <= self.prompt_depth:
                context = fp16_round(self.visual_prompter.static_prompts[index - 1] + dynamic).to(x.dtype)
                # Block 1 appends the context after the image tokens; the next blocks replace it.
                kept = x if index == 1 else x[:, :-length]
                x = torch.cat([kept, context], dim=1)
            return standard_block(block, x)

        x, tapped = forward_blocks(visual.transformer.resblocks, embed_patches(visual, images, self.vision_pos),
                                   taps=self.taps, step=step, tap=lambda _, x: x[:, :-length])
        pooled = visual.ln_post(x[:, 0]) @ visual.proj
        return pooled, tapped

    # -- text tower --------------------------------------------------------------------------------------------
    def encode_text(self, class_names: Sequence[str], dynamic: torch.Tensor) -> torch.Tensor:
        """Per-image text features (B, E, 2) [normal, anomalous]: each image's 48 class prompts with its own
        dynamic text prompts (B, length, E), all in one pass of (B * 48) sequences."""
        clip = self.clip
        device = dynamic.device
        context_length = clip.positional_embedding.shape[0]
        ids = torch.stack([class_token_ids(name, context_length) for name in class_names]).to(device)
        batch, n_prompts, _ = ids.shape
        ids = ids.flatten(0, 1)
        # Causal attention: tokens after the last end-of-text cannot change any feature we read.
        ids = ids[:, :used_length(ids, self.prompt_length + 2)]
        x = clip.token_embedding(ids) + clip.positional_embedding[: ids.shape[1]]
        length = self.prompt_length

        def splice_prompts(index: int, x: torch.Tensor) -> torch.Tensor:
            if not 1 <= index < self.prompt_depth:
                return x
            context = fp16_round(self.text_prompter.static_prompts[index] + dynamic).to(x.dtype)
            context = context.unsqueeze(1).expand(-1, n_prompts, -1, -1).flatten(0, 1)
            return torch.cat([x[:, :1], context, x[:, 1 + length:]], dim=1)

        features = encode_text(clip, x, ids, before_block=splice_prompts)
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
