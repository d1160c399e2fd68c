"""What the model commands (`predict`, `train`, `eval`, `export`) share: the model options on the command line,
the detector they describe (in PyTorch or on an export engine), and image inputs.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.cli import UsageError
from daemon.commands.geometry_options import add_geometry_options, geometry_option
from model.factory import models_that
from model.geometry import DEFAULT_RESIZE
from model.options import OptionsError, OptionSpec, option_specs

log = logging.getLogger("anomalyd")


class _RegisteredModels:
    """The --model choices, read from the model-family registry when first needed (so the CLI starts without
    importing torch, and a family registered at run time is a valid choice)."""

    def _names(self) -> list[str]:
        from model.factory import list_models

        return list_models()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


MODEL_NAMES = _RegisteredModels()


# The CLIP models' CLI defaults; a family with its own backbones (`Capabilities.clip_backbone=False`) takes its
# own defaults unless these are changed.
CLIP_CLI_DEFAULTS = {"backbone": "ViT-L-14-336", "layers": (24,), "image_size": 518}


def parse_layers(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in str(text).replace(" ", "").split(",") if part)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: expected comma-separated block numbers, e.g. 6,12,18,24") from exc
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one block number")
    return layers


def add_model_options(parser: argparse.ArgumentParser, *, several_models: bool = False) -> None:
    group = parser.add_argument_group("model")
    if several_models:
        group.add_argument("--model", dest="models", action="append", choices=MODEL_NAMES,
                           help="model to evaluate; repeat to compare several side by side (default anomalyclip)")
    else:
        group.add_argument("--model", default="anomalyclip", choices=MODEL_NAMES, help="detector (default %(default)s)")
    group.add_argument("--backbone", default="ViT-L-14-336",
                       help="open_clip model name, or a file with an OpenAI-layout CLIP state dict (default %(default)s)")
    group.add_argument("--backbone-config", type=Path, help="open_clip model config JSON for a local backbone file")
    group.add_argument("--pretrained", default="openai", help="open_clip pretrained tag for a named backbone")
    group.add_argument("--prompts", action="append",
                       help="learned weights: official .pth, anomalyd .safetensors, or a released name "
                       "(anomalyclip-visa, anomalyclip-mvtec) fetched with `anomalyd weights fetch`; with several "
                       "--model, give MODEL=FILE once per model")
    group.add_argument("--layers", type=parse_layers, default=(24,), help="vision blocks to tap, e.g. 6,12,18,24")
    group.add_argument("--image-size", type=int, default=518, help="model input side in pixels (default 518)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group.add_argument("--class-name", help="object class, for the models whose text prompts name it")
    group.add_argument("--references", help="few-shot known-good images (a folder or comma-separated files)")
    group.add_argument("--reference-preprocessing", action="store_true",
                       help="the official PIL preprocessing (parity path) instead of the faster OpenCV one")
    add_family_flags(group)
    add_geometry_options(parser)


def family_flags() -> dict[str, tuple[OptionSpec, list[str]]]:
    """Each flag the registered families declare for their own options (model/options.py), once: its option and
    the models that take it (a flag two families declare must name the same option, of the same type)."""
    from model.factory import list_models, options_of

    flags: dict[str, tuple[OptionSpec, list[str]]] = {}
    for name in list_models():
        for spec in option_specs(options_of(name)):
            if spec.flag is None:
                continue
            first, models = flags.setdefault(spec.flag, (spec, []))
            if (first.name, first.kind, first.choices) != (spec.name, spec.kind, spec.choices):
                raise TypeError(f"{spec.flag}: models {models[0]} and {name} declare it as different options")
            models.append(name)
    return flags


def add_family_flags(group: argparse._ArgumentGroup) -> None:
    """The families' own flags, their help prefixed by the models that take them. Not given: None (the family's
    default holds)."""
    for flag, (spec, models) in family_flags().items():
        default = "" if spec.default in (None, False) else f" (default {spec.default})"
        kwargs: dict[str, Any] = {"dest": spec.name, "default": None,
                                  "help": f"{', '.join(models)}: {spec.help}{default}".replace("%", "%%")}
        if spec.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.choices is not None:
            kwargs["choices"] = spec.choices
        elif spec.kind in (int, float):
            kwargs["type"] = spec.kind
        group.add_argument(flag, **kwargs)


def family_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The own options of model `name` given by their flags. A given flag that neither `name` nor another model of
    the command (eval's repeated --model) takes is a UsageError."""
    from model.factory import options_of

    selected = {name, *(getattr(args, "models", None) or ())}
    own = {spec.name for spec in option_specs(options_of(name))}
    options: dict[str, Any] = {}
    for flag, (spec, models) in family_flags().items():
        value = getattr(args, spec.name, None)
        if value is None:
            continue
        if not selected & set(models):
            raise UsageError(f"{flag}: model {' / '.join(sorted(selected))} does not take it (an option of "
                             f"{', '.join(models)})")
        if spec.name in own:
            try:
                options[spec.name] = spec.check(name, value)
            except OptionsError as exc:
                raise UsageError(f"{flag}: {exc}") from None
    return options


