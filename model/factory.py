"""The model-family registry and the one way to build a detector: `create_detector(name, ...)`.

Each family (anomalyclip, adaclip, the clip/clip-ac/winclip baselines, ...) lives in its own module or subpackage
and registers a `ModelFamily` here that declares everything the rest of anomalyd asks of it, so training,
retraining, the CLI and the config never switch on a model name:

- `create`: the builder, `create(device=, dtype=, **options) -> Detector` (it takes the common options it uses
  and ignores the others, so it must accept `**_`);
- `options`: its own options, a frozen dataclass (model/options.py: each with its type, default, one line of help
  and the CLI flag that sets it): `create_detector` refuses an option neither common nor declared, the CLI adds
  the flags, and `[model]` takes the keys, without either naming the family;
- `checkpoint`: its weights file format (`load`, `save`, and `import_weights` for the version registry);
- `training`: whether and how it trains (`TrainingSpec`: fresh/loaded module, training target with optimiser and
  loss, the official optimiser defaults);
- `exporter`: its export graph (`exporter(detector, class_names) -> model.export.ExportGraph`; None: it cannot be
  exported);
- `capabilities`: what it can do (`Capabilities`: needs / takes references, frame geometry, score scale, class
  name, backbone kind, which family its labels retrain, its threshold floor); the daemon asks these and never
  compares a family's name;
- `known_good`: for a family that scores against references, the known-good scores its calibration reads
  (`known_good(detector, files, limit) -> model.known_good.KnownGoodScores`: held-out references and their
  calibration views, each against a bank of the others; e.g. model/patchcore/known_good.py);
- `export_class_row`: the per-class graph input of a class an export does not hold (AdaCLIP's token ids);
- `promotion_metrics` (and `LabelLearning.promotion_metrics`): what a retraining run measures the candidate and
  the active model on (defaults: model/promotion.py); the daemon's gate only decides on those numbers;
- `released_weights`: the learned weights its authors published (name, URL, digest, check), which
  `anomalyd weights fetch` downloads; `window_limits`: the per-source window a family scoring its own frames forks;
- `version_of`: the version name `create` gives, read without building the model (the daemon then builds one
  detector at start, the registry's active version);
- `default_taps`, `activation`, `default_weights`;
- `module`: where it registers (from `create`'s module), so a training process can import a plug-in's family.

`ModelFamily.trainable` (retraining and `anomalyd train` through the prompt-training loop), `learns_from_labels`
(that, or its own `fit_samples`) and `exportable` follow from what the family registers.

Adding a family: write `model/<family>/` (module, detector on `model.detector.TorchDetector`, checkpoint I/O,
training target, export graph, known-good scores), then in its `family.py`

    register_family(ModelFamily(name="myfamily", create=create_myfamily, options=MyFamilyOptions,
                                training=TrainingSpec(...), capabilities=Capabilities(...), ...))

(a test or plug-in registers one at run time the same way). A bare builder is enough for a training-free model:
`@register_model("name", capabilities=Capabilities(...))` on `create(device=, dtype=, **options)`. A family built
into anomalyd is also listed in `BUILTIN_FAMILIES` with its module, capabilities and options dataclass (in a
torch-free module, e.g. model/patchcore/options.py), so the configuration lists the names, checks what they can do
(the frame geometry, say) and reads their options, and the CLI adds their flags, without importing torch or the
model code; its module then registers without repeating them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # this module imports no torch: the config lists the model names without loading any model
    import torch
    from torch import nn

    from model.detector import Detector

ModelBuilder = Callable[..., "Detector"]

# How a family's raw outputs come to the daemon's 0–1 scale (daemon/detectors/scale.py): "unit" already 0–1; "per_tap" an image
# score in 0–1 and a map summed over the taps (divided by their number); "distance" 0–∞ distances, 1 - exp(-raw / d0)
# with d0 the detector's `distance_scale` (its bank's or window's typical normal distance).
ScoreScale = Literal["unit", "per_tap", "distance"]
SCORE_SCALES: tuple[ScoreScale, ...] = ("unit", "per_tap", "distance")


@dataclass(frozen=True)
class Capabilities:
    """What a model family can do, declared once with its registration. The daemon, the CLI and the adapters ask
    these and never compare a family's name."""

    # It scores only against normal references (a memory bank): the daemon builds one detector per source on that
    # source's references, and a source without references cannot be inspected.
    needs_references: bool = False
    # It takes references itself (its bank, or its own window of frames): never wrapped in the CLIP few-shot
    # detector (`model.fewshot.with_references`), and its known-good scores come from its own references.
    uses_references: bool = False
    # It runs on any frame shape in PyTorch: resize "fit"/"tile"/"pad", ROI and ignore polygons (model/geometry.py);
    # the others take whole frames squashed to a square.
    supports_geometry: bool = False
    score_scale: ScoreScale = "unit"
    needs_class_name: bool = False  # its text prompts name the object, so it cannot run or train without one
    clip_backbone: bool = True  # takes the common CLIP options (--backbone an open_clip name, --layers, 518 px)
    versions_share_backbone: bool = False  # versions differ only in learned weights: a swap reuses the backbone
    # Operator labels train a version of this family (None: of itself, when it trains), e.g. a PatchCore daemon's
    # retraining trains a patchcore-head; the daemon's retraining reads the trained family's declaration.
    retrains_as: str | None = None
    # Its calibrated threshold is at least this (its decision boundary): its known-good frames are frames it learned
    # as normal, so they understate an unseen good frame's score (model/supervised/known_good.py). None: no floor.
    threshold_floor: float | None = None
    # It needs no references: each source's frames are scored against that source's own recent frames (a window per
    # source, the detector's `fork(limits)`). The daemon's zero-label start (`references = "auto"`) runs the first such
    # family until a source has references; as `[model].name` it inspects every source that way.
    scores_own_frames: bool = False

    def __post_init__(self) -> None:
        if self.score_scale not in SCORE_SCALES:
            raise ValueError(f"score_scale {self.score_scale!r}: expected one of {', '.join(SCORE_SCALES)}")


