"""The stage packages import only downward, and no module imports itself through others.

Floors, lowest first; a module may import its own floor and the floors below it, never one above. Read
from the code: training scores its epochs with scoring and draws its coupling heatmap with figures, and
the commands run on trained models (clinical, prediction, report) sit above training.
- foundation: cxrdist/*.py (errors, atomic, layout, log, distributed, text) and cxrdist/labels/ (label names, policies,
  the evaluation-target rule, harmonised vocabularies)
- data: cxrdist/data/ (synth/ included)
- model: cxrdist/model/
- scoring: cxrdist/evaluation/scoring/, cxrdist/evaluation/figures.py
- training: cxrdist/training/
- clinical: cxrdist/evaluation/clinical/
- prediction: cxrdist/evaluation/prediction/
- report: cxrdist/evaluation/report/
- entry points: cxrdist/cli.py, cxrdist/demo/, cxrdist/lodo.py, cxrdist/train.py, cxrdist/__main__.py
Every import counts, also one inside a function: it runs upward just the same when it runs.

Besides the floors: the commands run on trained models (cxrdist/evaluation/) never import the trainer (cxrdist/training/):
what both need (the W&B mode) lives below both. And the house stays readable: a package holds at most MAX_MODULES modules
(its subpackages count apart) and no module is longer than MAX_LINES lines; one that grows past that is split by concern.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cxrdist"

FLOORS = [
    ("foundation", ("cxrdist", "cxrdist.labels")),
    ("data", ("cxrdist.data",)),
    ("model", ("cxrdist.model",)),
    ("scoring", ("cxrdist.evaluation", "cxrdist.evaluation.scoring", "cxrdist.evaluation.figures")),
    ("training", ("cxrdist.training",)),
    ("clinical", ("cxrdist.evaluation.clinical",)),
    ("prediction", ("cxrdist.evaluation.prediction",)),
    ("report", ("cxrdist.evaluation.report",)),
    ("entry points", ("cxrdist.cli", "cxrdist.demo", "cxrdist.lodo", "cxrdist.train", "cxrdist.__main__")),
]
MAX_MODULES, MAX_LINES = 12, 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


def floor(module: str) -> tuple[int, str]:
    """(height, name) of the floor whose longest prefix names `module`."""
    matches = [(len(prefix), height, name) for height, (name, prefixes) in enumerate(FLOORS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} is on no floor")
    _, height, name = max(matches)
    return height, name


def imported_modules(module: str, source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, cxrdist module) for every import in `source`, at any depth; `from P import m` names P.m when that is a module."""
    package = module if is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return sorted({(line, name) for line, name in found if name == "cxrdist" or name.startswith("cxrdist.")})


def upward_imports(module: str, source: str, known: set[str]) -> list[str]:
    height, name = floor(module)
    wrong = []
    for line, target in imported_modules(module, source, known):
        target_height, target_name = floor(target)
        if target_height > height:
            wrong.append(f"{module}:{line} ({name}) imports {target} ({target_name})")
    return wrong


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {m: {t for _, t in imported_modules(m, p.read_text(), known) if t in known and t != m} for m, p in found.items()}


def test_no_stage_imports_upward():
    found = modules()
    wrong = [w for m, p in found.items() for w in upward_imports(m, p.read_text(), set(found))]
    assert not wrong, "imports running up the floors (see this file's docstring):\n" + "\n".join(wrong)


def test_every_package_is_placed_on_a_floor_by_name():
    """A new package (cxrdist/X/ or cxrdist/evaluation/X/) needs a deliberate floor, not the root's by default."""
    named = {prefix for _, prefixes in FLOORS for prefix in prefixes}
    packages = [module_name(p) for p in PACKAGE.rglob("__init__.py")]
    unplaced = [p for p in packages if p != "cxrdist" and not any(p == n or p.startswith(n + ".") for n in named - {"cxrdist"})]
    assert not unplaced, f"packages on no named floor: {unplaced}"


def test_no_import_cycle_between_modules():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "modules that import themselves through others:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("cxrdist.data.ingest.folds", "from cxrdist.model.card import ModelCard\n"),
        ("cxrdist.model.card", "def f():\n    from cxrdist.evaluation.scoring import metrics\n"),
        ("cxrdist.model.network", "import cxrdist.training.loop\n"),
        ("cxrdist.training.loop", "class T:\n    def m(self):\n        from cxrdist.evaluation.prediction.models import load_fold_models\n"),
        ("cxrdist.evaluation.scoring.metrics", "from ..report import html\n"),
        ("cxrdist.errors", "from cxrdist.data import manifest\n"),
    ],
)
def test_an_upward_import_is_caught(module, source):
    known = set(modules())
    assert upward_imports(module, source, known), f"{source!r} in {module} should run upward"


def test_a_downward_import_passes():
    known = set(modules())
    source = "from cxrdist.data.manifest import Manifest\nfrom ..scoring import bootstrap\nimport cxrdist.layout\n"
    assert upward_imports("cxrdist.evaluation.clinical.calibration", source, known) == []


def test_the_commands_on_trained_models_never_import_the_trainer():
    found = modules()
    wrong = [f"{m}:{line} imports {target}" for m, p in found.items() if m.startswith("cxrdist.evaluation")
             for line, target in imported_modules(m, p.read_text(), set(found)) if target.startswith("cxrdist.training")]
    assert not wrong, "evaluation modules importing the trainer:\n" + "\n".join(wrong)


def test_every_package_holds_at_most_a_dozen_modules():
    crowded = {str(d.relative_to(ROOT)): n for d in [PACKAGE, *(p.parent for p in PACKAGE.rglob("__init__.py"))]
               if (n := len([f for f in d.glob("*.py") if f.name != "__init__.py"])) > MAX_MODULES}
    assert not crowded, f"packages over {MAX_MODULES} modules (split them by concern): {crowded}"


def test_no_module_is_longer_than_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"
