"""A frozen CNN trunk on ONNX Runtime (CPU): the trunk compiler of model/runtime.py that the daemon and the CLI use.

On this project's 2-core CPU, ONNX Runtime runs PatchCore's EfficientNet-Lite0 trunk about 2.2x faster than
PyTorch (8 against 18 ms per 256 px image; its depthwise kernels and fused activations), which makes a full-bank
0.3 MP frame ~0.8x the time (bench/bench_geometry.py --cnn). Everything after the taps (pooling, the
nearest-neighbour search, maps) stays in PyTorch.

The trunk is exported in memory with free batch, height and width (fit and tile inputs of any size run on one
session) and accepted only through a parity gate: on two probe inputs (square and not) every tap output must match
PyTorch's within `PARITY_TOLERANCE` of its largest magnitude; otherwise, or when ONNX Runtime is missing or the
export fails, the trunk stays on PyTorch and a warning says why. Sessions are shared by every extractor of the
same weights and taps (each source's detector has its own bank, not its own backbone) and are safe to run from
several threads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `choose` runs at every command's start: torch is imported only when a trunk is compiled
    import torch

log = logging.getLogger("anomalyd.cnn_runtime")

CHOICES = ("auto", "torch", "onnxruntime")
# Relative to each tap output's largest magnitude; ONNX Runtime measures ~1e-6 on Lite0 (fp32 summation order).
PARITY_TOLERANCE = 1e-4
_PROBE_SHAPES = ((2, 3, 256, 256), (1, 3, 192, 320))

_lock = threading.Lock()
_runners: dict[str, OnnxTrunk | None] = {}


class OnnxTrunk:
    """Runs one exported trunk: (B, 3, H, W) float32 CPU tensor → its tap outputs, in tap order."""

    def __init__(self, session: Any, output_names: Sequence[str], parity: float) -> None:
        self.session = session
        self.output_names = list(output_names)
        self.parity = parity
        self.failed: str | None = None  # why a run raised (its extractor went back to PyTorch): health shows it

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        import torch

        pixels = images.detach().contiguous().numpy()
        try:
            outputs = self.session.run(self.output_names, {"images": pixels})
        except Exception as exc:
            self.failed = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise
        return [torch.from_numpy(o) for o in outputs]


def _key(extractor: Any) -> str:
    digest = hashlib.sha256(repr((type(extractor.model).__name__, extractor.tap_names)).encode())
    for name, tensor in extractor.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _session(graph: torch.nn.Module, n_outputs: int, threads: int) -> tuple[Any, list[str]]:
    import onnxruntime as ort
    import torch

    names = [f"tap{i}" for i in range(n_outputs)]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on Python-level shape checks: shapes stay free here
        torch.onnx.export(graph, torch.zeros(_PROBE_SHAPES[0]), buffer, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=names, do_constant_folding=True,
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        **{n: {0: "batch", 2: "h", 3: "w"} for n in names}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # Idle ONNX Runtime threads would otherwise spin after each call and take the cores from the search that follows.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"]), names


def _build(extractor: Any) -> OnnxTrunk | None:
    import torch

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.info("CNN trunk on PyTorch: onnxruntime is not installed (pip install 'anomalyd[onnx]')")
        return None
    graph = extractor.graph()
    try:
        session, names = _session(graph, len(extractor.taps), torch.get_num_threads())
        runner = OnnxTrunk(session, names, parity=0.0)
        generator = torch.Generator().manual_seed(0)
        worst = 0.0
        for shape in _PROBE_SHAPES:
            probe = torch.randn(shape, generator=generator)
            with torch.inference_mode():
                expected = graph(probe)
            for want, got in zip(expected, runner(probe), strict=True):
                if want.shape != got.shape:
                    raise ValueError(f"tap shape {tuple(got.shape)} instead of {tuple(want.shape)}")
                scale = float(want.abs().max()) or 1.0
                worst = max(worst, float((want.float() - got).abs().max()) / scale)
    except Exception as exc:  # any failure keeps PyTorch, which is always correct
        log.warning("CNN trunk stays on PyTorch: the ONNX Runtime export failed (%s)", exc)
        return None
    if not worst <= PARITY_TOLERANCE:
        log.warning("CNN trunk stays on PyTorch: ONNX Runtime differs by %.2g of the largest value (gate %.0e)",
                    worst, PARITY_TOLERANCE)
        return None
    runner.parity = worst
    log.info("CNN trunk %s on ONNX Runtime (%d threads; parity %.1e, gate %.0e)", "+".join(extractor.tap_names),
             torch.get_num_threads(), worst, PARITY_TOLERANCE)
    return runner


def onnxruntime_trunk(extractor: Any) -> OnnxTrunk | None:
    """The trunk compiler: `extractor`'s runner on ONNX Runtime, or None (PyTorch) when it fails its gate."""
    key = _key(extractor)
    with _lock:
        if key not in _runners:
            _runners[key] = _build(extractor)
        return _runners[key]


def in_effect() -> str:
    """What runs the CNN trunks of this process, for health: "torch", "onnxruntime", "onnxruntime (not compiled
    yet)" or "torch (ONNX Runtime refused: ...)" when a trunk failed its export or gate."""
    from model.runtime import trunk_compiler

    if trunk_compiler() is not onnxruntime_trunk:
        return "torch"
    with _lock:
        runners = list(_runners.values())
    if not runners:
        return "onnxruntime (not compiled yet)"
    if any(runner is None for runner in runners):
        return "torch (ONNX Runtime refused a trunk: export or parity gate failed, see the log)"
    failed = next((runner.failed for runner in runners if runner.failed), None)
    if failed:
        return f"torch (ONNX Runtime failed at run time: {failed})"
    return "onnxruntime"


def choose(name: str) -> str:
    """Make `name` ("auto", "torch", "onnxruntime") the process's CPU runtime for CNN trunks; returns the one in
    effect. "auto" is ONNX Runtime when it is installed, else PyTorch; "onnxruntime" without it is an error."""
    from model.runtime import use_trunk_compiler

    if name not in CHOICES:
        raise ValueError(f"cnn runtime {name!r}: expected one of {', '.join(CHOICES)}")
    if name != "torch" and importlib.util.find_spec("onnxruntime") is None:  # found, not imported: start stays fast
        if name == "onnxruntime":
            raise ValueError("cnn runtime 'onnxruntime' needs onnxruntime: pip install 'anomalyd[onnx]'")
        name = "torch"
    use_trunk_compiler(onnxruntime_trunk if name != "torch" else None)
    return "onnxruntime" if name != "torch" else "torch"