@dataclass(frozen=True)
class CheckpointFormat:
    """A family's weights file: read it, write a module's learned weights, and bring configured weights into the
    version registry (`import_weights(source, target, version) -> file`; None: the file is used where it is)."""

    load: Callable[[str | Path], Any]
    save: Callable[[nn.Module, str | Path, Mapping[str, Any]], Path]
    import_weights: Callable[[str | Path, Path, str], Path] | None = None


@dataclass(frozen=True)
class TrainingSpec:
    """How a family trains.

    build(backbone, weights, *, layers, image_size): the module to train, from a weights file or fresh (None);
    target(module, config): the training target (optimiser, loss, state, save; see `model.training`);
    model_type: the module class (to find the family of a module handed to `train_prompts`);
    defaults: `TrainingConfig` values of the official recipe (epochs, learning_rate, weight_decay, ...).
    """

    build: Callable[..., nn.Module]
    target: Callable[[Any, Any], Any]
    model_type: type
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelLearning:
    """How a family built on references learns from operator labels in the daemon's retraining (its own fit, not
    the prompt-training loop; daemon/learning/head_retraining_job.py). Each callable takes a detector of the family
    built with `references_later=True`.

    source_inputs(detector, references, labelled, *, synthetic_per_reference, seed): one source's frozen training
    items (its bank on `references` (paths), its labelled frames (`model.datasets.Sample`) scored by it);
    fit(detector, parts, *, steps, seed, synthetic_per_reference, metadata) -> (weights, what trained them);
    weights.save(path) writes them (one file; per resize mode, if so), load(path) reads them back;
    scorer(detector, weights | None): the detector scoring as the model with those weights does (None: the base
    model the labels improve on, e.g. PatchCore itself);
    few_shot(base, references, anomalies, *, weak, transform, seed): `anomalyd eval --train-anomalies`'s detector of
    one category, trained on its K normal references and N labelled defects (`model.datasets.Sample`s; `weak`:
    image labels only, their masks unused) on `base` (a detector of the evaluated model, built with
    `references_later=True`); None: the family cannot be evaluated that way;
    promotion_metrics(learning, detector, models, sources, *, rate, rules, on_evaluated): the held-out metrics and
    operating point of each model the retraining compares (candidate, active); None: the default,
    `model.promotion.reference_holdout_metrics` (each source against its own bank, thresholds calibrated as the
    daemon does). The daemon's gate (daemon/learning/promotion.py) only decides on them.
    """

    source_inputs: Callable[..., Any]
    fit: Callable[..., Any]
    load: Callable[[str | Path], Any]
    scorer: Callable[[Any, Any], Any]
    few_shot: Callable[..., Any] | None = None
    promotion_metrics: Callable[..., dict[str, Any]] | None = None


