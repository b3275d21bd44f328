"""Packaging: import cost and side effects, public names, the extension switch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fastland


def _run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_import_initialises_no_cuda_and_imports_nothing_heavy():
    code = (
        "import sys, json, torch, fastland\n"
        "print(json.dumps({'cuda': torch.cuda.is_initialized(),"
        " 'heavy': [m for m in ('matplotlib', 'triton', 'torchvision') if m in sys.modules],"
        " 'version': fastland.__version__}))"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"cuda": False, "heavy": [], "version": fastland.__version__}


def test_import_works_without_the_extension():
    code = (
        "import warnings, torch, fastland\n"
        "from fastland import _ext\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert _ext.extension_available() is False\n"
        "    assert _ext.extension_available() is False\n"
        "print(len(w))\n"
        "print(fastland.log_likelihood(torch.zeros(2, 3)).tolist())"
    )
    res = _run(code, FASTLAND_SKIP_EXT="1")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert lines[0] == "0"  # the skip switch is deliberate: no warning, reference backend


def test_extension_is_built_with_openmp():
    """CI builds the extension (`make test` installs with it): it must load and use OpenMP."""
    from fastland import _ext

    if not _ext.extension_available():
        pytest.skip("fastland._C not built in this environment")
    import fastland._C as C

    assert C.openmp is True


@pytest.mark.parametrize("name", sorted(fastland.__all__))
def test_every_public_name_resolves(name):
    assert getattr(fastland, name) is not None


def test_the_library_loads_no_experiments_cli_plotting_or_tooling_module():
    """Touching every public name of ``fastland`` loads only the library layer."""
    code = (
        "import sys, json, fastland\n"
        "[getattr(fastland, n) for n in fastland.__all__]\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fastland.experiments')"
        " or m in ('matplotlib', 'tools') or m.startswith('tools.'))))"
    )
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_no_library_module_imports_the_experiments_layer():
    """The experiments layer imports the library, never the reverse (``__main__`` is the CLI's door)."""
    import pathlib
    import re

    root = pathlib.Path(fastland.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "experiments" or rel.name == "__main__.py":
            continue
        text = path.read_text()
        if re.search(r"^\s*(from|import)\s+(\.+|fastland\.)experiments", text, re.M):
            offenders.append(str(rel))
    assert offenders == []


@pytest.mark.parametrize("name", ["cli", "plot", "train", "evaluate", "reproduce", "demo", "runs", "paper"])
def test_experiment_modules_import(name):
    import importlib

    assert importlib.import_module(f"fastland.experiments.{name}").__name__ == f"fastland.experiments.{name}"


def test_unknown_attribute_is_a_clear_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastland.nope  # noqa: B018


def _import_graph() -> dict:
    """Module -> the fastland modules it imports, at module level or inside functions (parsed with ``ast``).

    ``from P import name`` is an edge to ``P.name`` when that is a module, else to ``P``;
    relative imports are resolved against the importing module's package.
    """
    import ast
    import pathlib

    root = pathlib.Path(fastland.__file__).parent

    def name_of(path: pathlib.Path) -> str:
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in root.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    edges.add(sub if sub in modules else target)
        graph[mod] = sorted(e for e in edges if e in modules and e != mod)
    return graph


def _find_cycle(graph: dict) -> list:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]`` when it is acyclic."""
    state: dict = {}
    stack: list = []

    def visit(u: str) -> list:
        state[u] = "open"
        stack.append(u)
        for v in graph[u]:
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        stack.pop()
        state[u] = "done"
        return []

    for u in sorted(graph):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return []


def test_find_cycle_finds_a_cycle_and_passes_a_tree():
    assert _find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_import_graph_sees_module_level_function_level_and_relative_imports():
    graph = _import_graph()
    assert "fastland._checks" in graph["fastland.measures"]  # module level, relative
    assert "fastland.attacks.pgd" in graph["fastland.neighbourhood"]  # inside fgsm_direction
    assert "fastland.reference_ops" in graph["fastland.ops.grid_combine"]  # from .. import module
    assert "fastland.ops._scaffold" in graph["fastland.ops"]  # a package's own submodule


def test_no_import_cycle_among_fastland_modules():
    """No chain of imports (module-level or inside functions) leads from a fastland module back to itself."""
    cycle = _find_cycle(_import_graph())
    assert cycle == [], "import cycle: " + " -> ".join(cycle)
