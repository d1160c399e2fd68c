"""A family package whose names are imported on first use, so a torch-free module in it (its `options.py`, read by
the configuration and the CLI) loads without the family's model code. Usage, in the package's `__init__.py`:

    from model.lazy import lazy_package
    __all__ = lazy_package(__name__, {"model.myfamily.detector": ("MyDetector", "build_my")})
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any


class _LazyPackage(types.ModuleType):
    """A package that imports an exported name's module on first access. The import system binds each submodule
    on its package; a submodule named like an exported name (`kmeans` in `kmeans.py`) does not replace the name."""

    _lazy_exports: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        where = self.__dict__.get("_lazy_exports", {})
        if name not in where:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and name in self.__dict__.get("_lazy_exports", {})
                and value.__name__ == f"{self.__name__}.{name}"):
            return
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(self.__dict__.get("_lazy_exports", {})))


def lazy_package(package: str, exports: Mapping[str, Sequence[str]]) -> list[str]:
    """Make `package` import each exported name from its module on first access; returns its `__all__`."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module.__dict__["_lazy_exports"] = {name: source for source, names in exports.items() for name in names}
    return sorted(module.__dict__["_lazy_exports"])
