"""The layering of ``splice/`` (docs: ../shared/DESIGN.md, "Layering"), checked on every import.

Every ``import splice…`` / ``from splice… import …`` of every file under ``splice/`` counts,
function-level (lazy) ones included, and so does a module named in a string (``"splice.x.y"`` or
``"splice.x.y:attr"`` outside a docstring: what ``importlib.import_module`` or a lazy ``__getattr__``
table would import). Each file maps to
a layer; an import must go to a layer the importer may use, a pass family may use only itself,
``passes/instrument``, the passes core and the shared modules declared below, and the file graph
has no cycles. There is no allow-list: a violation is fixed in the code, not excused here.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "splice"
MAX_LINES = 600
MODULE_STRING = re.compile(r"splice(\.[A-Za-z_]\w*)+(:\w+)?")

FLOOR = {"splice/errors.py", "splice/progress.py", "splice/quiet.py"}
API = {"splice/__init__.py", "splice/__main__.py", "splice/demo.py"}
# which layers each layer may import (itself included where listed); API and cli import anything
ALLOWED = {
    "floor": {"floor"},
    "kernels": {"floor", "kernels"},
    "ir": {"floor", "kernels", "ir"},
    "frontends": {"floor", "kernels", "ir", "frontends"},
    "passes": {"floor", "kernels", "ir", "passes"},
    "runtime": {"floor", "kernels", "ir", "runtime"},
    # eval and train read graphs (ir) and run them (runtime); the tokenizer comes with the graph,
    # so neither needs a frontend. train uses eval's data helpers, never the other way round.
    "eval": {"floor", "kernels", "ir", "runtime", "eval"},
    "train": {"floor", "kernels", "ir", "runtime", "eval", "train"},
}
# the pass-manager core every family may import (and that may load every family)
PASSES_CORE = {"splice/passes/__init__.py", "splice/passes/base.py", "splice/passes/manager.py",
               "splice/passes/spec.py", "splice/passes/instruments.py"}
# every family may import the instrument family (observers, calibration statistics)
SHARED_FAMILIES = {"instrument"}
# modules of one family that other families may import: {file: reason}
SHARED_MODULES: dict[str, str] = {
    "splice/passes/quantize/_common.py": "prune.sparsegpt's joint quantization (SparseGPT --wbits) writes its "
                                         "layers as the quantizers do",
    "splice/passes/adapters/_inject.py": "recurse.slice's per-loop LoRAs are ordinary adapters (train, fold, export)",
    "splice/passes/adapters/lora.py": "recurse.slice's per-loop LoRAs are ordinary adapters (train, fold, export)",
}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def layer_of(file: str) -> str | None:
    """The layer of a file under ``splice/`` (``None``: a file no layer claims)."""
    if file in FLOOR:
        return "floor"
    if file in API:
        return "api"
    parts = file.split("/")
    if len(parts) > 2 and parts[1] in ("kernels", "ir", "frontends", "passes", "runtime", "eval", "train", "cli"):
        return parts[1]
    return None


def family_of(file: str) -> str | None:
    """``quantize`` for ``splice/passes/quantize/…``; ``None`` for the passes core."""
    parts = file.split("/")
    return parts[2] if len(parts) > 3 and parts[1] == "passes" else None


def module_file(module: str) -> str | None:
    """The file ``import <module>`` executes last: ``splice/a/b.py`` or ``splice/a/b/__init__.py``."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return rel(candidate)
    return None


def imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    """(module, line) of every splice import in ``tree``, lazy ones and module strings included.
    ``from splice.x import y`` imports ``splice.x.y`` when ``y`` is a submodule, else ``splice.x``."""
    out = []
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "splice"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "splice":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub if module_file(sub) else node.module, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                and MODULE_STRING.fullmatch(node.value) and module_file(node.value.split(":")[0]):
            out.append((node.value.split(":")[0], node.lineno))
    return out


