"""A model version's heads, one per resize mode: a retraining run whose sources run different resize modes
(`squash`, `fit`) trains one head per mode (a head only fits the inputs it was trained on), and the version's one
weights file holds all of them. Each source's detector picks the head of its own geometry's mode
(`head_for`); a mode the version has no head for is refused (CheckpointError), and the daemon runs the base model
there.

File format: one safetensors file, format "anomalyd-patchcore-heads", each head's tensors under "<mode>/<name>" and
its metadata (what `HeadCheckpoint.save` writes) under "heads" → mode. A version with one head keeps the single-head
file (model/supervised/detector.py: `HeadCheckpoint`); `load_heads` reads either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.checkpoints import CheckpointError, read_safetensors, write_safetensors
from model.supervised.checkpoint import NAME, HeadCheckpoint
from model.supervised.head import PatchcoreHead

FORMAT_NAME = "anomalyd-patchcore-heads"
FORMAT_VERSION = 1


def trained_resize(checkpoint: HeadCheckpoint) -> str:
    """The resize mode a head was trained on (its metadata's geometry tag; heads from before: squash)."""
    return str(checkpoint.metadata.get("geometry", "squash")).split("-")[0]


class HeadSet:
    """Heads by resize mode (see the module docstring)."""

    def __init__(self, heads: Mapping[str, HeadCheckpoint], metadata: Mapping[str, Any] | None = None) -> None:
        if not heads:
            raise ValueError("a head set holds at least one head")
        self.heads = dict(sorted(heads.items()))
        self.metadata = dict(metadata or {})

    @property
    def modes(self) -> list[str]:
        return list(self.heads)

    def for_resize(self, resize: str) -> HeadCheckpoint | None:
        return self.heads.get(resize)

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for mode, checkpoint in self.heads.items():
            hasher.update(f"{mode}:{checkpoint.digest()}".encode())
        return hasher.hexdigest()[:10]

    def save(self, path: str | Path) -> Path:
        """One head: the single-head file (as before); several: the multi-head file."""
        if len(self.heads) == 1:
            return next(iter(self.heads.values())).save(path)
        tensors = {f"{mode}/{key}": value for mode, checkpoint in self.heads.items()
                   for key, value in checkpoint.head.state_dict().items()}
        heads = {mode: {**checkpoint.metadata, "channels": checkpoint.head.channels, "hidden": checkpoint.head.hidden,
                        "top_k": checkpoint.head.top_k, "kernel": checkpoint.head.kernel,
                        "distance_scale": checkpoint.distance_scale}
                 for mode, checkpoint in self.heads.items()}
        return write_safetensors(path, tensors, FORMAT_NAME, FORMAT_VERSION,
                                 {**self.metadata, "model": NAME, "modes": self.modes, "heads": heads})

    @classmethod
    def load(cls, path: str | Path) -> HeadSet:
        """A multi-head file, or a single-head one (a set of its one head)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: patchcore-head weights file does not exist")
        try:
            tensors, meta = read_safetensors(path, FORMAT_NAME)
        except CheckpointError:
            single = HeadCheckpoint.load(path)
            return cls({trained_resize(single): single}, single.metadata)
        if meta.get("format") != FORMAT_NAME:
            single = HeadCheckpoint.load(path)
            return cls({trained_resize(single): single}, single.metadata)
        heads: dict[str, HeadCheckpoint] = {}
        try:
            for mode, head_meta in dict(meta["heads"]).items():
                head = PatchcoreHead(int(head_meta["channels"]), hidden=int(head_meta["hidden"]),
                                     top_k=int(head_meta["top_k"]), kernel=int(head_meta.get("kernel", 3)))
                prefix = f"{mode}/"
                head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                     strict=True)
                heads[str(mode)] = HeadCheckpoint(head.eval(), float(head_meta["distance_scale"]), head_meta)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: patchcore-head weights file does not fit ({exc})") from exc
        if not heads:
            raise CheckpointError(f"{path}: patchcore-head weights file holds no head")
        return cls(heads, {k: v for k, v in meta.items() if k != "heads"})


def load_heads(path: str | Path) -> HeadSet:
    """`LabelLearning.load`: a version's weights file, one head or one per resize mode."""
    return HeadSet.load(path)


def head_for(weights: HeadCheckpoint | HeadSet | None, resize: str) -> HeadCheckpoint | None:
    """The head of `weights` that fits frames of `resize` (None: no weights, or none trained on that mode)."""
    if weights is None:
        return None
    if isinstance(weights, HeadSet):
        return weights.for_resize(resize)
    return weights if trained_resize(weights) == resize else None


def version_head(path: str | Path, resize: str, origin: str) -> HeadCheckpoint:
    """The head of a version's weights file for a detector of `resize`; CheckpointError naming the modes it holds
    when it has none for that mode (a single-head file: the detector's own check says which mode it was)."""
    heads = HeadSet.load(path)
    checkpoint = heads.for_resize(resize)
    if checkpoint is not None:
        return checkpoint
    if len(heads.modes) == 1:
        return next(iter(heads.heads.values()))  # set_checkpoint refuses it, naming the mode it was trained on
    raise CheckpointError(f"{origin}: the version holds heads for resize {', '.join(map(repr, heads.modes))}, this "
                          f"detector uses resize {resize!r} (its sources had too few labelled defects to train one)")