@dataclass(frozen=True)
class ReleasedWeights:
    """Learned weights a family's authors published under a name (`--prompts NAME`, `[model].prompts`): where
    `anomalyd weights fetch` downloads them from (adapters/weights.py, the only code that reaches the network) and
    how a downloaded file is checked."""

    name: str
    url: str
    trained_on: str = ""
    use_for: str = ""
    sha256: str | None = None  # the file's digest, when known: a download that differs is refused
    # check(path) -> what is wrong with a downloaded file (None: nothing); a file it cannot read raises.
    check: Callable[[Path], str | None] | None = None


@dataclass(frozen=True)
class ModelFamily:
    """Everything anomalyd asks of a model family (see the module docstring)."""

    name: str
    create: ModelBuilder
    summary: str = ""
    # wrap(module, *, device, dtype, version): a trained module behind the Detector protocol (retraining's eval).
    wrap: Callable[..., Detector] | None = None
    checkpoint: CheckpointFormat | None = None
    training: TrainingSpec | None = None
    # exporter(detector, class_names): its ExportGraph for ONNX (model.export); None: it has no export graph.
    exporter: Callable[[Any, Sequence[str]], Any] | None = None
    default_taps: Callable[[int], tuple[int, ...]] | None = None  # vision blocks for a tower of n blocks
    # The backbone activation its weights need: "gelu" (nn.GELU), "quick_gelu", or None (the backbone's own).
    activation: str | None = None
    default_weights: str | None = None  # released weights used when the config names none
    # None: a built-in family's declared in BUILTIN_FAMILIES, else the defaults (register_family fills it in).
    capabilities: Capabilities | None = None
    # fit_samples(detector, samples, *, output, seed, references, metadata): trains from labelled samples without the
    # prompt-training loop (`anomalyd train`; e.g. patchcore-head); None: `training` or nothing.
    fit_samples: Callable[..., Any] | None = None
    # The daemon's retraining of a family built on references from operator labels (e.g. patchcore-head).
    label_learning: LabelLearning | None = None
    # known_good(detector, files, limit): raw scores of held-out references and their calibration views
    # (model.known_good.KnownGoodScores) that the daemon calibrates a source's thresholds from; None: it has none.
    known_good: Callable[..., Any] | None = None
    # export_class_row(class_name, details): the per-class graph input of a class an export does not hold, made
    # from the export's `details` (AdaCLIP: the prompt token ids); None: only the exported classes run.
    export_class_row: Callable[[str, Mapping[str, Any]], Any] | None = None
    # version_of(**options): the version name `create` gives these options, read without building the model (its
    # weights file's metadata or digest), so the daemon builds its detector once, from the registry's active
    # version; None (or a None result): it must be built to be named. Built-in: anomalyclip, adaclip (their weights
    # file), clip/clip-ac/winclip (the backbone file's digest). Not needed by a family built on references
    # (`needs_references`: patchcore, patchcore-head): the daemon's start builds no model for it, a stand-in names
    # the version (daemon/process/service.py: `build_detector`) and each source's detector is built on its bank. Not
    # declared by mutual: it has no weights of its own to version (no training, no weights file), so the registry
    # holds no other version of it to build instead, and its version names resolved taps read from its backbone.
    version_of: Callable[..., str | None] | None = None
    # window_limits(max_frames=, max_bytes=, max_age_s=): the bounds of the per-source window its `fork(limits)` takes,
    # for a family that scores a source's frames against its own (`scores_own_frames`; the daemon's `[mutual]`
    # section); None: its fork takes its own defaults.
    window_limits: Callable[..., Any] | None = None
    # promotion_metrics(detector, holdout, *, batch_size): the held-out metrics a retraining run compares its candidate
    # and the active model on (`[retraining].metric` names one; daemon/learning/retraining_job.py); None: the default,
    # `model.promotion.holdout_metrics` (image and pixel metrics of its predictions). The decision is the daemon's.
    promotion_metrics: Callable[..., dict[str, Any]] | None = None
    # The weights its authors released, by name (None: a built-in family's declared in BUILTIN_FAMILIES, else none).
    released_weights: tuple[ReleasedWeights, ...] | None = None
    # Its own options, a frozen dataclass (model/options.py); None: a built-in family's in BUILTIN_FAMILIES, else
    # none beyond the common ones (model.options.COMMON_OPTIONS).
    options: type | None = None
    # The module that registers it: a training process (daemon/learning/retraining_job.py) imports it to find a family that
    # is not built in (a plug-in's, a test's). Filled in at registration from `create`'s module.
    module: str = ""

    @property
    def caps(self) -> Capabilities:
        """Its capabilities (filled in at registration)."""
        return self.capabilities if self.capabilities is not None else declared_capabilities(self.name)

    @property
    def trainable(self) -> bool:
        """It trains through the prompt-training loop: the daemon's retraining and `anomalyd train`."""
        return self.training is not None

    @property
    def learns_from_labels(self) -> bool:
        """It learns from labelled frames at all (through the training loop or its own `fit_samples`)."""
        return self.training is not None or self.fit_samples is not None

    @property
    def exportable(self) -> bool:
        return self.exporter is not None

    def backbone_options(self) -> dict[str, Any]:
        """`load_backbone` keyword arguments for this family's activation."""
        return {} if self.activation is None else {"quick_gelu": self.activation == "quick_gelu"}


