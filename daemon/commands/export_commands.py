"""`anomalyd export`, and the engine-backed detectors of `predict --engine` / `eval --engine`."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.cli import UsageError

log = logging.getLogger("anomalyd")

ENGINE_CHOICES = ("torch", "onnxruntime", "openvino")
FORMAT_FOR_ENGINE = {"onnxruntime": "onnx", "openvino": "openvino"}


def split_names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def export_sources(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The source weights an export is made from (their digests go into the manifest)."""
    from daemon.commands.model_commands import model_options

    options = model_options(args, name)
    # families with their own backbone (PatchCore) have no backbone_config / prompts, but weights
    return {key: options.get(key) for key in ("backbone", "backbone_config", "prompts", "weights", "references")}


def _torch_detector(args: argparse.Namespace, name: str) -> Any:
    from daemon.commands.model_commands import model_options
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
    export_detector(_torch_detector(args, name), folder, export_format=FORMAT_FOR_ENGINE[engine],
                    class_names=names, sources=export_sources(args, name), engine=engine)
    return load_export(folder, engine)


def cmd_export(args: argparse.Namespace) -> int:
    from adapters.export import export_detector

    if args.engine is not None and args.engine not in FORMAT_FOR_ENGINE:
        raise UsageError(f"--engine {args.engine}: the parity gate runs on onnxruntime or openvino")
    detector = _torch_detector(args, args.model)
    class_names = split_names(args.class_names) or ([args.class_name] if args.class_name else None)
    manifest = export_detector(detector, args.output, export_format=args.format, opset=args.opset,
                               class_names=class_names, check_images=args.check_images or (),
                               sources=export_sources(args, args.model), engine=args.engine)
    parity = manifest["parity"]
    summary = {"output": str(args.output), "model": manifest["model"], "version": manifest["version"],
               "format": manifest["export_format"], "engine": parity["engine"], "opset": manifest["opset"],
               "max_abs_diff": parity["max_abs_diff"], "tolerance": parity["tolerance"]}
    print(json.dumps(summary) if args.json else
          f"exported {manifest['model']} {manifest['version']} ({manifest['export_format']}, opset "
          f"{manifest['opset']}) to {args.output}; parity on {parity['engine']}: max |diff| scores "
          f"{parity['max_abs_diff']['scores']:.2g}, maps {parity['max_abs_diff']['maps']:.2g}")
    return 0


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """`--engine` and `--export` for predict and eval."""
    group = parser.add_argument_group("engine")
    group.add_argument("--engine", default="torch", choices=ENGINE_CHOICES,
                       help="inference engine (default %(default)s); onnxruntime/openvino export the model first "
                       "(through the parity gate) unless --export names an export folder")
    group.add_argument("--export", type=Path, metavar="DIR", help="an export folder made by `anomalyd export`")


def register(subparsers: argparse._SubParsersAction) -> None:
    from daemon.commands.model_commands import add_model_options

    export = subparsers.add_parser("export", help="export a model to ONNX or OpenVINO IR, checked against PyTorch")
    export.add_argument("--output", required=True, type=Path, help="export folder (graph, classes, manifest.json)")
    export.add_argument("--format", default="onnx", choices=("onnx", "openvino"))
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (14..20, default %(default)s)")
    export.add_argument("--engine", choices=FORMAT_FOR_ENGINE,
                        help="engine of the parity gate (default: onnxruntime for onnx, openvino for openvino)")
    export.add_argument("--check-images", nargs="+", metavar="IMAGE",
                        help="images the parity gate checks too (besides its synthetic ones)")
    export.add_argument("--class-names", help="comma-separated classes the export serves (class-aware models; "
                        "default --class-name, else 'object')")
    export.add_argument("--json", action="store_true", help="print a JSON summary")
    add_model_options(export)
    export.set_defaults(func=cmd_export)
