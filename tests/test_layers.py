"""The house rules of couplet/ (docs/design.md, "Layers"): imports run one way, top to bottom, with no
cycle between modules (imports inside functions count), no module reaches another's private names,
and no module is over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "couplet"
# Bottom to top; a module may import from its own layer or any layer below it, never above.
LAYERS = (
    ("core",),
    ("data",),
    ("decoding",),
    ("modelling",),
    ("registry", "summary"),
    ("predictor",),
    ("evaluation", "cached_run"),
    ("serving",),
    ("cli", "__main__"),
)
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every `couplet` import in the file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "couplet":
            names = [a.name for a in node.names]
            found += [(f"{node.module}.{n}", []) for n in names if f"{node.module}.{n}" in MODULES]
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "couplet"]
    return [(m, names) for m, names in found if m in MODULES]


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module}: its folder is in no layer of tests/test_layers.py LAYERS (add it there and to docs/design.md)")


def test_every_module_belongs_to_a_layer():
    for module in MODULES:
        if module != "couplet":
            _layer(module)


def test_imports_run_one_way():
    upward = [f"{m} (layer {_layer(m)}) imports {dep} (layer {_layer(dep)})"
              for m, path in MODULES.items() if m != "couplet"
              for dep, _ in _imports(path) if dep != "couplet" and _layer(dep) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = {m: {dep for dep, _ in _imports(path) if dep != m and not MODULES[dep].name == "__init__.py"}
             for m, path in MODULES.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_private_names_imported_across_modules():
    private = [f"{m} imports {dep}.{name}" for m, path in MODULES.items()
               for dep, names in _imports(path) for name in names if name.startswith("_")]
    assert not private, "\n".join(private)


def test_no_module_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_the_rules_can_fail(tmp_path):
    """The checks above see an upward import and a cycle when there is one."""
    global MODULES
    saved = MODULES
    fake = {"couplet.core.catalog": "from couplet.modelling import model\n",
            "couplet.modelling.model": "from couplet.core import catalog\n"}
    for name, text in fake.items():
        path = tmp_path.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    MODULES = {name: tmp_path.joinpath(*name.split(".")).with_suffix(".py") for name in fake}
    try:
        with pytest.raises(AssertionError, match="couplet.core.catalog .layer 0. imports couplet.modelling.model"):
            test_imports_run_one_way()
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycle()
    finally:
        MODULES = saved
