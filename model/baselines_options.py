"""The training-free CLIP baselines' own options (model/baselines.py); torch-free (model/options.py)."""

from __future__ import annotations

from dataclasses import dataclass

from model.options import option


@dataclass(frozen=True)
class ClipAcOptions:
    sigma: float = option(4.0, "Gaussian smoothing of the anomaly map (0: none)", minimum=0)


@dataclass(frozen=True)
class ClipOptions(ClipAcOptions):
    prompt_ensemble: bool = option(False, "WinCLIP's compositional prompt ensemble (what clip-ac is)")


@dataclass(frozen=True)
class WinclipOptions:
    scales: tuple[int, ...] = option((2, 3), "window sizes in patches")
    window_batch: int = option(4096, "windows embedded at once", minimum=1)
    sigma: float = option(0.0, "Gaussian smoothing of the anomaly map (0: none)", minimum=0)
