"""``fastland demo``: a tiny synthetic run writes the report and figures; the real one is slow."""
from __future__ import annotations

import json
import re

import pytest

from fastland.experiments.demo import DEMO_DEFENCES, run_demo
from fastland.experiments.train import Runtime


def _report_rows(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (.+?) \| (-?[\d.]+) ± [\d.na]+ \| ([\d.]+) \| ([\d.]+) \|", line)
        if m:
            rows[m.group(1)] = tuple(float(v) for v in m.group(2, 3, 4))
    return rows


def test_demo_on_synthetic_data_writes_report_with_figures(tmp_path):
    report = run_demo(tmp_path, epochs=1, train_size=64, n_eval=32, n_phi=3, dataset="synthetic",
                      runtime=Runtime(progress=False))
    assert report == tmp_path / "report.md"
    text = report.read_text()
    rows = _report_rows(text)
    assert set(rows) == set(DEMO_DEFENCES.values())
    for defence, label in DEMO_DEFENCES.items():
        ev = json.loads((tmp_path / defence / "eval.json").read_text())
        phi, clean, pgd = rows[label]
        assert (round(ev["phi"], 1), round(ev["clean_acc"], 2), round(ev["pgd_acc"], 2)) == (phi, clean, pgd)
        assert ev["n_clean"] == 32 and ev["n_phi"] == 3
        assert (tmp_path / defence / "model.pt").exists()
    for fig in ("landscapes", "landscapes_fgsm"):
        assert (tmp_path / f"{fig}.png").stat().st_size > 0 and (tmp_path / f"{fig}.pdf").exists()
        assert f"]({fig}.png)" in text


def _fmnist_available() -> bool:
    from fastland.data import load_dataset

    try:
        load_dataset("fmnist", "test")
    except FileNotFoundError:
        return False
    return True


@pytest.mark.slow
def test_real_demo_shows_amsreg_flatter_than_no_defence(tmp_path):
    """The demo as `make demo` runs it (minutes on 2 cores)."""
    if not _fmnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    report = run_demo(tmp_path, runtime=Runtime(progress=False))
    rows = _report_rows(report.read_text())
    none, ams = rows[DEMO_DEFENCES["none"]], rows[DEMO_DEFENCES["amsreg"]]
    assert ams[0] > none[0]  # Φ: AMSReg flatter
    assert none[1] > 80 and ams[1] > 75  # both learned
    assert ams[2] > none[2]  # more robust under PGD
