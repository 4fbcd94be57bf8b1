"""The house shows its architecture and keeps it: ddm's top level holds packages only, each package's
``__init__.py`` says which packages it may import (a line ``May import: core, store.``), those lines
order the packages in layers, and the code keeps to them; no import cycle between modules, imports
inside functions included; an import inside a function says why it waits; no module over 400 lines."""

import ast
import re
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


def all_imports(known: dict[str, Path]) -> dict[str, list[tuple[ast.AST, set[str]]]]:
    """Module -> every import statement in it (functions included) with the ddm modules it imports."""
    out = {}
    for name, path in known.items():
        nodes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        out[name] = [(n, imported(name, path, n, known)) for n in nodes]
    return out


def package_of(module: str) -> str:
    """``ddm.store.lease`` -> ``store``; the root package ``ddm`` (its version) is ``ddm``."""
    return module.split(".")[1] if "." in module else "ddm"


def allowed() -> dict[str, set[str]]:
    """Package -> the packages its ``__init__.py`` says it may import."""
    out = {}
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        line = re.search(r"^May import: (.*)$", doc, re.M)
        assert line, f"{init}: its docstring needs a line 'May import: <packages>.' (or 'nothing of ddm.')"
        names = line.group(1).rstrip(".")
        out[init.parent.name] = set() if names == "nothing of ddm" else {p.strip() for p in names.split(",")}
    return out


def test_the_top_level_holds_packages_only():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules at ddm's top level (move each into the package of its concern): {loose}"


def test_the_packages_form_layers():
    """The 'May import' lines order the packages: no package may import one that may import it."""
    rules = allowed()
    unknown = {p: sorted(d - set(rules)) for p, d in rules.items() if d - set(rules)}
    assert not unknown, f"'May import' names packages that do not exist: {unknown}"
    order: list[str] = []
    left = dict(rules)
    while left:
        ready = sorted(p for p, deps in left.items() if deps <= set(order))
        assert ready, f"the 'May import' lines of these packages form a circle: {sorted(left)}"
        order += ready
        for p in ready:
            del left[p]


def test_every_import_keeps_to_its_packages_layer():
    rules = allowed()
    known = modules()
    offenders = []
    for name, statements in all_imports(known).items():
        mine = package_of(name)
        for node, targets in statements:
            for target in targets:
                theirs = package_of(target)
                if theirs not in (mine, "ddm") and theirs not in rules.get(mine, set()):
                    offenders.append(f"{name}:{node.lineno} imports {target} ({mine} may not import {theirs})")
    assert not offenders, "imports against the package order:\n" + "\n".join(offenders)


def test_no_import_cycle_counting_imports_inside_functions():
    known = modules()
    graph = {name: set().union(*[t for _, t in statements]) for name, statements in all_imports(known).items()}
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


def test_imports_inside_functions_say_why_they_wait():
    """A ddm import inside a function defers something heavy on purpose (torch for ``--help``, a
    worker's stack): a comment on its line, or the line above, says what."""
    known = modules()
    silent = []
    for name, path in known.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top = {id(n) for n in module_level_imports(tree)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                if not imported(name, path, node, known):
                    continue  # not of ddm
                said = lines[node.lineno - 1 : node.end_lineno] + [lines[node.lineno - 2]]
                if not any("#" in line for line in said):
                    silent.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not silent, "imports inside functions without a reason (import at the top, or say why):\n" + "\n".join(
        silent
    )


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along a seam): {long}"
