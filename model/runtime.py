"""Where a frozen CNN trunk runs on the CPU: a process-wide choice, set at start by the daemon and the CLI.

`model/` stays pure PyTorch: an edge (adapters/cnn_runtime.py, ONNX Runtime) registers a *trunk compiler* here,
a callable that takes a `TapExtractor` and returns a runner (images → tap outputs) or None to keep PyTorch. An
extractor asks for its runner on its first CPU float32 inference call, and only then (see
`model.patchcore.backbone.TapExtractor`). No compiler registered (the default, as in the tests of `model/`): PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

TrunkRunner = Callable[[Any], Sequence[Any]]  # (B, 3, H, W) float32 CPU tensor → the tap outputs, in tap order
TrunkCompiler = Callable[[Any], TrunkRunner | None]

_compiler: TrunkCompiler | None = None


def use_trunk_compiler(compiler: TrunkCompiler | None) -> None:
    """Run frozen CNN trunks on the CPU through `compiler` from now on (None: PyTorch)."""
    global _compiler
    _compiler = compiler


def trunk_compiler() -> TrunkCompiler | None:
    return _compiler
