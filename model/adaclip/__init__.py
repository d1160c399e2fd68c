"""AdaCLIP (Cao et al., ECCV 2024), cut by job like every family: `model` (the module), `prompts` (class-aware
text prompts), `kmeans` (hybrid semantic fusion's clustering), `loss`, `training` (optimiser, step, training
target), `checkpoint` (official `.pth` and anomalyd files), `family` (builder, detector, registration)."""

from model.lazy import lazy_package

# imported on first use: options.py (torch-free) loads without the model code
__all__ = lazy_package(__name__, {
    "model.adaclip.checkpoint": (
        "FORMAT_NAME", "OFFICIAL_PREFIX", "AdaCLIPCheckpoint", "export_official", "load_adaclip_checkpoint",
        "model_metadata", "save_adaclip",
    ),
    "model.adaclip.family": ("AdaCLIPDetector", "build_adaclip", "create_adaclip"),
    "model.adaclip.kmeans": ("kmeans", "kmeans_plus_plus"),
    "model.adaclip.loss": ("AdaCLIPLoss", "adaclip_loss"),
    "model.adaclip.model": ("LEARNED_MODULES", "LOGIT_SCALE", "AdaCLIP", "AdaCLIPOutput", "default_taps"),
    "model.adaclip.prompts": ("ClassNameError", "class_prompts"),
    "model.adaclip.training": ("build_optimizer", "training_step"),
})
