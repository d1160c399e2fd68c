"""What the families' checkpoint formats share: the error type, and reading/writing anomalyd safetensors files
(tensors plus JSON metadata under "anomalyd" in the header, with a format name and version).

Each family's own format lives with it (`model.anomalyclip.checkpoint`, `model.adaclip.checkpoint`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model.atomic import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file and the problem."""


def read_safetensors(path: Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and the "anomalyd" JSON metadata of an anomalyd safetensors file whose format must be expected_format."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        metadata = json.loads(header.get("anomalyd", "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from exc
    if metadata.get("format") not in (None, expected_format):
        raise CheckpointError(f"{path}: format {metadata.get('format')!r} is not {expected_format!r}")
    return tensors, metadata


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], format_name: str, format_version: int,
                      metadata: Mapping[str, Any] | None = None) -> Path:
    """Write an anomalyd safetensors file atomically: tensors (made contiguous on the CPU) and the JSON metadata
    (format, format_version, created, then `metadata`)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": format_name, "format_version": format_version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    meta.update(metadata or {})
    with atomic_path(path) as tmp:  # one temporary name per writer: workers may race
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"anomalyd": json.dumps(meta, default=str)})
    return path


def save_torch(path: str | Path, obj: Any) -> Path:
    """`torch.save` to a temporary file beside `path`, then rename (readers never see half a file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path