def import_graph() -> tuple[nx.DiGraph, list[str]]:
    """The file graph (edges carry the imported module and line) and the unresolvable imports."""
    graph, unresolved = nx.DiGraph(), []
    for path in sorted(PKG.rglob("*.py")):
        file = rel(path)
        graph.add_node(file)
        for module, line in imported_modules(ast.parse(path.read_text(), file)):
            target = module_file(module)
            if target is None:
                unresolved.append(f"{file}:{line} -> {module} (no such module)")
            elif target != file:
                graph.add_edge(file, target, module=module, line=line)
    return graph, unresolved


def rule_broken(src: str, dst: str) -> str | None:
    """Why ``src`` may not import ``dst`` (``None``: it may)."""
    a, b = layer_of(src), layer_of(dst)
    if a is None:
        return "file has no layer: move it into one"
    if b is None:
        return "imported file has no layer"
    if a in ("api", "cli"):
        return None
    if b not in ALLOWED[a]:
        return f"layer {a} may not import layer {b}"
    fa, fb = family_of(src), family_of(dst)
    if fa and fb and fa != fb and fb not in SHARED_FAMILIES and dst not in SHARED_MODULES:
        return f"pass family {fa} may not import pass family {fb}"
    return None


def test_imports_follow_the_layers():
    graph, unresolved = import_graph()
    broken = list(unresolved)
    for src, dst, data in graph.edges(data=True):
        why = rule_broken(src, dst)
        if why:
            broken.append(f"{src}:{data['line']} -> {data['module']} ({why})")
    assert not broken, f"{len(broken)} layering violations:\n" + "\n".join(sorted(broken))


def shortest_cycle(graph: nx.DiGraph, nodes: set[str]) -> list[str]:
    """A shortest cycle through the strongly connected ``nodes``."""
    sub, best = graph.subgraph(nodes), None
    for a, b in sub.edges:
        path = nx.shortest_path(sub, b, a)
        if best is None or len(path) < len(best):
            best = path
    return best


def test_no_import_cycles_between_files():
    """One shortest cycle per strongly connected group of files (fix it, rerun for the next)."""
    graph, _ = import_graph()
    cycles = []
    for group in nx.strongly_connected_components(graph):
        if len(group) > 1:
            cycle = shortest_cycle(graph, group)
            steps = [f"{a} -> {graph.edges[a, b]['module']} (line {graph.edges[a, b]['line']})"
                     for a, b in zip(cycle, cycle[1:] + cycle[:1])]
            cycles.append(f"{len(group)} files in a cycle, e.g.:\n    " + "\n    ".join(steps))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def test_no_file_over_the_line_budget():
    long = {rel(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, "files over %d lines:\n" % MAX_LINES + "\n".join(f"{f}: {n}" for f, n in sorted(long.items()))


def test_every_file_has_a_layer():
    orphans = [f for f in map(rel, PKG.rglob("*.py")) if layer_of(f) is None]
    assert not orphans, "files in no layer (move them into one):\n" + "\n".join(sorted(orphans))


def test_the_checker_sees_lazy_submodule_and_string_imports():
    """The parser counts function-level imports and module strings (not docstrings) and resolves
    ``from pkg import submodule``."""
    tree = ast.parse('"""splice.eval.data"""\ndef f():\n    from splice.passes import manager\n    import splice.ir.graph\n'
                     '    importlib.import_module("splice.runtime.onnx")\n    return {"x": "splice.kernels.registry:record"}\n')
    assert sorted(imported_modules(tree)) == [("splice.ir.graph", 4), ("splice.kernels.registry", 6),
                                              ("splice.passes.manager", 3), ("splice.runtime.onnx", 5)]
    assert rule_broken("splice/ir/graph.py", "splice/passes/manager.py") == "layer ir may not import layer passes"
    assert rule_broken("splice/passes/adapters/lora.py", "splice/passes/quantize/gptq.py") \
        == "pass family adapters may not import pass family quantize"
    assert rule_broken("splice/passes/prune/sparsegpt.py", "splice/passes/quantize/_common.py") is None  # shared
    assert rule_broken("splice/passes/quantize/rtn.py", "splice/passes/instrument/observe.py") is None
