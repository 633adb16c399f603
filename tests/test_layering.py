"""The package's imports only point down, and nothing imports in a circle.

Layers, bottom to top (a module may import its own package and the packages of lower layers;
peers on one layer do not import each other):

    core -> io -> model -> objectives | sampling | data -> training -> evaluation -> research
         -> commands -> cli -> lightning_dlm (the package itself, __main__)

``io`` sits below ``model`` because ``DiffusionModel.from_pretrained`` reads files through it; it
knows file layouts, not models. Every import counts, those inside functions too (a lazy import
that points up is still an upward dependency). ``python -m tests.test_layering`` prints the
report for anyone to run.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_dlm"
LAYERS = [["core"], ["io"], ["model"], ["objectives", "sampling", "data"], ["training"], ["evaluation"],
          ["research"], ["commands"], ["cli"], [""]]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
#: Third-party packages a layer must not import (the core is pure torch; only training and above know Lightning).
FORBIDDEN = {"core": {"lightning", "transformers", "torchmetrics", "datasets", "peft"},
             "io": {"lightning", "torchmetrics", "peft"}, "model": {"lightning", "torchmetrics"},
             "sampling": {"lightning", "torchmetrics", "datasets"}, "objectives": {"lightning", "torchmetrics", "datasets"}}


def modules(root: Path = ROOT) -> Dict[str, Path]:
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def imports(mods: Dict[str, Path]) -> Dict[str, Set[str]]:
    """Module -> the lightning_dlm modules (or third-party top-level names) it imports, anywhere in it."""
    edges: Dict[str, Set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from pkg import mod` depends on pkg.mod when that is a module, else on pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.startswith(PACKAGE + ".") or target == PACKAGE:
                    while target not in mods and "." in target:
                        target = target.rpartition(".")[0]
                    if target != name:
                        edges[name].add(target)
                else:
                    edges[name].add("!" + target.split(".")[0])
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else ""


def upward(edges: Dict[str, Set[str]]) -> List[Tuple[str, str]]:
    bad = []
    for source, targets in edges.items():
        for target in targets:
            if target.startswith("!"):
                if target[1:] in FORBIDDEN.get(layer(source), ()):
                    bad.append((source, target[1:]))
                continue
            a, b = layer(source), layer(target)
            if a != b and RANK[b] >= RANK[a]:
                bad.append((source, target))
    return sorted(bad)


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w.startswith("!"):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != PACKAGE and m != f"{PACKAGE}.__main__" and layer(m) == ""]
    assert unplaced == [], f"modules outside every layer (put them in a layer package): {unplaced}"


def test_no_import_cycles():
    assert cycles(imports(modules())) == []


def test_imports_only_point_down():
    assert upward(imports(modules())) == []


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    # the test must be able to fail: a core module importing the model layer, and two modules in a circle
    pkg = tmp_path / PACKAGE
    for sub in ("core", "model"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from lightning_dlm.model import b\n")
    (pkg / "model" / "b.py").write_text("from lightning_dlm.model import c\n")
    (pkg / "model" / "c.py").write_text("from . import b\nimport transformers\n")
    (pkg / "core" / "d.py").write_text("import lightning.pytorch\n")
    edges = imports(modules(tmp_path))
    assert upward(edges) == [("lightning_dlm.core.a", "lightning_dlm.model.b"), ("lightning_dlm.core.d", "lightning")]
    assert cycles(edges) == [["lightning_dlm.model.b", "lightning_dlm.model.c"]]


if __name__ == "__main__":
    graph = imports(modules())
    found_cycles, found_up = cycles(graph), upward(graph)
    count = sum(1 for targets in graph.values() for t in targets if not t.startswith("!"))
    print(f"{len(modules())} modules, {count} imports between them")
    print(f"import cycles: {len(found_cycles)}")
    for c in found_cycles:
        print("  " + " <-> ".join(c))
    print(f"upward imports: {len(found_up)}")
    for a, b in found_up:
        print(f"  {a} -> {b}")
    sys.exit(1 if found_cycles or found_up else 0)
