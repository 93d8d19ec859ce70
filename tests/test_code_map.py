"""The code as a map (docs/architecture.md): no import cycle between cnexp's modules, no module
over 350 lines, no function over 80, run.py a thin entry point. Read from source: nothing here
imports the package."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "cnexp"
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_ENTRY_LINES = 350, 80, 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def never_at_import(node: ast.AST, parents: dict) -> bool:
    """Under `if TYPE_CHECKING:` (a type checker's) or `if __name__ == "__main__":` (the module
    run as a program, `python -m ...`): no arrow when the module is imported."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and any(word in ast.unparse(node.test)
                                            for word in ("TYPE_CHECKING", "__main__")):
            return True
    return False


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The cnexp modules `path` imports, at module level or inside functions (a lazy import is
    still an arrow), leaving out those that never run on import."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if never_at_import(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
                      else node.module for alias in node.names}
    return found & known


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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


def test_no_import_cycle():
    known = modules()
    graph = {name: imports_of(path, set(known)) - {name} for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    (tmp_path / "m.py").write_text("def f():\n    from cnexp.fid import x\n")
    assert imports_of(tmp_path / "m.py", {"cnexp.fid"}) == {"cnexp.fid"}


def test_no_module_or_function_is_too_long():
    long_modules, long_functions = [], []
    for name, path in modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert long_modules == [] and long_functions == []


def test_run_py_is_a_thin_entry_point():
    assert len((ROOT / "run.py").read_text().splitlines()) <= MAX_ENTRY_LINES
