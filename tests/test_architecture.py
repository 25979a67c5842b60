"""The layering of ARCHITECTURE.md, checked on the source: no import circles, and no import that goes up a layer.

Every ``import`` counts, module-level or inside a function: a circle hidden in a function still means
neither module can be read or changed alone.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders of the repository and the package names they install under (pyproject.toml's package-dir).
FOLDERS = {"starflow_mlx": "starflow_mlx", "convert": "starflow_mlx.convert", "quantize": "starflow_mlx.quantize",
           "apps": "starflow_mlx.apps", "benchmarks": "starflow_mlx.benchmarks"}

# Lowest first; a module may import from its own layer and those below it (ARCHITECTURE.md says why).
LAYERS = {
    "base": ["advice", "jsonconfig", "config", "safe_text", "progress", "blas", "byte_sizes"],
    "model": ["models", "sampling"],
    "io": ["io", "convert", "quantize"],
    "pipelines": ["pipelines", "training"],
    "products": ["coreml", "server", "apps", "benchmarks", "__main__"],
}
RANK = {part: rank for rank, parts in enumerate(LAYERS.values()) for part in parts}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if folder == "starflow_mlx" and parts[0] in FOLDERS:
                continue  # not installed from here
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {name: set() for name in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package's __init__: its version and the BLAS hook; public names load lazily, on first use
    if parts[1] not in RANK:
        raise AssertionError(f"{module} has no layer: add it to ARCHITECTURE.md and LAYERS in this test")
    return RANK[parts[1]]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(
        " <-> ".join(group) + " (" + ", ".join(f"{a} -> {b}" for a in group for b in sorted(graph[a]) if b in group)
        + ")" for group in found)


def test_no_import_goes_up_a_layer():
    graph = import_graph()
    upward = [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]) if layer(b) > layer(a)]
    assert not upward, "imports that go up a layer (see ARCHITECTURE.md): " + ", ".join(upward)


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_circle_finder_finds_circles(edges, expected):
    """The check itself can fail: a planted circle is found, a chain is not."""
    assert circles(edges) == expected


def test_help_lists_the_commands_under_the_readme_tours_headings_in_its_order():
    """`starflow --help` and `python -m starflow_mlx --help` group commands as the README's tour does."""
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    tour = readme[readme.index("## A short tour"):].split("\n## ", 1)[0]
    headings = [h for h in re.findall(r"^### (.*)$", tour, re.M) if h != "Python"]
    for argv in (["-c", "from starflow_mlx.apps.cli import main; main()", "--help"], ["-m", "starflow_mlx", "--help"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120).stdout
        sections = [s for s in re.findall(r"^(\S[^:\n]*):$", out, re.M) if s != "Options"]
        assert sections == headings, f"help sections {sections} are not the README tour's {headings}"