def imported_later(module: str, attribute: str) -> Callable[..., Any]:
    """A function that imports `module.attribute` on its first call and calls it: a family declares, say, its
    exporter without loading the export code (or torch) when it registers."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), attribute)(*args, **kwargs)

    call.__qualname__ = call.__name__ = f"{module}.{attribute}"
    return call


@dataclass(frozen=True)
class BuiltinFamily:
    """A family built into anomalyd: the module that registers it (imported on first use), its capabilities and
    its options dataclass ("module:Class" of a torch-free module; "": none beyond the common options)."""

    module: str
    capabilities: Capabilities = Capabilities()
    released_weights: tuple[ReleasedWeights, ...] = ()
    options: str = ""


MODEL_REGISTRY: dict[str, ModelFamily] = {}
DEFAULT_MODEL = "anomalyclip"  # `[model].name` and `anomalyd eval --model` when none is given
# Where the built-in families register themselves (imported on first use, so listing names loads no model code) and
# what they can do (read without importing them: the configuration's checks load no torch).
_OWN_BACKBONE = {"clip_backbone": False}  # its own CNN backbones, taps and input size (model/patchcore/backbone.py)
_ANOMALYCLIP_RELEASES = "https://raw.githubusercontent.com/zqhang/AnomalyCLIP/main/checkpoints"
_ANOMALYCLIP_CHECK = imported_later("model.anomalyclip.checkpoint", "released_prompts_problem")
BUILTIN_FAMILIES: dict[str, BuiltinFamily] = {
    "anomalyclip": BuiltinFamily("model.anomalyclip.family",
                                 Capabilities(score_scale="per_tap", versions_share_backbone=True), (
        ReleasedWeights("anomalyclip-visa", f"{_ANOMALYCLIP_RELEASES}/9_12_4_multiscale_visa/epoch_15.pth", "VisA",
                        "MVTec AD and other industrial data (the paper's protocol for MVTec AD)",
                        check=_ANOMALYCLIP_CHECK),
        ReleasedWeights("anomalyclip-mvtec", f"{_ANOMALYCLIP_RELEASES}/9_12_4_multiscale/epoch_15.pth", "MVTec AD",
                        "VisA, MPDD, BTAD and other industrial data", check=_ANOMALYCLIP_CHECK))),
    "adaclip": BuiltinFamily("model.adaclip.family", Capabilities(needs_class_name=True),
                             options="model.adaclip.options:AdaCLIPOptions"),
    "clip": BuiltinFamily("model.baselines", options="model.baselines_options:ClipOptions"),
    "clip-ac": BuiltinFamily("model.baselines", options="model.baselines_options:ClipAcOptions"),
    "winclip": BuiltinFamily("model.baselines", options="model.baselines_options:WinclipOptions"),
    "patchcore": BuiltinFamily("model.patchcore.detector", Capabilities(
        needs_references=True, uses_references=True, supports_geometry=True, score_scale="distance",
        retrains_as="patchcore-head", **_OWN_BACKBONE), options="model.patchcore.options:PatchcoreOptions"),
    "patchcore-head": BuiltinFamily("model.supervised.detector", Capabilities(
        needs_references=True, uses_references=True, supports_geometry=True,
        threshold_floor=0.5, **_OWN_BACKBONE), options="model.supervised.options:PatchcoreHeadOptions"),
    "mutual": BuiltinFamily("model.mutual.detector", Capabilities(
        uses_references=True, score_scale="distance", scores_own_frames=True, **_OWN_BACKBONE),
        options="model.mutual.options:MutualOptions"),
}


def _load_builtin(name: str | None = None) -> None:
    """Import the module of the built-in family `name` (None: of every built-in family) so it registers."""
    for family, builtin in BUILTIN_FAMILIES.items():
        if (name is None or family == name) and family not in MODEL_REGISTRY:
            importlib.import_module(builtin.module)


def declared_capabilities(name: str) -> Capabilities:
    """The capabilities BUILTIN_FAMILIES declares for `name` (the defaults for a family not built in)."""
    builtin = BUILTIN_FAMILIES.get(name)
    return builtin.capabilities if builtin is not None else Capabilities()


def declared_options(name: str) -> type | None:
    """The options dataclass BUILTIN_FAMILIES names for `name`, imported from its torch-free module (None: none)."""
    builtin = BUILTIN_FAMILIES.get(name)
    if builtin is None or not builtin.options:
        return None
    module, _, attribute = builtin.options.partition(":")
    return getattr(importlib.import_module(module), attribute)


def options_of(name: str) -> type | None:
    """The options dataclass of the family `name` (None: only the common options), without loading a built-in
    family's code; ValueError for an unknown name."""
    if name in MODEL_REGISTRY:
        return MODEL_REGISTRY[name].options
    if name in BUILTIN_FAMILIES:
        return declared_options(name)
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(list_models())}")


