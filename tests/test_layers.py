"""The import layering the README's Design section states, read from the source (no imports run):
no circle, nothing below the front-ends imports them, and the front-ends never import each other."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
FRONT_ENDS = ("cmlora.app",)
#: Front-end modules that serve several commands; they import no front-end themselves.
APP_SHARED = {"cmlora.app", "cmlora.app.arguments", "cmlora.app.method_flags"}
DISPATCHER = "cmlora.app.cli"


def module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        tree = ast.parse(path.read_text())
        typing_only = {  # imports under `if TYPE_CHECKING:` never run
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for inner in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".")
                target = base if node.level else (node.module or "")
                for alias in node.names:
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def is_front_end(name: str) -> bool:
    return name.startswith(FRONT_ENDS)


def front_end_of(name: str) -> str:
    """The front-end a module belongs to: cmlora.app.<x> (first level, e.g. cmlora.app.ui)."""
    parts = name.split(".")
    return ".".join(parts[:3])


def test_graph_is_read():
    graph = module_graph()
    assert "cmlora.api" in graph["cmlora"]
    assert {"cmlora.request", "cmlora.methods"} <= graph["cmlora.api"]
    assert "cmlora.app.generate" in graph["cmlora.app.cli"]


def test_no_import_circle():
    graph = module_graph()
    seen, done, circles = set(), set(), []

    def visit(node, path):
        seen.add(node)
        for dep in sorted(graph[node]):
            if dep in path:
                circles.append(path[path.index(dep) :] + [dep])
            elif dep not in done and dep not in seen:
                visit(dep, path + [dep])
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    assert circles == []


def test_nothing_below_imports_a_front_end():
    wrong = {
        (name, dep)
        for name, deps in module_graph().items()
        if not is_front_end(name)
        for dep in deps
        if is_front_end(dep)
    }
    assert wrong == set()


def test_front_ends_never_import_each_other():
    wrong = set()
    for name, deps in module_graph().items():
        if not is_front_end(name) or name == DISPATCHER or name in APP_SHARED:
            continue
        for dep in deps:
            if is_front_end(dep) and dep not in APP_SHARED and front_end_of(dep) != front_end_of(name):
                wrong.add((name, dep))
    assert wrong == set()
    shared_imports = {dep for name in APP_SHARED for dep in module_graph().get(name, ()) if is_front_end(dep)}
    assert shared_imports <= APP_SHARED
