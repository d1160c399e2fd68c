"""Training-free zero-shot baselines on a frozen CLIP: CLIP (two prompts), CLIP-AC (prompt ensemble) and WinCLIP.

They need no learned prompts, so they work before any prompt training exists.

- "clip": image score = softmax over ("normal {c}", "anomalous {c}") of CLIP's logit scale x cos(image, text);
  map = the same softmax per patch token (ln_post(token) @ proj), upsampled bilinearly and blurred (sigma 4).
- "clip-ac": as "clip", with WinCLIP's compositional prompt ensemble (state words x templates, the text
  embeddings of each state group averaged).
- "winclip" (Jeong et al., CVPR 2023): the prompt ensemble scored against CLIP embeddings of sliding windows
  (k x k patches, stride 1, for k in `scales`) and of the full image; each patch's score is the harmonic mean of
  the scores of the windows covering it, the per-scale maps and the full-image score are combined by a
  harmonic mean, as the reference implementations (openvinotoolkit/anomalib, zqhang/Accurate-WinCLIP-pytorch)
  do. A window is encoded by running the vision transformer on the CLS token plus that window's patch tokens
  (with their position embeddings), all windows of a batch at once, in chunks.

Class names are per image (`predict(images, class_names)`, default the detector's class name or "object").
Deviations from the papers are listed in docs/models.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model._backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_PRETRAINED,
    BackboneError,
    ClipBackbone,
    load_backbone,
    resize_position_embedding,
)
from model._text import encode_text, tokenize, used_length
from model._transformer import embed_patches, forward_blocks
from model.detector import Detector, TorchDetector, file_digest
from model.factory import ModelFamily, imported_later, register_family
from model.gaussian import gaussian_blur

DEFAULT_CLASS_NAME = "object"

# The two prompts of the plain CLIP baseline.
PAIR_NORMAL = ("normal {}",)
PAIR_ANOMALOUS = ("anomalous {}",)

# WinCLIP's compositional prompt ensemble: state words x templates. The lists are those of the reference
# implementations that reproduce the paper's numbers (anomalib, zqhang/Accurate-WinCLIP-pytorch), including their
# repeated "a jpeg corrupted photo of the {}." entry (21 templates), kept so that scores stay comparable.
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
WINCLIP_TEMPERATURE = 0.07  # WinCLIP's softmax temperature (the reference implementations' value)
_EPS = 1e-12


def prompt_ensemble(class_name: str, ensemble: bool = True) -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts) for a class: the state x template ensemble, or the plain pair."""
    if not ensemble:
        return [p.format(class_name) for p in PAIR_NORMAL], [p.format(class_name) for p in PAIR_ANOMALOUS]
    normal = [template.format(state.format(class_name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [template.format(state.format(class_name)) for state in ANOMALOUS_STATES for template in TEMPLATES]
    return normal, anomalous


def window_indices(grid: int, size: int, stride: int = 1) -> torch.Tensor:
    """Patch indices (row-major on a grid x grid patch grid) of every size x size window: (n_windows, size²)."""
    if not 1 <= size <= grid:
        raise ValueError(f"window size {size} must be between 1 and the patch grid {grid}")
    board = torch.arange(grid * grid, dtype=torch.float64).view(1, 1, grid, grid)
    return F.unfold(board, kernel_size=size, stride=stride)[0].t().round().long()


def harmonic_aggregation(window_scores: torch.Tensor, windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows that cover it.

    window_scores (B, W), windows (W, k) patch indices → (B, n_patches); a patch no window covers gets 0.
    Scores are clamped at 1e-12 so that a zero score gives a (near) zero mean rather than a division by zero.
    """
    batch = window_scores.shape[0]
    per_member = windows.shape[1]
    flat = windows.reshape(-1).to(window_scores.device)
    inverse = (1.0 / window_scores.clamp_min(_EPS)).repeat_interleave(per_member, dim=1)
    sums = window_scores.new_zeros(batch, n_patches).index_add_(1, flat, inverse)
    counts = torch.bincount(flat, minlength=n_patches).to(window_scores.dtype)
    return torch.where(counts > 0, counts / sums.clamp_min(_EPS), torch.zeros_like(sums))


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(list(maps))
    return len(maps) / (1.0 / stacked.clamp_min(_EPS)).sum(dim=0)


def encode_text_causal(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP text features (N, E) of token ids (N, L), unnormalised, as `clip.encode_text` computes them, but run
    only up to the longest prompt: the text tower is causal and the feature is read at the EOT token, so the
    padding after it never matters (WinCLIP's 231 prompts cost ~5x less)."""
    pool = getattr(clip, "text_pool_type", "argmax")
    if pool != "argmax" or clip.attn_mask is None:
        return clip.encode_text(tokens)
    tokens = tokens[:, : used_length(tokens)]
    x = clip.token_embedding(tokens) + clip.positional_embedding[: tokens.shape[1]].to(torch.float32)
    return encode_text(clip, x, tokens)


class _ZeroShotClip(nn.Module):
    """What the baselines share: the backbone, position table for the input size, text features per class."""

    def __init__(self, backbone: ClipBackbone, *, image_size: int, ensemble: bool) -> None:
        super().__init__()
        visual = backbone.clip.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise BackboneError(f"{backbone.name}: the baselines need a ViT whose image embedding is the CLS token")
        if image_size % backbone.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {backbone.patch_size}")
        self.backbone = backbone
        self.clip = backbone.clip
        self.image_size = image_size
        self.grid = image_size // backbone.patch_size
        self.ensemble = ensemble
        pos = resize_position_embedding(visual.positional_embedding.detach(), self.grid, "bilinear")
        self.register_buffer("vision_pos", pos, persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def class_text_features(self, class_name: str) -> torch.Tensor:
        """Normalised (2, E) text features [normal, anomalous] for a class: each prompt group's embeddings are
        averaged (unnormalised, as WinCLIP's references do), then normalised. Cached per class."""
        device = self.vision_pos.device
        cached = self._text_cache.get(class_name)
        if cached is not None and cached.device == device:
            return cached
        rows = []
        # Text features are computed once per class, in float32 whatever the inference autocast.
        with torch.autocast(device.type, enabled=False):
            for prompts in prompt_ensemble(class_name, self.ensemble):
                tokens = tokenize(prompts, truncate=True).to(device)
                rows.append(encode_text_causal(self.clip, tokens).float().mean(dim=0))
        features = F.normalize(torch.stack(rows), dim=-1)
        self._text_cache[class_name] = features
        return features

    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, E) text features, one pair per image."""
        return torch.stack([self.class_text_features(name) for name in class_names])

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images have shape {tuple(images.shape)}, the model expects (B, 3, {self.image_size}, "
                f"{self.image_size})"
            )

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        return forward_blocks(self.clip.visual.transformer.resblocks, tokens)[0]

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        return visual.ln_post(tokens) @ visual.proj

    def upsample(self, grid_maps: torch.Tensor) -> torch.Tensor:
        """(B, g*g) → (B, S, S), bilinear, align_corners False."""
        batch = grid_maps.shape[0]
        grid_maps = grid_maps.reshape(batch, 1, self.grid, self.grid)
        size = (self.image_size, self.image_size)
        return F.interpolate(grid_maps, size=size, mode="bilinear", align_corners=False)[:, 0]


def anomalous_probability(features: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """features (B, ..., E), text (B, 2, E) normalised → softmax(scale * cos)[..., anomalous], (B, ...)."""
    features = F.normalize(features.float(), dim=-1)
    shape = features.shape
    flat = features.reshape(shape[0], -1, shape[-1])
    logits = scale * torch.einsum("bne,bte->bnt", flat, text)
    return logits.softmax(dim=-1)[..., 1].reshape(shape[:-1])


class ClipZeroShot(_ZeroShotClip):
    """CLIP / CLIP-AC zero-shot scoring (see the module docstring); `ensemble` picks CLIP-AC's prompts."""

    def __init__(self, backbone: ClipBackbone, *, image_size: int = 518, ensemble: bool = False,
                 sigma: float = 4.0) -> None:
        super().__init__(backbone, image_size=image_size, ensemble=ensemble)
        self.sigma = sigma

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp().clamp(max=100.0))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_images(images)
        tokens = self.run_blocks(embed_patches(self.clip.visual, images, self.vision_pos))
        projected = self.project(tokens)
        text = self.text_features(class_names)
        scores = anomalous_probability(projected[:, 0], text, self.logit_scale)
        patch_probs = anomalous_probability(projected[:, 1:], text, self.logit_scale)
        maps = gaussian_blur(self.upsample(patch_probs), self.sigma)
        return scores.float(), maps.float()


class WinCLIP(_ZeroShotClip):
    """WinCLIP zero-shot (see the module docstring). `scales`: window sides in patches; `window_batch`: how many
    window sequences go through the transformer at once (memory bound)."""

    def __init__(self, backbone: ClipBackbone, *, image_size: int = 518, scales: Sequence[int] = (2, 3),
                 window_batch: int = 4096, sigma: float = 0.0, temperature: float = WINCLIP_TEMPERATURE) -> None:
        super().__init__(backbone, image_size=image_size, ensemble=True)
        self.scales = tuple(int(s) for s in scales)
        for scale in self.scales:
            if not 1 <= scale <= self.grid:
                raise ValueError(f"window scale {scale} must be between 1 and the patch grid {self.grid}")
        self.window_batch = max(1, int(window_batch))
        self.sigma = sigma
        self.temperature = temperature
        for scale in self.scales:
            self.register_buffer(f"windows_{scale}", window_indices(self.grid, scale), persistent=False)

    def windows(self, scale: int) -> torch.Tensor:
        return getattr(self, f"windows_{scale}")

    def encode_windows(self, embedded: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """embedded (B, 1 + P, C) after ln_pre; windows (W, k) patch indices → window embeddings (B, W, E).

        Each window is the sequence [CLS, its patches] with the patches' own position embeddings (already added),
        so it is what the transformer sees for a crop of those patches at their place in the image."""
        batch, _, width = embedded.shape
        n_windows = windows.shape[0]
        cls_index = torch.zeros(n_windows, 1, dtype=torch.long, device=embedded.device)
        index = torch.cat([cls_index, windows.to(embedded.device) + 1], dim=1)  # (W, 1 + k)
        sequences = embedded[:, index]  # (B, W, 1 + k, C)
        sequences = sequences.reshape(batch * n_windows, index.shape[1], width)
        outputs = []
        for start in range(0, sequences.shape[0], self.window_batch):
            chunk = self.run_blocks(sequences[start : start + self.window_batch])
            outputs.append(self.project(chunk[:, 0]))
        return torch.cat(outputs).reshape(batch, n_windows, -1)

    def score_windows(self, images: torch.Tensor, class_names: Sequence[str]
                      ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Full-image scores (B,) and, per scale, window scores (B, W)."""
        self.check_images(images)
        embedded = embed_patches(self.clip.visual, images, self.vision_pos)
        text = self.text_features(class_names)
        scale = 1.0 / self.temperature
        full = self.project(self.run_blocks(embedded)[:, 0])
        image_scores = anomalous_probability(full, text, scale)
        window_scores = {
            k: anomalous_probability(self.encode_windows(embedded, self.windows(k)), text, scale)
            for k in self.scales
        }
        return image_scores, window_scores

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        image_scores, window_scores = self.score_windows(images, class_names)
        n_patches = self.grid * self.grid
        per_scale = [image_scores.float()[:, None].expand(-1, n_patches)]
        per_scale += [harmonic_aggregation(window_scores[k].float(), self.windows(k), n_patches)
                      for k in self.scales]
        patch_scores = harmonic_mean(per_scale)
        maps = gaussian_blur(self.upsample(patch_scores), self.sigma)
        # WinCLIP's zero-shot image score is the full-image score (the paper's zero-shot classification); the
        # few-shot combination with the map's maximum is WinCLIP+'s, applied by model.fewshot.FewShotDetector.
        return image_scores.float(), maps.float()


class BaselineDetector(TorchDetector):
    """A training-free model behind the Detector protocol: device placement, autocast, class names per image."""

    def __init__(self, model: ClipZeroShot | WinCLIP, *, name: str, device: torch.device, dtype: torch.dtype,
                 version: str, class_name: str | None = None) -> None:
        super().__init__(model, device=device, dtype=dtype, version=version)
        self.backbone = model.backbone
        self.name = name
        self.class_name = class_name or DEFAULT_CLASS_NAME

    def _class_names(self, batch: int, class_names: Sequence[str] | None) -> list[str]:
        if class_names is None:
            return [self.class_name] * batch
        if isinstance(class_names, str):
            raise ValueError("class_names must be a list with one name per image, not a single string")
        if len(class_names) != batch:
            raise ValueError(f"{len(class_names)} class names for a batch of {batch} images")
        return [name or self.class_name for name in class_names]

    def _before_autocast(self, images: torch.Tensor, class_names: Sequence[str] | None) -> list[str]:
        names = self._class_names(images.shape[0], class_names)
        for name in set(names):  # text features in float32, outside autocast
            self.model.class_text_features(name)
        return names

    def _predict(self, images: torch.Tensor, class_names: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.predict(images, class_names)


@functools.lru_cache(maxsize=8)
def _cached_digest(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path)


def backbone_tag(backbone: str | Path | ClipBackbone, loaded: ClipBackbone) -> str:
    """A short identity of the backbone weights for version strings: the open_clip name/pretrained tag, or a local
    file's stem plus a digest of its content."""
    if isinstance(backbone, ClipBackbone):
        return Path(loaded.name).name
    return file_backbone_tag(backbone) or loaded.name


def _resolve_backbone(backbone: str | Path | ClipBackbone, backbone_config: str | Path | None,
                      pretrained: str | None) -> ClipBackbone:
    if isinstance(backbone, ClipBackbone):
        return backbone
    return load_backbone(backbone, config=backbone_config, pretrained=pretrained)


def _build_clip(ensemble: bool, name: str, *, backbone: str | Path | ClipBackbone, backbone_config: str | Path | None,
                pretrained: str | None, image_size: int, class_name: str | None, device: torch.device,
                dtype: torch.dtype, sigma: float) -> Detector:
    loaded = _resolve_backbone(backbone, backbone_config, pretrained)
    model = ClipZeroShot(loaded, image_size=image_size, ensemble=ensemble, sigma=sigma)
    version = f"{name}-{backbone_tag(backbone, loaded)}-{image_size}"
    return BaselineDetector(model, name=name, device=device, dtype=dtype, version=version, class_name=class_name)


def create_clip(
    *,
    backbone: str | Path | ClipBackbone = DEFAULT_BACKBONE,
    backbone_config: str | Path | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    image_size: int = 518,
    class_name: str | None = None,
    device: torch.device,
    dtype: torch.dtype,
    prompt_ensemble: bool = False,
    sigma: float = 4.0,
    **_: Any,
) -> Detector:
    """CLIP zero-shot ("normal {c}" / "anomalous {c}"); `prompt_ensemble=True` gives CLIP-AC."""
    return _build_clip(bool(prompt_ensemble), "clip-ac" if prompt_ensemble else "clip", backbone=backbone,
                       backbone_config=backbone_config, pretrained=pretrained, image_size=image_size,
                       class_name=class_name, device=device, dtype=dtype, sigma=sigma)


def create_clip_ac(**options: Any) -> Detector:
    """CLIP with WinCLIP's compositional prompt ensemble (`clip` with prompt_ensemble=True)."""
    options.pop("prompt_ensemble", None)
    return create_clip(prompt_ensemble=True, **options)


def create_winclip(
    *,
    backbone: str | Path | ClipBackbone = DEFAULT_BACKBONE,
    backbone_config: str | Path | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    image_size: int = 518,
    class_name: str | None = None,
    device: torch.device,
    dtype: torch.dtype,
    scales: Sequence[int] = (2, 3),
    window_batch: int = 4096,
    sigma: float = 0.0,
    **_: Any,
) -> Detector:
    """WinCLIP zero-shot. The paper uses ViT-B-16-plus-240/laion400m_e31 at 240 px; any ViT backbone works."""
    loaded = _resolve_backbone(backbone, backbone_config, pretrained)
    model = WinCLIP(loaded, image_size=image_size, scales=scales, window_batch=window_batch, sigma=sigma)
    scale_tag = "x".join(str(s) for s in model.scales)
    version = f"winclip-{backbone_tag(backbone, loaded)}-{image_size}-w{scale_tag}"
    return BaselineDetector(model, name="winclip", device=device, dtype=dtype, version=version,
                            class_name=class_name)


def file_backbone_tag(backbone: Any) -> str | None:
    """`backbone_tag` of a weights file, read without loading it (None: a name or a loaded backbone)."""
    if backbone is None or isinstance(backbone, ClipBackbone) or not Path(backbone).is_file():
        return None
    path = Path(backbone)
    stat = path.stat()
    return f"{path.stem}-{_cached_digest(str(path), stat.st_size, stat.st_mtime_ns)}"


def baseline_version(name: str) -> Callable[..., str | None]:
    """`ModelFamily.version_of` of a baseline: the version `create` gives, from the backbone file's digest alone (the
    daemon passes a file; an open_clip name is only named once loaded: None)."""

    def version_of(*, backbone: Any = None, image_size: int | None = None, scales: Sequence[int] | None = None,
                   **_: Any) -> str | None:
        tag = file_backbone_tag(backbone)
        if tag is None:
            return None
        if name == "winclip":
            size = int(image_size or 518)
            return f"winclip-{tag}-{size}-w{'x'.join(str(int(s)) for s in (scales or (2, 3)))}"
        return f"{name}-{tag}-{int(image_size or 518)}"

    return version_of


register_family(ModelFamily(name="clip", create=create_clip,
                            summary="CLIP zero-shot: two prompts per class (training-free)",
                            exporter=imported_later("model.baselines_export", "clip_graph"),
                            version_of=baseline_version("clip")))
register_family(ModelFamily(name="clip-ac", create=create_clip_ac,
                            summary="CLIP with WinCLIP's compositional prompt ensemble (training-free)",
                            exporter=imported_later("model.baselines_export", "clip_graph"),
                            version_of=baseline_version("clip-ac")))
register_family(ModelFamily(name="winclip", create=create_winclip,
                            summary="WinCLIP (CVPR 2023) zero-shot: sliding-window CLIP embeddings (training-free)",
                            exporter=imported_later("model.baselines_export", "winclip_graph"),
                            version_of=baseline_version("winclip")))
