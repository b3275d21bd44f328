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


@pytest.mark.parametrize("name", sorted(set(fastland.__all__) - {"cli", "plot", "train"}))
def test_every_public_name_resolves(name):
    assert getattr(fastland, name) is not None


@pytest.mark.parametrize("name", ["cli", "plot", "train"])
def test_heavy_submodules_resolve(name):
    assert getattr(fastland, name).__name__ == f"fastland.{name}"


def test_unknown_attribute_is_a_clear_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastland.nope  # noqa: B018