def register_family(family: ModelFamily) -> ModelFamily:
    """Register (or replace) a family under its name; without capabilities (options) of its own it gets the
    declared ones."""
    if family.capabilities is None:
        family = replace(family, capabilities=declared_capabilities(family.name))
    if family.released_weights is None:
        builtin = BUILTIN_FAMILIES.get(family.name)
        family = replace(family, released_weights=builtin.released_weights if builtin is not None else ())
    if family.options is None and family.name in BUILTIN_FAMILIES:
        family = replace(family, options=declared_options(family.name))
    if not family.module:
        family = replace(family, module=str(getattr(family.create, "__module__", "") or ""))
    MODEL_REGISTRY[family.name] = family
    return family


def capabilities(name: str) -> Capabilities:
    """What the model `name` can do, without loading a built-in family's code; ValueError for an unknown name."""
    if name in MODEL_REGISTRY:
        return MODEL_REGISTRY[name].caps
    if name in BUILTIN_FAMILIES:
        return BUILTIN_FAMILIES[name].capabilities
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(list_models())}")


def capabilities_of(detector: Any) -> Capabilities:
    """The capabilities of a detector's family, by its `name` (the defaults for a detector of no registered family,
    e.g. a test's stand-in)."""
    try:
        return capabilities(str(getattr(detector, "name", "")))
    except ValueError:
        return Capabilities()


