"""The code's shape (docs/architecture.md): no import cycle among our modules (function-level imports count,
`if TYPE_CHECKING:` ones do not), imports point inward (model ← adapters ← daemon), and no module over 500 lines."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import import_cycles  # noqa: E402

MAX_LINES = 500
LAYER = {"model": 0, "adapters": 1, "daemon": 2, "migrations": 2}
# daemon's packages by concern (daemon/__init__.py): each imports only packages of a lower rank
DAEMON_RANK = {"config": 0, "telemetry": 1, "detectors": 1, "zero_label": 2, "frames": 3, "references": 3,
               "learning": 4, "plant": 5, "api": 5, "process": 6, "commands": 7, "cli": 7, "__init__": 7}


def test_the_checker_finds_a_cycle_through_a_function_level_import_but_not_a_type_checking_one(tmp_path):
    package = tmp_path / "model"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from model.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from model import a\n    return a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from model.a import x\n")
    (package / "d.py").write_text("from . import c\n")
    found = import_cycles.modules(tmp_path)
    graph = import_cycles.import_graph(found)
    assert graph["model.c"] == set() and graph["model.d"] == {"model.c"}
    assert import_cycles.cycles(graph) == [["model.a", "model.b"]]


def test_no_import_cycle():
    graph = import_cycles.import_graph(import_cycles.modules())
    assert import_cycles.cycles(graph) == []


def test_imports_point_inward():
    graph = import_cycles.import_graph(import_cycles.modules())
    outward = [f"{source} -> {target}" for source, targets in graph.items() for target in targets
               if LAYER[target.split(".")[0]] > LAYER[source.split(".")[0]]
               or (source.startswith("migrations") and target.startswith("daemon"))]
    assert outward == []


def _daemon_package(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def test_daemon_is_packages_by_concern_each_with_its_docstring():
    flat = sorted(path.name for path in (ROOT / "daemon").glob("*.py") if path.stem not in ("__init__", "cli"))
    assert flat == []
    packages = {path.parent.name for path in (ROOT / "daemon").glob("*/__init__.py")}
    assert packages == set(DAEMON_RANK) - {"cli", "__init__"}
    undocumented = [name for name in packages
                    if "Owns:" not in (ROOT / "daemon" / name / "__init__.py").read_text(encoding="utf-8")]
    assert undocumented == []


def test_daemon_packages_import_only_lower_ranks():
    graph = import_cycles.import_graph(import_cycles.modules())
    upward = [f"{source} -> {target}" for source, targets in graph.items() if source.startswith("daemon.")
              for target in targets if target.startswith("daemon.")
              and _daemon_package(source) != _daemon_package(target)
              and DAEMON_RANK[_daemon_package(target)] >= DAEMON_RANK[_daemon_package(source)]
              and not (_daemon_package(source) == "commands" and _daemon_package(target) == "cli")]
    assert upward == []


def test_no_module_over_500_lines():
    files = list(import_cycles.modules().values())
    files += [path for folder in ("bench", "scripts") for path in sorted((ROOT / folder).rglob("*.py"))]
    long = {str(path.relative_to(ROOT)): count for path in files
            if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def family_units(root: Path = ROOT) -> set[str]:
    """The model code of each family: the `model/` package (or top-level module) holding a module that registers a
    family (`register_family(` / `@register_model(`), and a top-level module named after it (`model.baselines` and
    `model.baselines_export`). model/factory.py, the registry itself, is none."""
    units = set()
    for path in sorted((root / "model").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name != "factory.py" and ("register_family(ModelFamily" in text or "@register_model(" in text):
            units.add("model." + path.relative_to(root / "model").with_suffix("").parts[0])
    top_level = {f"model.{path.stem}" for path in (root / "model").glob("*.py")}
    return units | {module for module in top_level for unit in units if module.startswith(unit + "_")}


def test_daemon_and_adapters_import_no_family_code():
    """Issue #22: the daemon and the adapters reach a family only through its contract (model/factory.py) and the
    neutral model modules (model.detector, model.geometry, model.datasets, model.drift, model.promotion, ...), never
    a family's own package."""
    units = family_units()
    assert {"model.anomalyclip", "model.adaclip", "model.baselines", "model.baselines_export", "model.patchcore",
            "model.supervised", "model.mutual"} <= units
    graph = import_cycles.import_graph(import_cycles.modules())
    found = [f"{source} -> {target}" for source, targets in graph.items()
             if source.split(".")[0] in ("daemon", "adapters") for target in targets
             if any(target == unit or target.startswith(unit + ".") for unit in units)]
    assert found == []


def test_the_family_import_check_finds_a_family_import(tmp_path):
    (tmp_path / "model" / "toyfam").mkdir(parents=True)
    (tmp_path / "model" / "__init__.py").write_text("")
    (tmp_path / "model" / "toyfam" / "__init__.py").write_text("")
    (tmp_path / "model" / "toyfam" / "family.py").write_text("register_family(ModelFamily(name='toy'))\n")
    (tmp_path / "model" / "neutral.py").write_text("")
    assert family_units(tmp_path) == {"model.toyfam"}
