"""The saved-bank base both reference banks share (model/bank.py): files keep their formats, each bank refuses the
other's file and damaged files with a ReferencesError naming the file, never another exception."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.bank import SavedBank, references_digest
from model.fewshot import BANK_FORMAT as CLIP_FORMAT
from model.fewshot import ReferenceBank, ReferencesError
from model.patchcore import PatchcoreBank
from model.patchcore.detector import BANK_FORMAT as PATCHCORE_FORMAT


def _clip_bank() -> ReferenceBank:
    features = [torch.randn(6, 4), torch.randn(6, 4)]
    return ReferenceBank(features=features, metadata={"format": CLIP_FORMAT, "n_references": "3", "digest": "ab12"})


def _patchcore_bank() -> PatchcoreBank:
    return PatchcoreBank(rows=torch.randn(5, 7, dtype=torch.float64),
                         metadata={"format": PATCHCORE_FORMAT, "n_references": "2", "digest": "cd34"})


def test_both_banks_share_the_base_and_keep_their_file_formats(tmp_path: Path) -> None:
    clip, patchcore = _clip_bank(), _patchcore_bank()
    assert isinstance(clip, SavedBank) and isinstance(patchcore, SavedBank)
    assert (clip.n_references, clip.digest, patchcore.n_references, patchcore.digest) == (3, "ab12", 2, "cd34")
    clip.save(tmp_path / "clip.safetensors")
    patchcore.save(tmp_path / "pc.safetensors")
    with safe_open(str(tmp_path / "clip.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["layer_0", "layer_1"]
        assert handle.get_tensor("layer_0").dtype == torch.float16
        assert handle.metadata() == clip.metadata
    with safe_open(str(tmp_path / "pc.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["memory_bank"] and handle.get_tensor("memory_bank").dtype == torch.float32
        assert handle.metadata() == patchcore.metadata
    clip_back = ReferenceBank.load(tmp_path / "clip.safetensors")
    assert clip_back.metadata == clip.metadata and len(clip_back.features) == 2
    torch.testing.assert_close(clip_back.features[1], clip.features[1].half().float())
    pc_back = PatchcoreBank.load(tmp_path / "pc.safetensors")
    assert pc_back.metadata == patchcore.metadata
    torch.testing.assert_close(pc_back.rows, patchcore.rows.float())


def test_each_bank_refuses_the_others_file_and_damaged_files(tmp_path: Path) -> None:
    clip_path = _clip_bank().save(tmp_path / "clip.safetensors")
    pc_path = _patchcore_bank().save(tmp_path / "pc.safetensors")
    with pytest.raises(ReferencesError, match=r"pc\.safetensors: not an anomalyd reference bank"):
        ReferenceBank.load(pc_path)
    with pytest.raises(ReferencesError, match=r"clip\.safetensors: not a PatchCore memory bank"):
        PatchcoreBank.load(clip_path)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(clip_path.read_bytes()[:40])
    with pytest.raises(ReferencesError, match=r"damaged\.safetensors: not a readable reference bank"):
        ReferenceBank.load(damaged)
    with pytest.raises(ReferencesError, match=r"damaged\.safetensors: not a readable PatchCore memory bank"):
        PatchcoreBank.load(damaged)
    with pytest.raises(ReferencesError, match=r"PatchCore memory bank .*gone\.safetensors does not exist"):
        PatchcoreBank.load(tmp_path / "gone.safetensors")


def test_references_digest_follows_names_and_contents(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    first = references_digest([a, b])
    assert len(first) == 16 and first != references_digest([b, a])
    b.write_bytes(b"three")
    assert references_digest([a, b]) != first
