"""Learning from labelled frames on the real (EfficientNet-Lite0) weights: a head on PatchCore, model
"patchcore-head".

- `head.py`: the head (a residual on a positive affine map of the PatchCore distance: untrained, it ranks like
  PatchCore).
- `training.py`: frozen inputs computed once (PatchCore embedding and distances, leave-one-out for references),
  synthetic defects, losses (focal + dice on cells, BCE on the top-k image logit), the seeded training loop.
- `detector.py`: the detector, `fit_head`, the family registration; `checkpoint.py`: a head's safetensors
  checkpoint; `head_set.py`: a version's heads, one per resize mode, and the pick by the detector's resize.
- `frames.py`: the head on the fit geometry (frames of their own shapes, masks cut like them, one item set per grid
  shape), optional thin crack-like synthetic defects.
- `evaluation.py`: mixed-supervision evaluation (`anomalyd eval --train-anomalies N [--weak]`), operating point.
"""

from model.lazy import lazy_package

# imported on first use: options.py (torch-free) loads without the model code
__all__ = lazy_package(__name__, {
    "model.supervised.checkpoint": ("NAME", "HeadCheckpoint"),
    "model.supervised.detector": ("PatchcoreHeadDetector", "fit_head", "load_head"),
    "model.supervised.head_set": ("HeadSet", "load_heads"),
    "model.supervised.head": ("PatchcoreHead",),
    "model.supervised.training": ("HeadTrainingConfig", "train_head"),
})
