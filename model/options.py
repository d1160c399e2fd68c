"""A model family's typed options: what `create_detector(name, **options)` accepts beyond the common options, declared
once as a frozen dataclass per family (`ModelFamily.options`; a built-in family's in a torch-free module named by
`model.factory.BUILTIN_FAMILIES`), so the CLI adds its flags, the configuration reads its `[model]` keys and
`create_detector` refuses an option it does not know, without any of them naming a family.

    @dataclass(frozen=True)
    class MyFamilyOptions:
        depth: int = option(3, "how many blocks to stack", flag="--depth")
        mode: Literal["fast", "exact"] = option("fast", "search mode (no flag: set in [model] only)")

Each field: its type (int, float, bool, str, a `Literal[...]` of choices, or anything else, which the CLI reads as
text), its default (what the builder uses when the option is not given), one line of help, the CLI flag that sets
it (None: set only through `[model]` or `create_detector`), and `source=True` for a weights file the detector is
built from (its digest goes into an export's manifest). Two families may declare the same flag with the same name
and type (e.g. PatchCore's and mutual scoring's `--weights`): the CLI adds it once. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

# Accepted by every family, each builder taking those it uses: the runtime, the common model flags and `[model]`
# keys (a CLIP backbone, learned weights, taps, input size, class name), the references and their frame geometry.
COMMON_OPTIONS = frozenset({
    "device", "dtype", "backbone", "backbone_config", "pretrained", "prompts", "layers", "image_size", "class_name",
    "references", "references_cache", "references_later", "geometry",
})
_SIMPLE = (bool, int, float, str)


class OptionsError(ValueError):
    """An option a family does not declare, or a value its declaration refuses."""


def option(default: Any = None, help: str = "", *, flag: str | None = None, source: bool = False,
           minimum: float | None = None) -> Any:
    """A field of a family's options dataclass (see the module docstring); `minimum`: the least value of a number."""
    return field(default=default, metadata={"help": help, "flag": flag, "source": source, "minimum": minimum})


@dataclass(frozen=True)
class OptionSpec:
    """One declared option, read from its dataclass field."""

    name: str
    default: Any
    help: str
    flag: str | None
    kind: type | None  # bool, int, float or str when the type is one of them (or of them and None); else None
    choices: tuple[Any, ...] | None
    source: bool = False
    minimum: float | None = None

    def check(self, family: str, value: Any) -> Any:
        """The value, converted from text where the type is a plain number or bool (a value from the environment);
        OptionsError naming the family and option when the declaration refuses it."""
        where = f"model {family!r} option {self.name!r}"
        if self.choices is not None:
            if value not in self.choices:
                raise OptionsError(f"{where}: {value!r} is not one of {', '.join(map(repr, self.choices))}")
            return value
        exact = self.kind is not None and isinstance(value, self.kind) and (self.kind is bool
                                                                            or not isinstance(value, bool))
        if self.kind is None or exact:
            if self.kind in (int, float) and self.minimum is not None and value < self.minimum:
                raise OptionsError(f"{where}: {value!r} is below its minimum {self.minimum:g}")
            return value
        if isinstance(value, str) and self.kind in (int, float, bool):
            return self.check(family, _from_text(self.kind, value, where))
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return self.check(family, float(value))
        raise OptionsError(f"{where}: expected {self.kind.__name__}, got {value!r}")


def _from_text(kind: type, text: str, where: str) -> Any:
    if kind is bool:
        if text.strip().lower() in ("true", "1", "yes", "on"):
            return True
        if text.strip().lower() in ("false", "0", "no", "off"):
            return False
        raise OptionsError(f"{where}: expected true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise OptionsError(f"{where}: expected {kind.__name__}, got {text!r}") from None


def _plain(hint: Any) -> tuple[type | None, tuple[Any, ...] | None]:
    """(simple kind, choices) of a type hint, None aside."""
    if get_origin(hint) in (Union, types.UnionType):
        rest = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(rest) != 1:
            return None, None
        hint = rest[0]
    if get_origin(hint) is Literal:
        return None, tuple(get_args(hint))
    return (hint, None) if hint in _SIMPLE else (None, None)


def option_specs(schema: type | None) -> tuple[OptionSpec, ...]:
    """The options a family's dataclass declares (none for None)."""
    if schema is None:
        return ()
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r}: a family's options are a dataclass (see model/options.py)")
    hints = get_type_hints(schema)
    specs = []
    for item in dataclasses.fields(schema):
        if item.name in COMMON_OPTIONS:
            raise TypeError(f"{schema.__name__}.{item.name}: a common option, not a family's own")
        kind, choices = _plain(hints[item.name])
        meta = item.metadata
        specs.append(OptionSpec(item.name, item.default, str(meta.get("help", "")), meta.get("flag"), kind, choices,
                                bool(meta.get("source", False)), meta.get("minimum")))
    return tuple(specs)


def describe(family: str, schema: type | None, *, common: bool = True) -> str:
    """What `family` accepts (with the common options, or its own alone), for an error message."""
    own = ", ".join(spec.name for spec in option_specs(schema)) or "none"
    if not common:
        return f"model {family!r} has no such option (its own options: {own})"
    return f"model {family!r} takes the common options ({', '.join(sorted(COMMON_OPTIONS))}) and its own: {own}"


def check_options(family: str, schema: type | None, options: Mapping[str, Any], *, common: bool = True,
                  where: str = "") -> dict[str, Any]:
    """`options` for `family`, each own option checked against its declaration (and converted from text); an option
    neither common (with `common`) nor declared raises OptionsError naming the family and what it takes."""
    specs = {spec.name: spec for spec in option_specs(schema)}
    unknown = sorted(set(options) - set(specs) - (COMMON_OPTIONS if common else set()))
    if unknown:
        raise OptionsError(f"{where}{'option' if len(unknown) == 1 else 'options'} {', '.join(map(repr, unknown))}: "
                           f"{describe(family, schema, common=common)}")
    return {key: specs[key].check(family, value) if key in specs and value is not None else value
            for key, value in options.items()}


def accepted_options(schema: type | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The common options and those `schema` declares, of `options` (the rest, meant for another family, dropped)."""
    own = {spec.name for spec in option_specs(schema)}
    return {key: value for key, value in options.items() if key in COMMON_OPTIONS or key in own}