def known_good_of(detector: Any) -> Callable[..., Any] | None:
    """The `known_good` hook of a detector's family, by its `name` (None: the family has none, or the detector
    belongs to no registered family)."""
    name = str(getattr(detector, "name", ""))
    try:
        return get_family(name).known_good
    except ValueError:
        return None


def released_weights() -> dict[str, ReleasedWeights]:
    """Every family's released weights by name: built-in ones as declared (no model code loaded), then those of
    the registered families."""
    found = {w.name: w for builtin in BUILTIN_FAMILIES.values() for w in builtin.released_weights}
    found.update({w.name: w for family in MODEL_REGISTRY.values() for w in family.released_weights or ()})
    return found


def models_that(predicate: Callable[[Capabilities], bool]) -> list[str]:
    """The model names whose capabilities satisfy `predicate` (built-in ones without loading them)."""
    return [name for name in list_models() if predicate(capabilities(name))]


def zero_label_family() -> str:
    """The family the daemon's zero-label start runs: the first that scores a source's frames against its own."""
    found = models_that(lambda caps: caps.scores_own_frames)
    if not found:
        raise ValueError("no registered model family scores frames against their own source's frames")
    return found[0]


def register_model(name: str, **spec: Any) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering a builder as the family `name` (timm style); `spec`: further `ModelFamily` fields."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        register_family(ModelFamily(name=name, create=builder, **spec))
        return builder

    return decorator


def unregister_model(name: str) -> None:
    MODEL_REGISTRY.pop(name, None)


def list_models(*, trainable: bool | None = None) -> list[str]:
    """Family names, sorted; `trainable=True/False` keeps those that do / do not train (that loads them)."""
    if trainable is None:
        return sorted(set(BUILTIN_FAMILIES) | set(MODEL_REGISTRY))
    _load_builtin()
    return sorted(n for n, f in MODEL_REGISTRY.items() if f.trainable == trainable)


def get_family(name: str) -> ModelFamily:
    if name not in MODEL_REGISTRY:
        _load_builtin(name)
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(list_models())}") from None


def family_from(name: str, module: str = "") -> ModelFamily:
    """The family `name`, importing `module` first (the module that registers it) when it is neither registered
    nor built in: a training process finds a plug-in's family this way."""
    if name not in MODEL_REGISTRY and name not in BUILTIN_FAMILIES and module:
        importlib.import_module(module)
    return get_family(name)


def retraining_family(name: str) -> ModelFamily:
    """The family whose version operator labels train for a daemon running `name` (`Capabilities.retrains_as`)."""
    return get_family(capabilities(name).retrains_as or name)


def needs_references(name: str) -> bool:
    """Whether the model `name` scores only against normal references (False for a name no family has)."""
    try:
        return capabilities(name).needs_references
    except ValueError:
        return False


def family_of(module: nn.Module) -> ModelFamily:
    """The trainable family whose module class `module` is."""
    _load_builtin()
    for family in MODEL_REGISTRY.values():
        if family.training is not None and isinstance(module, family.training.model_type):
            return family
    raise TypeError(f"no training is defined for {type(module).__name__}")


def create_detector(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    **options: Any,
) -> Detector:
    """Build a detector by model name. Options: the common ones (model.options.COMMON_OPTIONS: backbone,
    backbone_config, pretrained, prompts, layers, image_size, class_name, references (+ references_cache: where the
    reference bank is kept), ...; a model ignores those it does not use) and the family's own (`ModelFamily.options`,
    checked against their declaration); any other option raises model.options.OptionsError (a ValueError) naming
    the family and what it takes. None values count as not given."""
    from model.detector import resolve_device, resolve_dtype
    from model.options import check_options

    family = get_family(name)
    options = check_options(name, family.options, {k: v for k, v in options.items() if v is not None})
    detector = family.create(device=resolve_device(device), dtype=resolve_dtype(dtype), **options)
    if options.get("references") is not None and not family.caps.uses_references:
        # Few-shot normal references (WinCLIP+ style) work on top of any model.
        from model.fewshot import with_references

        detector = with_references(detector, options["references"], cache_path=options.get("references_cache"))
    return detector
