"""The house rules of the package (issue "One house"), checked so they stay true: no module over
700 lines, thin entry points, no import cycle, few reaches into other objects' private state."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "esper_gym"
MAX_LINES = 700
MAX_ENTRY_POINT_LINES = 300  # train.py and evaluate.py together
MAX_PRIVATE_REACHES = 25


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(tree: ast.Module) -> set[str]:
    """Modules of esper_gym imported anywhere in `tree`, except under `if TYPE_CHECKING:`
    (annotations only: no import happens at run time)."""
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("esper_gym")}


def test_no_module_is_over_700_lines_and_the_entry_points_are_thin():
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}
    entry = sizes["esper_gym.train"] + sizes["esper_gym.evaluate"]
    assert entry <= MAX_ENTRY_POINT_LINES, entry


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(ast.parse(p.read_text())) & set(mods) for m, p in mods.items()}
    # A package's __init__ re-exporting its submodules is not a cycle of the code's own.
    graph = {
        m: {d for d in deps if d != m and not m.startswith(d + ".")} for m, deps in graph.items()
    }
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append([*path[path.index(d) :], d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_few_reaches_into_other_objects_private_state():
    reaches = []
    for m, p in _modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or (
                isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            ):
                continue
            reaches.append(f"{m}:{node.lineno} {ast.unparse(node)[:60]}")
    assert len(reaches) <= MAX_PRIVATE_REACHES, "\n".join(reaches)


def test_every_module_is_on_the_architecture_page():
    page = (ROOT.parent / "docs" / "architecture.md").read_text()
    missing = []
    for path in _modules().values():
        rel = path.relative_to(ROOT.parent).as_posix()
        if path.name == "__init__.py" and path.parent != ROOT:
            continue  # a subpackage's re-exports: its modules are listed
        # A line may list sibling modules after the first one's full path: `a/b.py`, `c.py`.
        if rel not in page and f"`{path.name}`" not in page:
            missing.append(rel)
    assert missing == []
