"""A version's weights file with one patchcore-head per resize mode (model/supervised/head_set.py): it round-trips
through safetensors, a detector built on it (`prompts=`, as the daemon builds each source's) takes the head of its own
geometry's resize, a mode it has no head for is refused naming the modes it holds, and a single-head file still
loads (as a set of its one head). Real Lite0 weights, 64 px, untrained heads made distinct: seconds."""

from __future__ import annotations

import pytest
import torch

from model import create_detector
from model.checkpoints import CheckpointError
from model.geometry import make_geometry
from model.supervised.checkpoint import HeadCheckpoint
from model.supervised.head_set import HeadSet, head_for, load_heads
from model.supervised.label_learning import scorer

SIZE = 64


def _head(detector, mode: str, seed: int) -> HeadCheckpoint:
    """A head tagged with `mode` whose weights differ by seed (so digests differ)."""
    base = detector.untrained_checkpoint()
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in base.head.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    metadata = {k: v for k, v in base.metadata.items() if k != "untrained"}
    return HeadCheckpoint(base.head, 1.5 + seed, {**metadata, "geometry": mode})


@pytest.fixture(scope="module")
def heads() -> dict[str, HeadCheckpoint]:
    detector = create_detector("patchcore-head", references_later=True, image_size=SIZE, device="cpu")
    return {"squash": _head(detector, "squash", 1), "fit": _head(detector, "fit", 2)}


def test_multi_head_file_round_trips_and_each_geometry_builds_with_its_own_head(heads, tmp_path):
    path = HeadSet(heads, {"version": "v1"}).save(tmp_path / "heads.safetensors")
    loaded = load_heads(path)
    assert loaded.modes == ["fit", "squash"] and loaded.metadata["version"] == "v1"
    for mode, checkpoint in heads.items():
        assert loaded.for_resize(mode).digest() == checkpoint.digest()
        assert loaded.for_resize(mode).distance_scale == checkpoint.distance_scale
    assert heads["squash"].digest() != heads["fit"].digest()
    assert head_for(loaded, "tile") is None and head_for(None, "fit") is None

    built = {mode: create_detector("patchcore-head", prompts=str(path), references_later=True, image_size=SIZE,
                                   device="cpu", geometry=make_geometry(mode))
             for mode in ("squash", "fit")}
    for mode, detector in built.items():
        assert detector.checkpoint.digest() == heads[mode].digest()
        assert f"-h{heads[mode].digest()}-" in detector.version
    assert built["squash"].version != built["fit"].version
    # the promotion gate's scorer picks the same head on the detector's geometry
    detector = built["fit"]
    assert scorer(detector, loaded) is detector and detector.checkpoint.digest() == heads["fit"].digest()


def test_a_mode_without_a_head_is_refused_and_a_single_head_file_still_loads(heads, tmp_path):
    only_squash = HeadSet({"squash": heads["squash"], "fit": heads["fit"]})
    path = only_squash.save(tmp_path / "two.safetensors")
    single = heads["squash"].save(tmp_path / "single.safetensors")
    loaded = load_heads(single)
    assert loaded.modes == ["squash"] and loaded.for_resize("squash").digest() == heads["squash"].digest()
    # a single head on the other mode: the detector's own check names the mode it was trained on
    with pytest.raises(CheckpointError, match="trained on resize 'squash'"):
        create_detector("patchcore-head", prompts=str(single), references_later=True, image_size=SIZE,
                        device="cpu", geometry=make_geometry("fit"))
    # the scorer judges such a source on the base model, as the daemon runs it
    detector = create_detector("patchcore-head", references_later=True, image_size=SIZE, device="cpu",
                               geometry=make_geometry("fit"))
    assert scorer(detector, loaded) is detector.patchcore
    # a multi-head file without the detector's mode is refused, naming the modes it holds
    fit_only = HeadSet({"fit": heads["fit"], "other": heads["squash"]}).save(tmp_path / "fit.safetensors")
    with pytest.raises(CheckpointError, match=r"holds heads for resize 'fit', 'other'.*uses resize 'squash'"):
        create_detector("patchcore-head", prompts=str(fit_only), references_later=True, image_size=SIZE,
                        device="cpu")
    assert load_heads(path).modes == ["fit", "squash"]
    # a file that is not a head at all is refused clearly
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_heads(tmp_path / "junk.safetensors")