def prompts_for(values: Sequence[str] | None, name: str) -> str | None:
    """The --prompts value meant for model `name`: a MODEL=FILE entry for it, else a plain FILE entry."""
    plain = None
    for value in values or ():
        model, sep, path = value.partition("=")
        if sep and model in MODEL_NAMES:
            if model == name:
                return path
        elif plain is None:
            plain = value
    return plain


def own_backbone_options(args: argparse.Namespace) -> dict[str, Any]:
    """Common options of a family with its own backbones (`Capabilities.clip_backbone=False`): the CLIP defaults of
    --backbone/--layers/--image-size mean "the family's default"."""
    explicit = {key: getattr(args, key) for key, default in CLIP_CLI_DEFAULTS.items() if getattr(args, key) != default}
    return {
        "backbone": explicit.get("backbone"),
        "layers": explicit.get("layers"),  # the taps, unless the family's own flag (e.g. --taps) sets them
        "image_size": explicit.get("image_size"),
        "device": args.device,
        "dtype": args.dtype,
        "references": args.references.split(",") if args.references and "," in args.references else args.references,
        # without --resize: the measured default of the frame geometry on torch (model/geometry.py), as the daemon
        # uses for a family that supports it (daemon/config/geometry.py: default_resize)
        "geometry": geometry_option(args, "squash" if getattr(args, "engine", "torch") != "torch"
                                    else DEFAULT_RESIZE),
    }


