"""The import structure: no cycles, and every import runs down the layer list that
docs/ARCHITECTURE.md states (read from the doc, so the two cannot silently disagree)."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sliderquant"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
MARKER = "<!-- import layers: read by tests/test_architecture.py -->"


def module_names() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("sliderquant", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = module_names()


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _resolve(name: str) -> str | None:
    """The sliderquant module an imported dotted name refers to (longest known prefix)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> set[str]:
    """Every sliderquant module `module` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module)
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}")
                found.add(target if target else _resolve(base))
    found.discard(None)
    found.discard(module)
    return found


GRAPH = {m: imports(m) for m in MODULES}


def documented_layers() -> list[list[str]]:
    text = DOC.read_text()
    assert MARKER in text, f"{DOC} lost its import-layer list (marker {MARKER!r})"
    layers = []
    for line in text.split(MARKER, 1)[1].splitlines()[1:]:
        m = re.match(r"\d+\.\s+(.*)", line)
        if not m:
            if layers:
                break
            continue
        layers.append(re.findall(r"`([^`]+)`", m.group(1)))
    return layers


def layer_of() -> dict[str, int]:
    """Module -> index in the documented list (0 = top); a name covers its submodules."""
    names = {}
    for index, layer in enumerate(documented_layers()):
        for name in layer:
            full = "sliderquant" if name == "sliderquant" else f"sliderquant.{name}"
            assert full not in names, f"{name} is listed twice in {DOC.name}"
            names[full] = index
    result = {}
    for module in MODULES:
        covering = [n for n in names if module == n or
                    (n != "sliderquant" and module.startswith(n + "."))]
        assert covering, f"{module} is in no layer of {DOC.name}: add it to the list"
        result[module] = names[max(covering, key=len)]
    for name in names:
        assert any(m == name or m.startswith(name + ".") for m in MODULES), \
            f"{DOC.name} lists {name}, which does not exist"
    return result


def test_the_walker_sees_function_level_and_from_package_imports():
    assert "sliderquant.api" in GRAPH["sliderquant.cli.quantize"]  # inside run()
    assert "sliderquant.export.compressed" in GRAPH["sliderquant.api"]  # from ..export import
    assert "sliderquant.api" in GRAPH["sliderquant"]


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_run_down_the_documented_layers():
    layers = layer_of()
    upward = [f"{a} (layer {layers[a] + 1}) imports {b} (layer {layers[b] + 1})"
              for a in sorted(GRAPH) for b in sorted(GRAPH[a]) if layers[b] < layers[a]]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


@pytest.mark.parametrize("low, high", [("sliderquant.quant", "sliderquant.families"),
                                       ("sliderquant.config", "sliderquant.quant")])
def test_layer_list_orders_the_core(low, high):
    layers = layer_of()
    assert layers[low] > layers[high]
