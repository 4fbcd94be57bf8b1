"""The house stays small: no module of ddm over 400 lines, no import cycle between its modules, and
the data stage independent of the launchers (it runs on its own, on any Ray cluster)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddm"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of ddm (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, node: ast.AST, known: dict[str, Path]) -> set[str]:
    """The ddm modules one import statement of module ``name`` imports."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, up level - 1 more
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = set()
    for target in targets:
        while target and target not in known:  # `import ddm.a.b` of a module: its nearest module
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def module_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported (or type-check it): at the top level,
    also inside top-level if/try blocks (``if TYPE_CHECKING:`` included), never inside functions."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            stack += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            stack += [s for h in getattr(node, "handlers", []) for s in h.body]


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along a seam): {long}"


def test_module_level_imports_have_no_cycle():
    known = modules()
    graph = {
        name: set().union(*[imported(name, path, n, known) for n in module_level_imports(ast.parse(path.read_text()))])
        for name, path in known.items()
    }
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after

    def cycle_from(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        path.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := cycle_from(dep, path)):
                return found
        path.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            found = cycle_from(name, [])
            assert found is None, "import cycle: " + " -> ".join(found)


def test_data_stage_does_not_import_the_launchers():
    known = modules()
    offenders = {}
    for name, path in known.items():
        if name == "ddm.data" or name.startswith("ddm.data."):
            tree = ast.parse(path.read_text())
            nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]  # functions too
            hits = {m for n in nodes for m in imported(name, path, n, known) if m.startswith("ddm.launchers")}
            if hits:
                offenders[name] = sorted(hits)
    assert not offenders, f"ddm.data modules importing ddm.launchers: {offenders}"
