"""The source distribution holds everything the build and the tests need.

Builds the sdist (``python -m build --sdist --no-isolation``) from a copy of the
checkout's files (tracked and untracked-but-not-ignored) in a temporary folder,
so the shared checkout gets no ``*.egg-info``, and checks its file list. Skips
without ``build`` or outside a git checkout (e.g. when run from an unpacked sdist).
The slow test builds the wheel from the sdist alone and runs a smoke test of the
installed package (``make sdist-check`` does the same from the command line).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "Makefile")


def _checkout_files() -> List[str]:
    """Paths (relative, posix) of the working tree's files that git does not ignore."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()
    return sorted(p for p in set(out.split("\0")) if p and (ROOT / p).is_file())


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist ``.tar.gz`` built from a copy of the checkout."""
    pytest.importorskip("build", reason="the 'build' package is not installed (pip install build)")
    files = _checkout_files()
    src = tmp_path_factory.mktemp("src")
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "FASTLAND_SKIP_EXT": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (tarball,) = out.glob("fastland-*.tar.gz")
    return tarball


def _members(tarball: Path) -> List[str]:
    """Member paths with the leading ``fastland-<version>/`` removed."""
    with tarfile.open(tarball) as tf:
        return sorted(m.name.split("/", 1)[1] for m in tf.getmembers() if m.isfile() and "/" in m.name)


def test_sdist_holds_every_file_the_build_and_tests_need(sdist: Path) -> None:
    files, members = _checkout_files(), set(_members(sdist))
    wanted = [p for p in files if p.startswith("csrc/")]
    assert any(p.endswith(".h") for p in wanted) and any(p.endswith(".cpp") for p in wanted)
    wanted += list(BUILD_FILES)
    wanted += [p for p in files if p.startswith("fastland/") and p.endswith(".py")]
    wanted += [p for p in files if p.startswith("tests/") and p.endswith(".py")]
    wanted += [p for p in files if p.startswith("docs/")]
    wanted += [p for p in files if p.startswith("tools/") and p.endswith(".py")]  # the tests use them
    missing = sorted(set(wanted) - members)
    assert not missing, f"the sdist lacks {missing}"


def test_sdist_holds_no_build_output(sdist: Path) -> None:
    bad = [m for m in _members(sdist)
           if m.endswith((".so", ".pyc", ".pyd")) or "__pycache__" in m or m.startswith((".venv/", "runs/", "build/"))]
    assert not bad, bad


@pytest.mark.slow
def test_wheel_from_sdist_alone_installs_and_runs(sdist: Path, tmp_path: Path) -> None:
    """Unpack the sdist, build the wheel there (the C++ extension included), install it
    into a fresh folder and use it from outside the checkout: import, the compiled
    kernels, one penalty with its backward, the CLI entry point."""
    with tarfile.open(sdist) as tf:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tf.extractall(tmp_path, filter="data")
        else:  # pragma: no cover - our own sdist, just built
            tf.extractall(tmp_path)
    (src,) = [p for p in tmp_path.iterdir() if p.name.startswith("fastland-")]
    env = {k: v for k, v in os.environ.items() if k != "FASTLAND_SKIP_EXT"}
    wheels = tmp_path / "wheels"
    run = dict(capture_output=True, text=True, env=env, cwd=tmp_path)
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(wheels),
                           str(src)], timeout=900, **run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = wheels.glob("fastland-*.whl")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], timeout=300, **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    smoke = (
        "import torch, fastland, fastland._C, pathlib; "
        f"assert pathlib.Path(fastland.__file__).is_relative_to({str(site)!r}), fastland.__file__; "
        "m = fastland.testing.tiny_cnn(n_classes=4, size=6); x = torch.rand(3, 1, 6, 6, requires_grad=True); "
        "fastland.amsreg_loss(m(x), x).backward(); print('smoke ok')"
    )
    env_site = {**env, "PYTHONPATH": str(site), "FASTLAND_BACKEND": "cpp"}
    proc = subprocess.run([sys.executable, "-c", smoke], capture_output=True, text=True, env=env_site,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "smoke ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
