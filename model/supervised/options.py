"""The patchcore-head's options: PatchCore's, plus its trained head; torch-free (model/options.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.options import option
from model.patchcore.options import PatchcoreOptions


@dataclass(frozen=True)
class PatchcoreHeadOptions(PatchcoreOptions):
    head: str | Path | None = option(
        None, "trained head checkpoint (.safetensors; default: untrained, ranks like patchcore); a model version's "
        "`prompts` file is the same", flag="--head", source=True)
