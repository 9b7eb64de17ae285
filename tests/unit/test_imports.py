"""papa's modules import each other without a cycle, counting every import statement: at the top, inside a
function (those exist to keep torch out of the commands that do not need it, never to dodge a cycle) and under
TYPE_CHECKING."""

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "papa"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The papa modules that module ``name`` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: a relative import"  # papa imports by absolute name only
            base = node.module
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_papa():
    graph = {name: imports(name) for name in MODULES}
    assert len(graph) > 50 and "papa.variants" in graph["papa.config"]  # the graph is read
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


LAYERS = {  # docs/architecture.md draws them; each imports only from the layers it names (and itself)
    "foundation": ({"papa", "papa.errors", "papa.io", "papa.rng", "papa.provenance"}, set()),
    "declarations": ({"papa.variants", "papa.fidelity", "papa.catalog", "papa.config", "papa.smoke", "papa.schemas"},
                     {"foundation"}),
    "data and models": ({"papa.data", "papa.models"}, {"foundation", "declarations"}),
    "core": ({"papa.population", "papa.averaging", "papa.repair", "papa.alignment", "papa.soups", "papa.similarity",
              "papa.forward", "papa.genetic", "papa.segmentation", "papa.metrics", "papa.swa", "papa.fold"},
             {"foundation", "data and models"}),
    "training": ({"papa.build", "papa.engines", "papa.averagers", "papa.train", "papa.checkpoint", "papa.distributed"},
                 {"foundation", "declarations", "data and models", "core"}),
    "report": ({"papa.report"}, {"foundation", "declarations"}),
    "commands": ({"papa.cli", "papa.__main__", "papa.runs", "papa.fakedata", "papa.bench", "papa.export", "papa.card"},
                 {"foundation", "declarations", "data and models", "core", "training", "report"}),
}


def layer_of(name: str) -> str:
    return next(layer for layer, (modules, _) in LAYERS.items()
                if name in modules or any(name.startswith(f"{m}.") for m in modules - {"papa"}))


def test_each_layer_imports_only_the_layers_below_it():
    """The core math never imports training, configs or commands; data and models never the core; the reports
    neither torch-using layer (they render without torch); the declarations only the foundation."""
    wrong = [f"{m} -> {t}" for m in MODULES for t in imports(m)
             if layer_of(t) != layer_of(m) and layer_of(t) not in LAYERS[layer_of(m)][1]]
    assert wrong == []
