"""Exports on disk and the inference engines that run them: ONNX (ONNX Runtime) and OpenVINO IR (OpenVINO).

An export folder holds the graph (`model.onnx`, or `model.xml` + `model.bin`), the per-class inputs shipped beside
it (`classes.npz`, see `model.export`) and `manifest.json`: model, version, backbone, taps, image size,
normalisation, threshold scale, input/output names, opset, the parity tolerances and what the gate measured, the
SHA-256 of every file of the export and of the source weights, and the anomalyd version that wrote it.

`export_detector` writes an export and accepts it only through the parity gate: the engine must reproduce the
PyTorch detector on check inputs (synthetic images, plus the caller's) within the model's tolerances, else
`ExportError` names each difference and nothing is left at the output. `load_export` refuses an export of another
format or anomalyd version, an unsupported opset or engine, a file whose digest changed, or a wrong image size or
version; `ExportedDetector` runs it behind the same Detector protocol as the PyTorch models.

The engines are optional extras (`pip install 'anomalyd[onnx]'` / `'anomalyd[openvino]'`); a missing one is a clear
error, not an ImportError deep in a thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.detector import Prediction
from model.export import AuxInput, ExportError, ExportGraph, export_graph

log = logging.getLogger(__name__)

FORMAT = "anomalyd-export/1"
MANIFEST = "manifest.json"
CLASSES_FILE = "classes.npz"
FORMATS = {"onnx": "onnxruntime", "openvino": "openvino"}  # export format → the engine its gate runs
ENGINES = ("onnxruntime", "openvino")
# The TorchScript-based exporter: scaled_dot_product_attention needs opset 14; 20 is its newest.
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 14, 20, 17
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}


def anomalyd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anomalyd")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_digests(sources: Mapping[str, Any]) -> dict[str, str]:
    """SHA-256 of each source weights file (backbone, prompts, ...); names that are not files (an open_clip model
    name) are recorded as given."""
    out: dict[str, str] = {}
    for key, value in sources.items():
        if value is None:
            continue
        path = Path(str(value))
        out[key] = f"sha256:{sha256_file(path)}" if path.is_file() else f"name:{value}"
    return out


def require_engine(engine: str) -> Any:
    """The engine's Python module, or ExportError saying which extra to install."""
    if engine not in ENGINES:
        raise ExportError(f"engine {engine!r} is not supported: expected one of torch, {', '.join(ENGINES)}")
    try:
        if engine == "onnxruntime":
            import onnxruntime

            return onnxruntime
        import openvino

        return openvino
    except ImportError as exc:
        raise ExportError(
            f"engine {engine} is not installed ({exc}): pip install 'anomalyd[{EXTRAS[engine]}]'"
        ) from exc


