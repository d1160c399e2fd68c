"""Mutual scoring (MuSc, Li et al., ICLR 2024) on PatchCore's frozen features; registered as model "mutual".

- `scoring.py`: the set-level scores (each image's patches against the other images, MuSc's interval average).
- `window.py`: the online form, a bounded rolling window of a source's recent normal-looking frames.
- `detector.py`: the Detector (offline `predict_set`, online `predict`), registration.
"""

from model.mutual.detector import MutualDetector, build_mutual
from model.mutual.scoring import mutual_patch_scores, nearest_per_image, smallest_mean, top_mean
from model.mutual.window import MutualWindow, WindowLimits

__all__ = ["MutualDetector", "MutualWindow", "WindowLimits", "build_mutual", "mutual_patch_scores",
           "nearest_per_image", "smallest_mean", "top_mean"]
