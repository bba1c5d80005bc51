"""The layers import only downwards: nothing imports generate.py (the command line), and the project's modules form
no import cycle, counting imports made inside functions (which would otherwise hide one)."""
import ast
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
PACKAGES = ("kv_cache", "kernels", "scripts")  # one node each: imports inside a package are its own business


def project_files() -> list[Path]:
    files = sorted(REPO_DIR.glob("*.py"))
    for package in PACKAGES:
        files += sorted((REPO_DIR / package).rglob("*.py"))
    return files


def node_of(path: Path) -> str:
    relative = path.relative_to(REPO_DIR)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported(path: Path) -> set[str]:
    """The project nodes a file imports, anywhere in it."""
    nodes = {node_of(p) for p in project_files()}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {name.split(".")[0] for name in names} & nodes
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in project_files():
        node = node_of(path)
        edges.setdefault(node, set()).update(imported(path) - {node})
    return edges


def test_nothing_imports_the_command_line():
    importers = [str(path.relative_to(REPO_DIR)) for path in project_files()
                 if path.name != "generate.py" and "generate" in imported(path)]
    assert not importers, f"these import generate.py: {importers}"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}  # node -> "open" while on the path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checks above are only as good as imported(): it must see a lazy import."""
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    import engine\n    from kv_cache.paging import BlockPool\n")
    assert imported(lazy) == {"engine", "kv_cache"}
