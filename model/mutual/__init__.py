"""Mutual scoring (MuSc, Li et al., ICLR 2024) on PatchCore's frozen features; registered as model "mutual".

- `scoring.py`: the set-level scores (each image's patches against the other images, MuSc's interval average).
- `window.py`: the online form, a bounded rolling window of a source's recent normal-looking frames.
- `detector.py`: the Detector (offline `predict_set`, online `predict`), registration.
"""

from model.lazy import lazy_package

# imported on first use: options.py (torch-free) loads without the model code
__all__ = lazy_package(__name__, {
    "model.mutual.detector": ("MutualDetector", "build_mutual"),
    "model.mutual.scoring": ("mutual_patch_scores", "nearest_per_image", "smallest_mean", "top_mean"),
    "model.mutual.window": ("MutualWindow", "WindowLimits"),
})
