"""The package's imports go one way (docs/design.md §1): no cycle between its modules, and no ds_fp4 or launch.

Read from the source with ast, so an import inside a function or under `if __name__ == "__main__"`
counts as much as one at the top of the file.
"""

from __future__ import annotations

import ast
import pathlib

import data_pipeline

PACKAGE = pathlib.Path(data_pipeline.__file__).parent


def imports_of(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(modules of this package, top-level outside packages) that the file imports anywhere."""
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            inside.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                top, _, rest = name.partition(".")
                if top == "data_pipeline":
                    inside.add(rest.split(".")[0] or "__init__")
                else:
                    outside.add(top)
    return inside, outside


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports) as a path, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for dep in sorted(graph.get(module, ())):
            if cycle := visit(dep, [*path, module]):
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module, []):
            return cycle
    return None


def test_no_import_cycle_and_no_upward_import():
    graph, outside = {}, {}
    for path in sorted(PACKAGE.glob("*.py")):
        graph[path.stem], outside[path.stem] = imports_of(path)
    assert {"loader", "prepare", "cli"} <= set(graph)  # the walk saw the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert {m: o & {"ds_fp4", "launch"} for m, o in outside.items() if o & {"ds_fp4", "launch"}} == {}


def test_the_checks_see_what_they_look_for(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from . import a\nimport data_pipeline.loader\nimport ds_fp4.kernels\n")
    assert imports_of(tmp_path / "a.py") == ({"b"}, set())
    assert imports_of(tmp_path / "b.py") == ({"a", "loader"}, {"ds_fp4"})
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
