"""The head on a frame geometry (model/geometry.py) other than the square squash: "fit" (aspect ratio kept, short
side to the model size, the long side rounded to the stride), optionally with an ROI.

Each frame is one model input of its own shape, so the frozen training items are kept one `HeadInputs` per grid
shape (`train_head` draws its mini-batches over all of them). Everything else is the square path's
(model/supervised/training.py): references scored leave-one-out, labelled defects with their masks cut and
resized exactly as their frames are, labelled normals, synthetic defects made on the references' own (rectangular)
inputs.

Under "tile" (and "auto" on a long frame) a frame is several inputs, (T, 3, S, S), and its mask (T, S, S) is cut as
the frame is. A tile of a defective frame need not show the defect, so a frame's label does not pass to its tiles
as it stands: with a mask each tile is labelled by its own part of the mask (a tile without a masked pixel trains as
normal); with the image label only, the frame's most anomalous tile under PatchCore (the largest cell distance)
trains as the defect and its other tiles are left out (multiple-instance learning, max instance); every tile of a
normal frame is normal. References are scored leave-one-out by frame: all of a reference's tiles leave the bank.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model.datasets import Sample
from model.geometry import Geometry, frame_inputs, plan_frame
from model.patchcore import PatchCoreDetector, PatchcoreModel, clip_to_tf, nearest_neighbor
from model.supervised.training import HeadInputs, to_rgb

Frames = list[torch.Tensor]  # normalised model inputs (3, h, w), each of its own shape


def load_frame(path: str | Path, geometry: Geometry, size: int) -> torch.Tensor:
    """The frame's model input (3, h, w) under `geometry`, or its tiles (T, 3, S, S) when it is cut into several."""
    from model.preprocess import decode_image

    return one_or_tiles(frame_inputs(decode_image(path), geometry, size))


def one_or_tiles(inputs: torch.Tensor) -> torch.Tensor:
    """A frame's (N, ...) inputs or masks: the one entry when N is 1 (squash, fit), else all N (tiles)."""
    return inputs[0] if inputs.shape[0] == 1 else inputs


def load_frame_mask(sample: Sample, geometry: Geometry, size: int, frame_hw: tuple[int, int]) -> torch.Tensor:
    """The sample's mask cut like its frame (ROI, resize to the input's shape), {0,1} (h, w): the official mask
    rule (any pixel > 0, bilinear resize, > 0.5), as `model.preprocess.mask_transform` does for the square."""
    from PIL import Image

    plan = plan_frame(frame_hw, geometry, size)
    if sample.label == 0 or not sample.has_mask or sample.mask_path is None:
        zeros = torch.zeros((len(plan.origins), *plan.input_hw), dtype=torch.float32)
        return one_or_tiles(zeros)
    array = np.asarray(Image.open(sample.mask_path).convert("L"))
    if array.shape != tuple(frame_hw):
        raise ValueError(f"{sample.mask_path}: mask is {array.shape[1]}x{array.shape[0]} but its image "
                         f"{sample.path} is {frame_hw[1]}x{frame_hw[0]}")
    x, y, w, h = plan.roi
    binary = Image.fromarray((array[y:y + h, x:x + w] > 0).astype(np.uint8) * 255, mode="L")
    resized = np.asarray(binary.resize((plan.scaled[1], plan.scaled[0]), Image.Resampling.BILINEAR), np.float32)
    scaled = (resized / 255.0 > 0.5).astype(np.float32)
    if plan.padded is not None and plan.padded != plan.scaled:  # as `cut_frame` pads the frame
        scaled = np.pad(scaled, ((0, plan.padded[0] - plan.scaled[0]), (0, plan.padded[1] - plan.scaled[1])),
                        mode="symmetric")
    th, tw = plan.input_hw
    return one_or_tiles(torch.from_numpy(np.stack([scaled[oy:oy + th, ox:ox + tw] for oy, ox in plan.origins])))


def load_training_frames_geometry(samples: Sequence[Sample], geometry: Geometry, size: int, *, weak: bool
                                  ) -> tuple[Frames, Frames, torch.Tensor]:
    """(inputs [(3, h, w) or tiles (T, 3, S, S)], masks [(h, w) or (T, S, S)], has_mask (N,)) of labelled
    defective samples; `weak`: no masks."""
    from model.preprocess import decode_image

    images, masks = [], []
    has_mask = torch.tensor([(not weak) and s.has_mask for s in samples], dtype=torch.bool)
    for sample, masked in zip(samples, has_mask, strict=True):
        rgb = decode_image(sample.path)
        images.append(one_or_tiles(frame_inputs(rgb, geometry, size)))
        masks.append(load_frame_mask(sample, geometry, size, rgb.shape[:2]) if bool(masked)
                     else torch.zeros(images[-1].shape[:-3] + images[-1].shape[-2:]))
    return images, masks, has_mask


