"""AdaCLIP's export graph (its family's `exporter`, model/export.py) and the per-class input of a class the export
does not hold (its `export_class_row`: the prompt token ids, from the tokenizer alone)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model._transformer import standard_block
from model.export import AuxInput, ExportError, ExportGraph, on_cpu


def _fp16_round(tensor: torch.Tensor) -> torch.Tensor:
    # AdaCLIP splices its prompts in with `.half()` (official code); the same rounding keeps parity.
    return tensor.half().to(tensor.dtype)


def _class_token_ids(class_name: str, context_length: int) -> torch.Tensor:
    """AdaCLIP's 48 prompt sentences for a class as CLIP token ids (48, context_length)."""
    from model.adaclip.prompts import ClassNameError, class_token_ids

    try:
        return class_token_ids(class_name, context_length)
    except ClassNameError as exc:
        raise ExportError(str(exc)) from exc


class AdaCLIPGraph(nn.Module):
    """AdaCLIP without HSF. Its text pass depends on the image (dynamic prompts), so it is in the graph; the
    class's 48 prompt token ids (B, 48, T) are the second input, T fixed at export (causal attention: tokens after
    the end-of-text never change a feature, so any T past the longest prompt gives the same result)."""

    def __init__(self, model: Any, n_normal: int) -> None:
        super().__init__()
        self.model = model
        self.n_normal = n_normal

    def encode_text(self, ids: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        model, clip = self.model, self.model.clip
        batch, n_prompts, length = ids.shape
        flat = ids.reshape(-1, length)
        eot = flat.argmax(dim=-1)
        x = clip.token_embedding(flat) + clip.positional_embedding[:length]
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        plen = model.prompt_length
        for index, block in enumerate(clip.transformer.resblocks):
            if 1 <= index < model.prompt_depth:
                context = _fp16_round(model.text_prompter.static_prompts[index] + dynamic)
                context = context.unsqueeze(1).expand(-1, n_prompts, -1, -1).reshape(-1, plen, context.shape[-1])
                x = torch.cat([x[:, :1], context, x[:, 1 + plen:]], dim=1)
            x = standard_block(block, x, mask)
        x = clip.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        features = F.normalize((x[rows, eot] @ clip.text_projection).float(), dim=-1)
        features = features.reshape(batch, n_prompts, -1)
        normal = F.normalize(features[:, : self.n_normal].mean(dim=1), dim=-1)
        anomalous = F.normalize(features[:, self.n_normal:].mean(dim=1), dim=-1)
        return torch.stack([normal, anomalous], dim=2)

    def forward(self, images: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from model.adaclip import LOGIT_SCALE, AdaCLIPOutput

        model = self.model
        u = model.plain_image_features(images)
        pooled, tap_tokens = model.encode_image(images, model.dynamic_visual_prompt_generator.stacked(u))
        text = self.encode_text(token_ids, model.dynamic_text_prompt_generator.stacked(u))
        patch_features = [F.normalize(f.float(), dim=-1)
                          for f in model.patch_token_layer.each([t[:, 1:] for t in tap_tokens])]
        global_features = F.normalize(model.cls_token_layer.head[0](pooled).float(), dim=-1)
        tap_logits = [LOGIT_SCALE * torch.bmm(p, text) for p in patch_features]
        image_logits = LOGIT_SCALE * torch.bmm(global_features.unsqueeze(1), text).squeeze(1)
        output = AdaCLIPOutput(image_probs=image_logits.softmax(dim=-1), tap_logits=tap_logits, text_features=text,
                               global_features=global_features, patch_features=patch_features)
        return output.scores, model.anomaly_maps(output)


def adaclip_graph(detector: Any, class_names: Sequence[str]) -> ExportGraph:
    from model.adaclip import class_prompts

    model = detector.model
    if model.use_hsf:
        raise ExportError(
            "adaclip with --hsf cannot be exported: hybrid semantic fusion clusters each image's patches with "
            "k-means (data-dependent iterations and cluster counts), which a static graph cannot hold; export "
            "without --hsf"
        )
    model = on_cpu(detector)
    context = int(model.clip.positional_embedding.shape[0])
    ids = {name: _class_token_ids(name, context) for name in class_names}
    length = max(max(int(t.argmax(dim=-1).max()) + 1 for t in ids.values()), model.prompt_length + 2)
    # Room for longer class names than the exported ones (the ids are cheap; the text pass runs on T tokens).
    length = min(context, length + 8)
    per_class = {name: t[:, :length].clone() for name, t in ids.items()}
    _, n_normal = class_prompts(class_names[0])
    return ExportGraph(
        module=AdaCLIPGraph(model, n_normal), model="adaclip", version=str(detector.version),
        image_size=int(model.image_size), backbone=model.backbone.name, taps=list(model.taps),
        tolerance={"scores": 2e-4, "maps": 2e-4}, aux=AuxInput("token_ids", per_class,
                                                              default_class=detector.class_name or class_names[0]),
        details={"prompt_length": model.prompt_length, "prompt_depth": model.prompt_depth, "token_length": length,
                 "hsf": False, "sigma": model.sigma},
    )


def adaclip_token_ids(class_name: str, length: int, context_length: int = 77) -> torch.Tensor:
    """AdaCLIP's prompt token ids for a class not in the export, cut to the export's token length (raises when a
    prompt does not fit)."""
    ids = _class_token_ids(class_name, context_length)
    if int(ids.argmax(dim=-1).max()) + 1 > length:
        raise ExportError(f"class name {class_name!r} is too long for this export's {length} prompt tokens")
    return ids[:, :length].clone()


def export_class_row(class_name: str, details: Mapping[str, Any]) -> torch.Tensor:
    """The token-id row of a class an export does not hold, at the export's token length (`details`)."""
    return adaclip_token_ids(class_name, int(details["token_length"]))