# ------------------------------------------------------------------------------------------------ runners
class _OnnxRuntimeRunner:
    def __init__(self, graph_file: Path, threads: int | None) -> None:
        ort = require_engine("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(graph_file), sess_options=options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(["scores", "maps"], feeds)


class _OpenVinoRunner:
    def __init__(self, graph_file: Path, threads: int | None) -> None:
        ov = require_engine("openvino")
        core = ov.Core()
        # f32 inference: OpenVINO would otherwise pick bf16 on CPUs that have it, and miss the parity tolerances.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(graph_file)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output("scores"), self.compiled.output("maps")]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        return [np.array(results[output]) for output in self.outputs]


def _runner(engine: str, graph_file: Path, threads: int | None) -> Callable[[dict[str, np.ndarray]], list]:
    if engine == "onnxruntime":
        return _OnnxRuntimeRunner(graph_file, threads)
    return _OpenVinoRunner(graph_file, threads)


# ------------------------------------------------------------------------------------------------ detector
class ExportedDetector:
    """An export run by ONNX Runtime or OpenVINO behind the Detector protocol (CPU, float32, any batch size)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], engine: str, *, threads: int | None = None) -> None:
        self.folder = folder
        self.manifest = manifest
        self.engine = engine
        self.name = str(manifest["model"])
        self.version = str(manifest["version"])
        self.image_size = int(manifest["image_size"])
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.class_name = manifest.get("default_class")
        # The tapped blocks: the daemon's score scale divides AnomalyCLIP's summed maps by their number.
        self.layers = tuple(manifest.get("taps") or ())
        self.aux_name = manifest["input_names"][1] if len(manifest["input_names"]) > 1 else None
        self.per_class: dict[str, np.ndarray] = {}
        if self.aux_name is not None:
            with np.load(folder / CLASSES_FILE) as table:
                self.per_class = {key: table[key] for key in table.files}
        self._run = _runner(engine, folder / manifest["files"]["graph"], threads)

    @property
    def class_row(self) -> Callable[[str, Mapping[str, Any]], Any] | None:
        """The family's `export_class_row` (None: only the exported classes run, or no such family here)."""
        if self.aux_name is None:
            return None
        from model.factory import get_family

        try:
            return get_family(self.name).export_class_row
        except ValueError:
            return None

    def _aux_rows(self, class_names: Sequence[str]) -> np.ndarray:
        rows = []
        for name in class_names:
            if name not in self.per_class and self.class_row is not None:
                # The family makes the input of a class the export does not hold (AdaCLIP: token ids).
                self.per_class[name] = np.asarray(self.class_row(name, self.manifest.get("details") or {}))
            if name not in self.per_class:
                raise ExportError(
                    f"class name {name!r} is not in this export (it holds {sorted(self.per_class)}): export again "
                    "with it in --class-names"
                )
            rows.append(self.per_class[name])
        return np.stack(rows)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> Prediction:
        size = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images have shape {tuple(images.shape)}, the export expects (B, 3, {size}, {size})")
        feeds = {"images": np.ascontiguousarray(images.detach().float().cpu().numpy())}
        if self.aux_name is not None:
            if isinstance(class_names, str):
                raise ValueError("class_names must be a list with one name per image, not a single string")
            names = [n or self.class_name or "object" for n in (class_names or [None] * images.shape[0])]
            if len(names) != images.shape[0]:
                raise ValueError(f"{len(names)} class names for a batch of {images.shape[0]} images")
            feeds[self.aux_name] = self._aux_rows(names)
        scores, maps = self._run(feeds)
        return Prediction(scores=torch.from_numpy(np.asarray(scores, np.float32)),
                          maps=torch.from_numpy(np.asarray(maps, np.float32)))


# ------------------------------------------------------------------------------------------------ loading
def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{folder}: not an anomalyd export (no {MANIFEST}); make one with `anomalyd export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: the manifest is not a JSON object")
    return manifest


def check_manifest(folder: str | Path, manifest: Mapping[str, Any], engine: str | None = None, *,
                   image_size: int | None = None, version: str | None = None,
                   sources: Mapping[str, Any] | None = None) -> str:
    """Raise ExportError for anything that makes the export unusable here; returns the engine to run it with."""
    where = str(folder)
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{where}: export format {manifest.get('format')!r}, this anomalyd reads {FORMAT!r}: "
                          "export the model again")
    made_by, running = manifest.get("anomalyd_version"), anomalyd_version()
    if made_by != running:
        raise ExportError(f"{where}: exported by anomalyd {made_by}, this is anomalyd {running}: export the model "
                          "again with this version")
    opset = manifest.get("opset")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"{where}: opset {opset!r} is not supported (supported: {MIN_OPSET}..{MAX_OPSET})")
    kind = manifest.get("export_format")
    if kind not in FORMATS:
        raise ExportError(f"{where}: unknown export format {kind!r} (expected {', '.join(FORMATS)})")
    engine = engine or FORMATS[kind]
    if engine not in ENGINES:
        raise ExportError(f"engine {engine!r} is not supported: expected one of torch, {', '.join(ENGINES)}")
    if engine == "onnxruntime" and kind != "onnx":
        raise ExportError(f"{where}: an OpenVINO IR export cannot run on onnxruntime: export with --format onnx, "
                          "or use the openvino engine")
    for name, digest in dict(manifest.get("file_digests") or {}).items():
        file = Path(folder) / name
        if not file.is_file():
            raise ExportError(f"{where}: file {name} of the export is missing")
        if sha256_file(file) != digest:
            raise ExportError(f"{where}: digest mismatch for {name}: the export is corrupted or was changed "
                              "after the parity check; export again")
    if "graph" not in dict(manifest.get("files") or {}):
        raise ExportError(f"{where}: the manifest names no graph file")
    if image_size is not None and int(manifest.get("image_size", -1)) != int(image_size):
        raise ExportError(f"{where}: the export takes {manifest.get('image_size')} px images, but "
                          f"{image_size} px were asked for: export again with --image-size {image_size}")
    if version is not None and str(manifest.get("version")) != str(version):
        raise ExportError(f"{where}: the export is model version {manifest.get('version')!r}, not {version!r}")
    if sources is not None:
        recorded = dict(manifest.get("source_digests") or {})
        changed = [k for k, v in source_digests(sources).items() if recorded.get(k) != v]
        if changed:
            raise ExportError(f"{where}: source weights changed since the export ({', '.join(changed)} digest "
                              "mismatch): export again")
    return engine


def load_export(folder: str | Path, engine: str | None = None, *, image_size: int | None = None,
                version: str | None = None, sources: Mapping[str, Any] | None = None,
                threads: int | None = None) -> ExportedDetector:
    """The export in `folder` as a detector on `engine` (default: the one its format was checked with)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    engine = check_manifest(folder, manifest, engine, image_size=image_size, version=version, sources=sources)
    require_engine(engine)
    try:
        return ExportedDetector(folder, manifest, engine, threads=threads)
    except ExportError:
        raise
    except Exception as exc:  # the engine could not read the graph
        raise ExportError(f"{folder}: engine {engine} cannot load the export: {exc}") from exc


# ------------------------------------------------------------------------------------------------ exporting
def check_inputs(image_size: int, files: Sequence[str | Path] = (), seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """The parity gate's inputs: four synthetic images (noise, a smooth gradient with a bright square, flat
    grey, strong noise), already normalised, plus `files` through the daemon's preprocessing."""
    from model.preprocess import decode_image, fast_transform

    generator = torch.Generator().manual_seed(seed)
    size = image_size
    ramp = torch.linspace(-1.5, 1.5, size)
    gradient = (ramp[None, :, None] + ramp[None, None, :]).expand(3, size, size).clone()
    gradient[:, size // 3 : size // 2, size // 3 : size // 2] = 2.0
    images = [torch.randn(3, size, size, generator=generator), gradient, torch.zeros(3, size, size),
              2.0 * torch.randn(3, size, size, generator=generator)]
    names = ["noise", "gradient-square", "flat", "strong-noise"]
    for file in files:
        try:
            images.append(fast_transform(decode_image(file), size))
        except ValueError as exc:
            raise ExportError(f"--check-images {file}: {exc}") from exc
        names.append(Path(file).name)
    return names, torch.stack(images)


def parity_report(reference: Prediction, candidate: Prediction, names: Sequence[str],
                  tolerance: Mapping[str, float]) -> tuple[dict[str, float], list[str]]:
    """Max absolute differences per output and the list of what exceeds the tolerance (per image)."""
    measured: dict[str, float] = {}
    problems: list[str] = []
    for key in ("scores", "maps"):
        expected = getattr(reference, key).detach().float().cpu()
        found = getattr(candidate, key).detach().float().cpu()
        if expected.shape != found.shape:
            problems.append(f"{key}: shape {tuple(found.shape)} instead of {tuple(expected.shape)}")
            measured[key] = float("inf")
            continue
        diff = (expected - found).abs().reshape(expected.shape[0], -1)
        diff = torch.where(torch.isfinite(found.reshape(diff.shape)), diff, torch.full_like(diff, float("inf")))
        per_image = diff.amax(dim=1)
        measured[key] = float(per_image.max())
        for index, value in enumerate(per_image.tolist()):
            if not value <= tolerance[key]:
                problems.append(f"{key} of {names[index]!r} differ by {value:.3g} (tolerance {tolerance[key]:.3g})")
    return measured, problems


def _write_graph(graph: ExportGraph, folder: Path, export_format: str, opset: int, example: tuple) -> str:
    onnx_file = folder / "model.onnx"
    dynamic = {name: {0: "batch"} for name in [*graph.input_names, *graph.output_names]}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings about Python-level shape checks: the input size is fixed per export by design.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(graph.module, example, str(onnx_file), dynamo=False, opset_version=opset,
                              input_names=graph.input_names, output_names=list(graph.output_names),
                              dynamic_axes=dynamic, do_constant_folding=True)
    except Exception as exc:
        raise ExportError(f"model {graph.model}: the ONNX exporter failed at opset {opset}: {exc}") from exc
    if export_format == "onnx":
        return onnx_file.name
    ov = require_engine("openvino")
    xml = folder / "model.xml"
    # Weights stay float32 (save_model would halve them to float16 by default and break parity).
    ov.save_model(ov.convert_model(str(onnx_file)), str(xml), compress_to_fp16=False)
    onnx_file.unlink()
    return xml.name


def export_detector(
    detector: Any,
    output: str | Path,
    *,
    export_format: str = "onnx",
    opset: int = DEFAULT_OPSET,
    class_names: Sequence[str] | None = None,
    check_images: Sequence[str | Path] = (),
    sources: Mapping[str, Any] | None = None,
    engine: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Export `detector` into the folder `output` (replaced if it holds an earlier export) and return the
    manifest. Raises ExportError when the model cannot be exported or the parity gate fails."""
    if export_format not in FORMATS:
        raise ExportError(f"export format {export_format!r} is not supported: expected one of {', '.join(FORMATS)}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset!r} is not supported: expected {MIN_OPSET}..{MAX_OPSET} (attention needs "
                          f"{MIN_OPSET}; {MAX_OPSET} is the newest the exporter writes)")
    engine = engine or FORMATS[export_format]
    require_engine(engine)
    if engine == "onnxruntime" and export_format != "onnx":
        raise ExportError("the onnxruntime engine runs ONNX exports: use --format onnx")
    output = Path(output)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST).is_file())):
        raise ExportError(f"{output} exists and is not an earlier export: choose an empty or new folder")
    started = time.monotonic()
    graph = export_graph(detector, class_names)
    names, images = check_inputs(graph.image_size, check_images)
    aux_classes = sorted(graph.aux.per_class) if graph.aux is not None else []
    # Every exported class is checked: the images cycle through them.
    image_classes = [aux_classes[i % len(aux_classes)] for i in range(len(names))] if aux_classes else None
    with torch.no_grad():
        reference = detector.predict(images, image_classes)
    staging = output.with_name(f".{output.name}.tmp-{time.time_ns()}")
    staging.mkdir(parents=True)
    try:
        graph_file = _write_graph(graph, staging, export_format, opset, graph.example_inputs(images[:2],
                                  image_classes[:2] if image_classes else None))
        files = {"graph": graph_file}
        if graph.aux is not None:
            np.savez(staging / CLASSES_FILE, **{k: v.numpy() for k, v in graph.aux.per_class.items()})
            files["classes"] = CLASSES_FILE
        manifest = _manifest(graph, export_format, opset, files, staging, sources or {})
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        candidate = ExportedDetector(staging, manifest, engine, threads=threads)
        # Batch of all check images, and the first alone: the batch axis must be dynamic for real.
        result = candidate.predict(images, image_classes)
        single = candidate.predict(images[:1], image_classes[:1] if image_classes else None)
        measured, problems = parity_report(reference, result, names, graph.tolerance)
        single_measured, single_problems = parity_report(
            Prediction(reference.scores[:1], reference.maps[:1]), single, names[:1], graph.tolerance)
        problems += [f"batch of 1: {p}" for p in single_problems]
        if problems:
            raise ExportError(f"model {graph.model} {graph.version}: the {engine} export does not reproduce "
                              f"PyTorch: " + "; ".join(problems))
        manifest["parity"] = {
            "engine": engine, "images": names, "classes": image_classes,
            "max_abs_diff": {k: max(measured[k], single_measured[k]) for k in measured},
            "tolerance": graph.tolerance, "batch_sizes": [len(names), 1],
        }
        manifest["export_seconds"] = round(time.monotonic() - started, 1)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s %s to %s (%s, opset %d); parity max diff %s", graph.model, graph.version, output,
             export_format, opset, manifest["parity"]["max_abs_diff"])
    return manifest


def _manifest(graph: ExportGraph, export_format: str, opset: int, files: dict[str, str], folder: Path,
              sources: Mapping[str, Any]) -> dict[str, Any]:
    size = graph.image_size
    inputs = [{"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32"}]
    if graph.aux is not None:
        aux: AuxInput = graph.aux
        row = next(iter(aux.per_class.values()))
        inputs.append({"name": aux.name, "shape": ["batch", *row.shape], "dtype": str(row.dtype).replace("torch.", "")})
    return {
        "format": FORMAT,
        "anomalyd_version": anomalyd_version(),
        "model": graph.model,
        "version": graph.version,
        "backbone": graph.backbone,
        "taps": graph.taps,
        "image_size": size,
        "normalisation": graph.normalisation,
        "threshold_scale": {**graph.threshold_scale,
                            "note": "the PyTorch detector's scale: thresholds calibrated on either apply to both"},
        "export_format": export_format,
        "opset": opset,
        "input_names": graph.input_names,
        "output_names": list(graph.output_names),
        "inputs": inputs,
        "outputs": [{"name": "scores", "shape": ["batch"], "dtype": "float32"},
                    {"name": "maps", "shape": ["batch", size, size], "dtype": "float32"}],
        "classes": sorted(graph.aux.per_class) if graph.aux is not None else [],
        "default_class": graph.aux.default_class if graph.aux is not None else None,
        "files": files,
        "file_digests": {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()},
        "source_digests": source_digests(sources),
        "tolerance": graph.tolerance,
        "details": graph.details,
        "torch_version": torch.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