@torch.no_grad()
def embed_frames(detector: PatchCoreDetector, frames: Sequence[torch.Tensor]) -> Frames:
    """PatchCore embeddings (D, h, w) of each frame, frames of one shape batched together."""
    out: list[torch.Tensor | None] = [None] * len(frames)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, frame in enumerate(frames):
        by_shape.setdefault(tuple(frame.shape), []).append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), detector.batch_size):
            chunk = indices[start:start + detector.batch_size]
            batch = clip_to_tf(torch.stack([frames[i] for i in chunk]).to(detector.device).float())
            embedded = detector.model.embed(batch).float().cpu()
            for offset, index in enumerate(chunk):
                out[index] = embedded[offset]
    return [e for e in out if e is not None]


@torch.no_grad()
def frame_bank_distances(detector: PatchCoreDetector, embeddings: Sequence[torch.Tensor]) -> Frames:
    """(h, w) distance of each frame's cells to the detector's memory bank."""
    return [detector.model.patch_scores(e.unsqueeze(0).to(detector.device))[0].cpu().reshape(e.shape[-2:])
            for e in embeddings]


@torch.no_grad()
def frame_leave_one_out(reference_embeddings: Sequence[torch.Tensor], embeddings: Sequence[torch.Tensor],
                        owners: Sequence[int], groups: Sequence[int] | None = None) -> Frames:
    """(h, w) per embedding: its cells' distances to the rows of every reference but those of `owners[i]`: the
    reference embeddings whose `groups` entry (their frame, when a frame is several tiles; default: each its own)
    is the owner."""
    rows = [PatchcoreModel.flatten(e.unsqueeze(0)) for e in reference_embeddings]
    groups = list(range(len(rows))) if groups is None else list(groups)
    out: list[torch.Tensor | None] = [None] * len(embeddings)
    for owner in sorted(set(owners)):
        others = [r for r, group in zip(rows, groups, strict=True) if group != owner]
        bank = torch.cat(others) if others else rows[0]
        which = [i for i, o in enumerate(owners) if o == owner]
        queries = torch.cat([PatchcoreModel.flatten(embeddings[i].unsqueeze(0)) for i in which])
        distances, _ = nearest_neighbor(queries, bank)
        start = 0
        for i in which:
            h, w = embeddings[i].shape[-2:]
            out[i] = distances[start:start + h * w].reshape(h, w).cpu()
            start += h * w
    return [d for d in out if d is not None]


def frame_synthetic_defects(references: Sequence[torch.Tensor], per_reference: int, seed: int
                            ) -> tuple[Frames, Frames, list[int]]:
    """(inputs, masks, owner reference) of `per_reference` synthetic defects on each reference's own input, drawn
    as `model.synthetic.SyntheticAnomalies` draws them (seed, epoch, index; a cut source: another reference)."""
    from model.preprocess import normalise_pixels
    from model.synthetic import KINDS, make_synthetic_anomaly

    rgbs = [to_rgb(r.unsqueeze(0))[0] for r in references]
    images, masks, owners = [], [], []
    for epoch in range(per_reference if rgbs else 0):
        for index, rgb in enumerate(rgbs):
            rng = np.random.default_rng([seed, epoch, index])
            rng.random()  # SyntheticAnomalies' p_anomaly draw (always anomalous here)
            kind = KINDS[int(rng.integers(len(KINDS)))]
            source = None
            if len(rgbs) > 1 and rng.random() < 0.5:
                other = int(rng.integers(len(rgbs) - 1))
                source = rgbs[other + (other >= index)]
            anomalous, mask = make_synthetic_anomaly(rgb, rng, kind, source)
            images.append(normalise_pixels(torch.from_numpy(anomalous).unsqueeze(0))[0])
            masks.append(torch.from_numpy(mask.astype(np.float32)))
            owners.append(index)
    return images, masks, owners


