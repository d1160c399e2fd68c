"""`anomalyd export`, and the engine-backed detectors of `predict --engine` / `eval --engine`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from daemon.cli import UsageError
from daemon.commands.model_options import FORMAT_FOR_ENGINE, export_sources, split_names, torch_detector

log = logging.getLogger("anomalyd")


def cmd_export(args: argparse.Namespace) -> int:
    from adapters.export import export_detector

    if args.engine is not None and args.engine not in FORMAT_FOR_ENGINE:
        raise UsageError(f"--engine {args.engine}: the parity gate runs on onnxruntime or openvino")
    detector = torch_detector(args, args.model)
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


def register(subparsers: argparse._SubParsersAction) -> None:
    from daemon.commands.model_options import add_model_options

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