def model_options(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from adapters.weights import resolve_prompts
    from model.factory import get_family

    caps = get_family(name).caps
    if not caps.clip_backbone:
        return {**own_backbone_options(args), **family_options(args, name)}
    if not geometry_option(args).plain:
        able = " or ".join(f"--model {m}" for m in models_that(lambda c: c.supports_geometry))
        raise UsageError(f"--resize/--roi/--ignore-polygon: model {name} takes whole images squashed; the frame "
                         f"geometry needs {able}")
    if args.image_size <= 0 or args.image_size % 14:
        raise UsageError(f"--image-size {args.image_size}: expected a positive multiple of the patch size 14")
    return {
        "backbone": _cached_backbone(args.backbone, args.pretrained, name),
        "backbone_config": args.backbone_config,
        "pretrained": args.pretrained,
        "prompts": resolve_prompts(prompts_for(args.prompts, name)),
        "layers": args.layers,
        "image_size": args.image_size,
        "device": args.device,
        "dtype": args.dtype,
        "class_name": args.class_name,
        "references": args.references,
        **family_options(args, name),
    }


def _cached_backbone(backbone: str, pretrained: str | None, model: str) -> str:
    """A named OpenAI CLIP backbone already in the weights cache → that file (no network); else the value as given
    (open_clip downloads a named one on first use)."""
    from adapters.weights import BACKBONE_TAG, WeightsError, backbone_weights, is_named_backbone
    from model.factory import get_family

    if pretrained != BACKBONE_TAG or not get_family(model).caps.clip_backbone or not is_named_backbone(backbone):
        return backbone
    try:
        found = backbone_weights(backbone, pretrained).found()
    except WeightsError:
        return backbone
    return str(found) if found is not None else backbone


def build_detector(args: argparse.Namespace, name: str | None = None, class_names: Sequence[str] | None = None):
    from model import create_detector

    name = name or args.model
    if getattr(args, "engine", "torch") != "torch" or getattr(args, "export", None):

        return engine_detector_for(args, name, class_names)
    return create_detector(name, **model_options(args, name))


def image_files(inputs: Sequence[str]) -> list[Path]:
    from model.datasets import is_image_file, is_mask_file

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            masks = [p for p in found if is_mask_file(p)]
            if masks:  # pixel labels of a dataset layout (KolektorSDD *_label.bmp, ground_truth/...): not inputs
                log.info("%s: skipped %d mask file(s) of a known dataset layout, e.g. %s", path, len(masks), masks[0])
                skip = set(masks)
                found = [p for p in found if p not in skip]
            if not found:
                log.warning("%s: no image files found", path)
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or directory")
    if not files:
        raise UsageError("no input images")
    return files


def overlay_scale(args: argparse.Namespace) -> dict[str, float | None]:
    """The overlay colour scale: the daemon's fixed 0..1 (a clean part stays blue) or each map's own min..max."""
    if getattr(args, "overlay_scale", "fixed") == "per-image":
        return {"vmin": None, "vmax": None}
    return {"vmin": 0.0, "vmax": 1.0}


def load_input(path: Path, size: int, reference: bool):
    """(model input tensor, original size (H, W), RGB array or None)."""
    from model.preprocess import decode_image, fast_transform, open_pil, reference_transform

    if reference:
        image = open_pil(path)
        return reference_transform(image, size), (image.height, image.width), None
    rgb = decode_image(path)
    return fast_transform(rgb, size), rgb.shape[:2], rgb


ENGINE_CHOICES = ("torch", "onnxruntime", "openvino")


FORMAT_FOR_ENGINE = {"onnxruntime": "onnx", "openvino": "openvino"}


def split_names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def export_sources(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The source weights an export is made from (their digests go into the manifest): the common ones and the
    family's own weights files (`source=True` in its options, e.g. a CNN backbone's `weights`)."""
    from model.factory import options_of

    options = model_options(args, name)
    own = tuple(spec.name for spec in option_specs(options_of(name)) if spec.source)
    return {key: options.get(key) for key in ("backbone", "backbone_config", "prompts", *own, "references")}


def torch_detector(args: argparse.Namespace, name: str) -> Any:
    from model import create_detector

    options = model_options(args, name)
    if options["dtype"] != "float32":
        raise UsageError(f"--dtype {options['dtype']}: exports are float32 (the parity gate compares float32)")
    options["device"] = "cpu"  # traced on the CPU; the engines run where they run
    return create_detector(name, **options)


def engine_detector_for(args: argparse.Namespace, name: str, class_names: Sequence[str] | None = None) -> Any:
    """`--export DIR`: that export on `--engine`; else the model from the usual flags, exported into a temporary
    folder through the parity gate, on `--engine`."""
    from adapters.export import export_detector, load_export

    engine = None if args.engine == "torch" else args.engine
    if args.export:
        sources = export_sources(args, name) if args.prompts else None
        return load_export(args.export, engine, sources=sources)
    names = sorted({*(class_names or ()), *([args.class_name] if args.class_name else [])}) or None
    folder = Path(tempfile.mkdtemp(prefix="anomalyd-export-")) / name
    log.info("exporting %s for the %s engine into %s", name, engine, folder)
    export_detector(torch_detector(args, name), folder, export_format=FORMAT_FOR_ENGINE[engine],
                    class_names=names, sources=export_sources(args, name), engine=engine)
    return load_export(folder, engine)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """`--engine` and `--export` for predict and eval."""
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", default="torch", choices=ENGINE_CHOICES,
                       help="inference engine (default %(default)s); onnxruntime/openvino export the model first "
                       "(through the parity gate) unless --export names an export folder")
    group.add_argument("--export", type=Path, metavar="DIR", help="an export folder made by `anomalyd export`")