def thin_crack(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin crack-like defect: a random polyline (3-7 segments, a random walk in direction, 15-60 % of the short
    side long, 1-3 px wide) darkened or lightened by 35-75 %; mask: where the image changed by the synthetic
    change threshold or more. Thin lines are the defect shape the cut-paste and noise blobs never make."""
    import cv2

    from model.synthetic import CHANGE_THRESHOLD

    height, width = rgb.shape[:2]
    length = rng.uniform(0.15, 0.6) * min(height, width)
    segments = int(rng.integers(3, 8))
    point = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height])
    angle = rng.uniform(0, 2 * np.pi)
    points = [point.copy()]
    for _ in range(segments):
        angle += rng.normal(0, 0.6)
        point = point + length / segments * np.array([np.cos(angle), np.sin(angle)])
        points.append(np.clip(point, 0, [width - 1, height - 1]))
    line = np.zeros((height, width), np.float32)
    cv2.polylines(line, [np.round(np.array(points)).astype(np.int32)], False, 1.0, int(rng.integers(1, 4)),
                  cv2.LINE_AA)
    strength = rng.uniform(0.35, 0.75) * line[..., None]
    target = 255.0 if rng.random() < 0.25 else 0.0  # cracks are mostly dark
    changed = np.clip(rgb * (1 - strength) + target * strength + 0.5, 0, 255).astype(np.uint8)
    mask = (np.abs(changed.astype(np.int16) - rgb.astype(np.int16)).max(axis=2) >= CHANGE_THRESHOLD)
    return np.where(mask[..., None], changed, rgb), mask.astype(np.uint8)


def frame_thin_defects(references: Sequence[torch.Tensor], per_reference: int, seed: int
                       ) -> tuple[Frames, Frames, list[int]]:
    """(inputs, masks, owner reference) of `per_reference` thin cracks (`thin_crack`) on each reference."""
    from model.preprocess import normalise_pixels

    rgbs = [to_rgb(r.unsqueeze(0))[0] for r in references]
    images, masks, owners = [], [], []
    for epoch in range(per_reference if rgbs else 0):
        for index, rgb in enumerate(rgbs):
            anomalous, mask = thin_crack(rgb, np.random.default_rng([seed, 7919, epoch, index]))
            if not mask.any():
                continue
            images.append(normalise_pixels(torch.from_numpy(anomalous).unsqueeze(0))[0])
            masks.append(torch.from_numpy(mask.astype(np.float32)))
            owners.append(index)
    return images, masks, owners


def frame_targets(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(h_in, w_in) {0,1} mask → (h, w) cell targets: 1 where any pixel of the cell is set."""
    return torch.nn.functional.adaptive_max_pool2d(mask.float()[None, None], grid)[0, 0]


def group_items(embeddings: Sequence[torch.Tensor], distances: Sequence[torch.Tensor], labels: Sequence[float],
                targets: Sequence[torch.Tensor], has_mask: Sequence[bool], real: Sequence[bool]) -> list[HeadInputs]:
    """One HeadInputs per grid shape (items in their given order within each)."""
    by_grid: dict[tuple[int, int], list[int]] = {}
    for index, embedding in enumerate(embeddings):
        by_grid.setdefault(tuple(embedding.shape[-2:]), []).append(index)
    return [HeadInputs(torch.stack([embeddings[i] for i in which]), torch.stack([distances[i] for i in which]),
                       torch.tensor([float(labels[i]) for i in which]), torch.stack([targets[i] for i in which]),
                       torch.tensor([bool(has_mask[i]) for i in which]), torch.tensor([bool(real[i]) for i in which]))
            for which in by_grid.values()]


def frame_training_inputs(detector: PatchCoreDetector, references: Sequence[torch.Tensor],
                          anomalies: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], has_mask: torch.Tensor,
                          *, synthetic_per_reference: int, seed: int,
                          normals: Sequence[torch.Tensor] | None = None, thin_per_reference: int = 0
                          ) -> tuple[list[HeadInputs], dict[str, int]]:
    """`training.training_inputs` for frames of their own shapes: (one HeadInputs per grid shape, item counts).
    The detector's bank holds `references`."""
    items, counts = frame_training_items(detector, references, anomalies, masks, has_mask,
                                         synthetic_per_reference=synthetic_per_reference, seed=seed,
                                         normals=normals, thin_per_reference=thin_per_reference)
    return group_items(*items), counts


FrameItems = tuple[list, list, list, list, list, list]  # embeddings, distances, labels, targets, has_mask, real


