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
