"""Prompt checkpoints: the official AnomalyCLIP `.pth` format and the project's own safetensors format.

- Official: `torch.save({"prompt_learner": state_dict})` with the keys of `PromptLearner` (ctx_pos, ctx_neg,
  compound_prompts_text.N, compound_prompt_projections.N.*, token_prefix_*, token_suffix_*, tokenized_prompts_*).
  Read with `weights_only=True`.
- anomalyd: a safetensors file with the same tensors (`prompt_learner.` prefix, leaving room for other models'
  parts) and JSON metadata in the header under "anomalyd": model, backbone, taps, image size, training data,
  metrics, created time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.checkpoints import CheckpointError, read_safetensors, save_torch, write_safetensors

# Shapes the released ViT-L/14@336 prompts (model.factory: their `ReleasedWeights`) have: n_ctx 12, depth 9, deep
# length 4, text width 768.
RELEASED_PROMPT_SHAPE = {"n_ctx": 12, "depth": 9, "deep_length": 4, "width": 768}
FORMAT_NAME = "anomalyd-prompts"
FORMAT_VERSION = 1
_PREFIX = "prompt_learner."


@dataclass
class PromptCheckpoint:
    state: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    format: str = "anomalyd"  # or "official"
    path: Path | None = None

    @property
    def learner_shape(self) -> dict[str, int]:
        """n_ctx, depth, deep_length and width of the learner these tensors belong to."""
        try:
            ctx = self.state["ctx_pos"]
            deep = sorted(k for k in self.state if k.startswith("compound_prompts_text."))
            return {
                "n_ctx": int(ctx.shape[2]),
                "depth": len(deep) + 1,
                "deep_length": int(self.state[deep[0]].shape[0]) if deep else 4,
                "width": int(ctx.shape[-1]),
            }
        except (KeyError, IndexError) as exc:
            where = self.path or "checkpoint"
            raise CheckpointError(f"{where}: not an AnomalyCLIP prompt checkpoint (missing {exc})") from exc


def load_prompts(path: str | Path) -> PromptCheckpoint:
    """Read an official `.pth` or an anomalyd `.safetensors` prompt checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"prompts file {path} does not exist")
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path, FORMAT_NAME)
        state = {k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
        if not state:
            raise CheckpointError(f"{path}: no {_PREFIX}* tensors: not an anomalyd prompt checkpoint")
        return PromptCheckpoint(state=state, metadata=metadata, format="anomalyd", path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(obj, Mapping) or "prompt_learner" not in obj:
        keys = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: expected the official format {{'prompt_learner': ...}}, found {keys}")
    state = {k: v for k, v in obj["prompt_learner"].items() if isinstance(v, torch.Tensor)}
    return PromptCheckpoint(state=state, metadata={"source": str(path)}, format="official", path=path)


def released_prompts_problem(path: str | Path) -> str | None:
    """What is wrong with a downloaded file of the released prompts (None: it is them); `ReleasedWeights.check`.
    A file that cannot be read at all raises CheckpointError."""
    shape = load_prompts(path).learner_shape
    if shape != RELEASED_PROMPT_SHAPE:
        return f"{path}: prompt shapes {shape} are not the released ViT-L/14@336 ones {RELEASED_PROMPT_SHAPE}"
    return None


def save_official(path: str | Path, state: Mapping[str, torch.Tensor]) -> Path:
    """Write the official `{"prompt_learner": state_dict}` file (readable by the official test.py)."""
    return save_torch(path, {"prompt_learner": {k: v.detach().cpu().contiguous() for k, v in state.items()}})


def save_prompts(path: str | Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the anomalyd format: `.safetensors` (any other suffix writes the official format)."""
    if Path(path).suffix != ".safetensors":
        return save_official(path, state)
    return write_safetensors(path, {_PREFIX + k: v for k, v in state.items()}, FORMAT_NAME, FORMAT_VERSION, metadata)


def import_prompts(source: str | Path, target: Path, version: str) -> Path:
    """Configured prompts (official .pth or ours) as a version's own file, tagged with its version name."""
    checkpoint = load_prompts(source)
    metadata = dict(checkpoint.metadata)
    metadata.update(version=version, source=str(source))
    return save_prompts(target, checkpoint.state, metadata)
