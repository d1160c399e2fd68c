"""A trained patchcore-head's checkpoint (`HeadCheckpoint`: the head, its distance unit d0 and metadata) and its
safetensors file; model/supervised/head_set.py holds several, one per resize mode."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.checkpoints import CheckpointError, read_safetensors, write_safetensors
from model.supervised.head import PatchcoreHead

NAME = "patchcore-head"
FORMAT_NAME = "anomalyd-patchcore-head"
FORMAT_VERSION = 1


class HeadCheckpoint:
    """A trained head: its module, d0 (distance unit) and metadata (PatchCore identity, training summary)."""

    def __init__(self, head: PatchcoreHead, distance_scale: float, metadata: Mapping[str, Any]) -> None:
        self.head = head
        self.distance_scale = float(distance_scale)
        self.metadata = dict(metadata)

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for key, tensor in sorted(self.head.state_dict().items()):
            hasher.update(key.encode())
            hasher.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
        hasher.update(repr(self.distance_scale).encode())
        return hasher.hexdigest()[:10]

    def save(self, path: str | Path) -> Path:
        meta = {**self.metadata, "channels": self.head.channels, "hidden": self.head.hidden,
                "top_k": self.head.top_k, "kernel": self.head.kernel, "distance_scale": self.distance_scale, "model": NAME}
        return write_safetensors(path, self.head.state_dict(), FORMAT_NAME, FORMAT_VERSION, meta)

    @classmethod
    def load(cls, path: str | Path) -> HeadCheckpoint:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: patchcore-head weights file does not exist")
        tensors, meta = read_safetensors(path, FORMAT_NAME)
        if meta.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{path}: not a patchcore-head checkpoint (format {meta.get('format')!r})")
        try:
            head = PatchcoreHead(int(meta["channels"]), hidden=int(meta["hidden"]), top_k=int(meta["top_k"]),
                                 kernel=int(meta.get("kernel", 3)))
            head.load_state_dict(tensors, strict=True)
            scale = float(meta["distance_scale"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: patchcore-head checkpoint does not fit ({exc})") from exc
        return cls(head.eval(), scale, meta)
