"""Loading the golden AnomalyCLIP fixture (../shared/golden/anomalyclip) for the parity tests."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

from model import load_backbone, load_prompts
from model._backbone import ClipBackbone

TAP_SETS = {"L24": (24,), "L6-12-18-24": (6, 12, 18, 24)}


def backbone_files(golden_dir: Path) -> tuple[Path, Path]:
    return golden_dir / "tiny_clip_openai_fp16.safetensors", golden_dir / "tiny-clip-24L.json"


@cache
def _backbone(golden_dir: Path) -> ClipBackbone:
    weights, config = backbone_files(golden_dir)
    return load_backbone(weights, config=config)


def tiny_backbone(golden_dir: Path) -> ClipBackbone:
    return _backbone(golden_dir)


@cache
def expected(golden_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(golden_dir / "expected.safetensors"))


@cache
def expected_json(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "expected.json").read_text())


def prompts(golden_dir: Path):
    return load_prompts(golden_dir / "prompts_official_format.pth")
