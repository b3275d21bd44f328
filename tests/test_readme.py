"""The README's Python examples run as written (the drop-in example above all)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README should show the drop-in example"
    namespace: dict = {}
    for block in blocks:  # later blocks use the model of the first
        exec(compile(block, str(README), "exec"), namespace)
    land, phi = namespace["land"], namespace["phi"]
    assert land.values.shape == (8, 41, 41)
    assert phi.phi.shape == (8,) and float(phi.mean) <= 0
