"""The package's shape: no import cycle, and the light modules stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "aurora_sweep"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside a function."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("aurora_sweep", *parts)).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                found.append([*path[path.index(other) :], other])
            elif other not in state:
                visit(other, [*path, other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_module_of_the_package_imports_itself_round_a_cycle():
    graph = import_graph()
    assert {
        "aurora_sweep.sweep.run",
        "aurora_sweep.sweep.scheduler",
        "aurora_sweep.report.evaluate",
        "aurora_sweep.report.best",
    } <= set(graph)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


#: The stages, lowest first: a module may import its own stage and those before it, never a
#: later one. The shared leaves (`errors`, `devices`, `processes`) import no stage; the package's
#: own `__init__` (`aurora_sweep.load_finetuned`) may import any.
LAYERS = "leaves config data model verify train memory sweep report cli".split()


def layer(module: str) -> str | None:
    """The stage `module` belongs to (None for the package itself)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else "leaves"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import, at module level or inside a function, of a later stage than the importer's."""
    up = []
    for module, imported in sorted(graph.items()):
        for other in sorted(imported):
            if None in (layer(module), layer(other)):
                continue
            if LAYERS.index(layer(other)) > LAYERS.index(layer(module)):
                up.append(f"{module} -> {other}")
    return up


def test_every_module_lives_in_a_stage_and_no_module_imports_a_later_stage():
    graph = import_graph()
    stray = [m for m in graph if m.count(".") == 1 and layer(m) == "leaves"]
    assert sorted(stray) == [
        "aurora_sweep.devices",
        "aurora_sweep.errors",
        "aurora_sweep.processes",
    ]
    assert upward_imports(graph) == []


def test_the_layer_check_finds_an_import_of_a_later_stage():
    graph = {
        "aurora_sweep.data.samples": {"aurora_sweep.config.targets", "aurora_sweep.model.build"},
        "aurora_sweep.errors": {"aurora_sweep.config.targets"},
        "aurora_sweep": {"aurora_sweep.report.best"},
    }
    assert upward_imports(graph) == [
        "aurora_sweep.data.samples -> aurora_sweep.model.build",
        "aurora_sweep.errors -> aurora_sweep.config.targets",
    ]


@pytest.mark.parametrize(
    "module",
    [
        "config.bases",
        "config.objective",
        "config.targets",
        "config.recipe",
        "config.settings",
        "config.study",
        "config.study_file",
        "sweep.records",
        "sweep.outcomes",
        "sweep.space",
        "sweep.storage",
        "devices",
        "report.best",
        "verify.bootstrap",
    ],
)
def test_the_light_modules_import_without_torch(module):
    code = f"import sys, aurora_sweep.{module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ruff_finds_nothing_in_the_code_the_tests_or_the_benchmarks():
    """Lint and complexity (ruff's C90 at 12, pyproject.toml) as part of the test command."""
    root = PACKAGE.parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "src", "tests", "bench", "scripts"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_module_over_500_lines_and_no_function_over_60_outside_the_plotting_code():
    """The shape issue 16 set: modules a reader can hold, functions that do one thing (plots.py
    is plotting code, laid out panel by panel)."""
    long_modules, long_functions = [], []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "plots.py":
            continue
        text = path.read_text()
        if text.count("\n") > 500:
            long_modules.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 60:
                    long_functions.append(f"{path.name}:{node.name}")
    assert long_modules == [] and long_functions == []


def test_no_function_packs_its_statements_past_the_formatter():
    """`# fmt: skip` keeps a module-level table in columns; inside a function it only ever packed
    statements or arguments onto fewer lines, to pass the 60-line limit."""
    packed = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        lines = text.split("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = lines[node.lineno - 1 : node.end_lineno]
                packed += [f"{path.name}:{node.name}" for line in body if "# fmt: skip" in line]
    assert packed == []


def test_only_the_targets_registry_and_the_demo_name_tp():
    """Every layer reads the study's target from `targets` (issue 18): a `"tp"` literal anywhere
    else is a layer that would silently treat another target as tp."""
    naming = sorted(
        path.name
        for path in PACKAGE.rglob("*")
        if path.is_file() and path.suffix in (".py", ".toml") and '"tp"' in path.read_text()
    )
    assert naming == ["demo.py", "targets.py"]
