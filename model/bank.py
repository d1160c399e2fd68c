"""What every saved bank of normal references shares: its metadata, its safetensors file, the digest of its files.

Two families keep banks built from known-good images: few-shot CLIP (`model.fewshot.ReferenceBank`, per-block
normalised patch features) and PatchCore (`model.patchcore.PatchcoreBank`, memory-bank rows). Their tensors and
formats differ, but both are tensors plus string metadata (format, model identity, number of references, digest of
the reference files) written atomically as safetensors and read back with a clear error; `SavedBank` is that part.
Pure torch + safetensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from model.atomic import atomic_path


def references_digest(files: Sequence[Path]) -> str:
    """A digest of the reference set: the names and contents of the files, in order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


class SavedBank:
    """Base of the bank dataclasses: `metadata` (str → str, as saved) and the safetensors round trip."""

    metadata: dict[str, str]

    @property
    def n_references(self) -> int:
        return int(self.metadata.get("n_references", "0"))

    @property
    def digest(self) -> str:
        return self.metadata.get("digest", "")

    def _write(self, path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
        """Write `tensors` (moved to the CPU, contiguous) and the metadata atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=dict(self.metadata))
        return path

    @staticmethod
    def _read(path: str | Path, what: str, error: type[ValueError]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        """(metadata, tensors) of a saved bank; `error` naming the file when it is missing or unreadable."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise error(f"{what} {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as exc:
            raise error(f"{path}: not a readable {what} ({exc})") from exc
        return metadata, tensors