def frame_training_items(detector: PatchCoreDetector, references: Sequence[torch.Tensor],
                         anomalies: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], has_mask: torch.Tensor,
                         *, synthetic_per_reference: int, seed: int,
                         normals: Sequence[torch.Tensor] | None = None, thin_per_reference: int = 0
                         ) -> tuple[FrameItems, dict[str, int]]:
    """The items of `frame_training_inputs` as flat lists, in training order (references, synthetic defects,
    labelled defects, labelled normals), before they are grouped by grid shape. A frame of several inputs (tiles,
    (T, 3, S, S)) gives one item per tile, labelled as the module docstring says."""
    reference_inputs, reference_frames = expand(references)
    ref_embeddings = embed_frames(detector, reference_inputs)
    k = len(ref_embeddings)
    embeddings = list(ref_embeddings)
    distances = frame_leave_one_out(ref_embeddings, ref_embeddings, reference_frames, reference_frames)
    labels, targets = [0.0] * k, [torch.zeros(e.shape[-2:]) for e in ref_embeddings]
    masked, real = [True] * k, [True] * k
    counts = {"normal": k}
    images, synthetic_masks, owners = frame_synthetic_defects(reference_inputs, synthetic_per_reference, seed)
    thin_images, thin_masks, thin_owners = frame_thin_defects(reference_inputs, thin_per_reference, seed)
    images, synthetic_masks, owners = images + thin_images, synthetic_masks + thin_masks, owners + thin_owners
    if owners:
        synthetic = embed_frames(detector, images)
        embeddings += synthetic
        distances += frame_leave_one_out(ref_embeddings, synthetic, [reference_frames[o] for o in owners],
                                         reference_frames)
        labels += [1.0] * len(owners)
        targets += [frame_targets(m, tuple(e.shape[-2:])) for m, e in zip(synthetic_masks, synthetic, strict=True)]
        masked += [True] * len(owners)
        real += [False] * len(owners)
        counts["synthetic"] = len(owners)
    if len(anomalies):
        inputs, frames = expand(anomalies)
        tile_masks, _ = expand(masks, like=anomalies)
        found = embed_frames(detector, inputs)
        found_distances = frame_bank_distances(detector, found)
        tiled = len(inputs) > len(anomalies)
        # image label only, on a tiled frame: its most anomalous tile under PatchCore is the defect (max instance)
        strongest: dict[int, int] = {}
        for i, frame in enumerate(frames):
            if frame not in strongest or found_distances[i].max() > found_distances[strongest[frame]].max():
                strongest[frame] = i
        defect_tiles = 0
        for i, frame in enumerate(frames):
            with_mask = bool(has_mask[frame])
            if tiled and not with_mask and strongest[frame] != i:
                continue
            label = float(bool(tile_masks[i].any())) if tiled and with_mask else 1.0
            defect_tiles += int(label)
            embeddings.append(found[i])
            distances.append(found_distances[i])
            labels.append(label)
            targets.append(frame_targets(tile_masks[i], tuple(found[i].shape[-2:])))
            masked.append(with_mask)
            real.append(True)
        counts.update(anomalous_masked=int(has_mask.sum()), anomalous_weak=int((~has_mask.bool()).sum()))
        if tiled:
            counts["anomalous_tiles"] = defect_tiles
    if normals:
        inputs, _ = expand(normals)
        found = embed_frames(detector, inputs)
        embeddings += found
        distances += frame_bank_distances(detector, found)
        labels += [0.0] * len(found)
        targets += [torch.zeros(e.shape[-2:]) for e in found]
        masked += [True] * len(found)
        real += [True] * len(found)
        counts["normal_labelled"] = len(normals)
    return (embeddings, distances, labels, targets, masked, real), counts


def expand(frames: Sequence[torch.Tensor], like: Sequence[torch.Tensor] | None = None) -> tuple[Frames, list[int]]:
    """Frames of one input (3, h, w) or of several tiles (T, 3, S, S) → (one entry per input, the index of the frame
    each came from). With `like` (the frames), their masks (h, w) / (T, S, S) are split the same way."""
    inputs, owners = [], []
    for index, frame in enumerate(frames):
        shape_of = like[index] if like is not None else frame
        parts = list(frame) if shape_of.ndim == 4 else [frame]
        inputs += parts
        owners += [index] * len(parts)
    return inputs, owners


def as_batches(frames: Sequence[torch.Tensor]) -> Frames:
    """Each frame's inputs as one (N, 3, h, w) batch, as PatchCore's `set_references` takes a geometry's frames."""
    return [frame if frame.ndim == 4 else frame.unsqueeze(0) for frame in frames]


def frames_of(images: torch.Tensor | Sequence[torch.Tensor]) -> Frames:
    """A (N, 3, h, w) batch or a list of (3, h, w) / (1, 3, h, w) inputs → a list of (3, h, w); a frame of several
    tiles (T, 3, S, S) stays one entry."""
    return [image[0] if image.ndim == 4 and image.shape[0] == 1 else image for image in images]


__all__ = ["as_batches", "embed_frames", "expand", "frame_training_inputs", "frames_of", "load_frame",
           "load_frame_mask", "load_training_frames_geometry"]
