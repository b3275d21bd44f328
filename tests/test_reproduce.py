"""``fastland reproduce``: end to end on a tiny synthetic setting, resumability, the findings check."""
from __future__ import annotations

import csv
import json

import pytest

import fastland.experiments.jobs as jobs
import fastland.experiments.reproduce as rp
import fastland.experiments.train as tr
from fastland.experiments.evaluate import EvalSettings
from fastland.choices import PAPER_DEFENCES as DEFENCES
from fastland.experiments.paper import paper_settings
from fastland.experiments.train import Runtime

TINY_EVAL = EvalSettings(eps=25 / 255, alpha=6.25 / 255, steps=2, n_pgd=32, n_phi=3, phi_points=3, attack="strong",
                         n_strong=16, strong_steps=3, n_queries=20)
TINY = dict(epochs=1, train_size=64, batch_size=32, eval_settings=TINY_EVAL, runtime=Runtime(progress=False),
            figure_points=5)


def test_paper_tables_are_transcribed():
    t2 = rp.CONFIGS["fmnist-lenet"].paper
    assert (t2["none"].phi, t2["none"].clean, t2["none"].pgd) == (-9435.9, 91.53, 0.0)
    assert (t2["amsreg"].phi, t2["at"].pgd) == (-378.1, 62.64)
    t1 = rp.CONFIGS["cifar10-resnet18"].paper
    assert (t1["jacobian"].phi, t1["jacobian"].clean, t1["jacobian"].pgd) == (-1945.1, 82.28, 14.73)
    assert rp.CONFIGS["cifar10-ddnet"].dataset == "cifar10" and rp.CONFIGS["cifar10-ddnet"].model == "ddnet"


def test_paper_numbers_pass_every_finding():
    paper = {d: {"phi": r.phi, "clean_acc": r.clean, "pgd_acc": r.pgd}
             for d, r in rp.CONFIGS["fmnist-lenet"].paper.items()}
    checks = rp.findings(paper)
    assert len(checks) == 6 and all(ok for _, ok in checks)


def test_findings_fail_when_the_order_is_wrong():
    res = {"none": {"phi": -100.0, "clean_acc": 90.0, "pgd_acc": 30.0},
           "at": {"phi": -50.0, "clean_acc": 80.0, "pgd_acc": 20.0},
           "amsreg": {"phi": -60.0, "clean_acc": 89.0, "pgd_acc": 35.0}}
    got = dict(rp.findings(res))
    assert not got["adversarial training is the most robust under PGD"]
    assert not got["AMSReg has the flattest landscape (highest Φ)"]
    assert not got["no defence sits near 0% PGD accuracy (< 5%)"]
    assert not got["amsreg is far more robust than no defence (PGD acc. +10 points or more)"]
    assert not any("jacobian" in k for k in got)  # not run, not judged
    assert not got["clean accuracies within a few points of each other (max − min ≤ 5 points; ours 10.0)"]


def test_run_specs_use_the_papers_strengths_and_the_sweep():
    specs = rp.run_specs("cifar10-ddnet", epochs=3, sweep=True)
    main = {s.config.defence: s.config for s in specs if s.main}
    assert set(main) == set(DEFENCES)
    ps = paper_settings("cifar10")
    assert main["at"].at_eps == ps.at_eps and main["jacobian"].lam == 0.05 and main["amsreg"].lam == 1.0
    sweep = [s.config for s in specs if not s.main]
    assert sorted(c.at_eps for c in sweep if c.defence == "at") == pytest.approx(
        [ps.at_eps * f for f in (0.25, 0.5, 2.0)])
    assert sorted(c.lam for c in sweep if c.defence == "jacobian") == pytest.approx([0.0125, 0.025, 0.1])
    assert len({s.name for s in specs}) == len(specs)
    with pytest.raises(ValueError, match="setting: expected one of"):
        rp.run_specs("mnist-mlp", epochs=1)


def test_reproduce_end_to_end_then_rerun_skips_finished_work(tmp_path, monkeypatch):
    out = tmp_path / "repro"
    # one model interrupted after its first epoch: reproduce must resume it, not restart it
    c = rp.run_specs("synthetic-lenet", epochs=2, train_size=64, batch_size=32, defences=("none",))[0].config
    tr.train(c, out / "none", progress=False, stop_after=1)
    first_epoch = json.loads((out / "none" / "metrics.jsonl").read_text().splitlines()[0])

    report = rp.reproduce("synthetic-lenet", out, **{**TINY, "epochs": 2})
    assert report == out / "results.md"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run"] for r in rows] == list(DEFENCES)
    for r in rows:
        assert 0 <= float(r["clean_acc"]) <= 100 and 0 <= float(r["pgd_acc"]) <= 100
        assert float(r["phi"]) < 0 and r["epochs"] == "2"
        ev = json.loads((out / r["run"] / "eval.json").read_text())
        assert float(r["pgd_acc"]) == pytest.approx(ev["pgd_acc"], abs=0.01)
    resumed = json.loads((out / "none" / "metrics.jsonl").read_text().splitlines()[0])
    assert resumed == first_epoch  # epoch 1 kept from the interrupted run
    text = report.read_text()
    assert "| AMSReg (λ = 0.5) |" in text and "Findings of the paper" in text
    # the strong evaluation: a worst-case column, and per defence how much PGD-10 overstates it
    assert "worst case % ↑" in text and text.count("PGD-10 overstates robustness by") == len(DEFENCES)
    for r in rows:
        ev = json.loads((out / r["run"] / "eval.json").read_text())
        assert float(r["worst_case_acc"]) == pytest.approx(ev["worst_case_acc"], abs=0.01)
    for fig in ("fig1_landscapes", "fig3_histograms", "fig4_flatness_vs_robustness", "fig5_fgsm_landscapes"):
        assert (out / f"{fig}.png").stat().st_size > 0 and (out / f"{fig}.pdf").exists()
        assert f"({fig}.png)" in text

    # a rerun trains and evaluates nothing
    def boom(*a, **k):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(tr, "fit", boom)
    monkeypatch.setattr(jobs, "evaluate", boom)
    rp.reproduce("synthetic-lenet", out, **{**TINY, "epochs": 2}, figures=False)
    assert list(csv.DictReader((out / "results.csv").open())) == rows


def test_reproduce_paper_setting_with_missing_data_is_a_clear_error(tmp_path):
    from fastland.data import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="CIFAR-10"):
        rp.reproduce("cifar10-ddnet", tmp_path, epochs=1, runtime=Runtime(data_dir=str(tmp_path / "nothing"), progress=False))


@pytest.mark.parametrize("kwargs,name", [
    ({}, "fmnist-lenet-20ep"),
    ({"train_size": 10000}, "fmnist-lenet-20ep-10k"),
    ({"train_size": 1234, "batch_size": 64, "seed": 3}, "fmnist-lenet-20ep-1234-b64-seed3"),
])
def test_default_out_separates_runs_with_other_training_settings(kwargs, name):
    assert rp.default_out("fmnist-lenet", 20, **kwargs).parts == ("runs", "reproduce", name)



def test_the_attack_flat_defence_joins_a_reproduction_with_its_variant_and_strength():
    specs = rp.run_specs("synthetic-lenet", epochs=1, defences=("none", "attack_flat"), variant="directional",
                         attack_lam=0.3)
    assert [s.name for s in specs] == ["none", "attack_flat-directional-lam0.3"]
    c = specs[1].config
    assert (c.defence, c.variant, c.lam, c.at_eps) == ("attack_flat", "directional", 0.3, pytest.approx(10 / 255))
    assert "directional" in specs[1].label
    default = rp.run_specs("synthetic-lenet", epochs=1, defences=("attack_flat",))[0]
    assert default.name == "attack_flat-difference" and default.config.lam > 0


# --------------------------------------------------------------------------- seeds


def test_aggregate_gives_means_and_the_std_over_seeds_against_hand_values():
    evals = [{"clean_acc": 80.0, "pgd_acc": 10.0, "phi": -30.0, "n_strong": 16, "broken_by": {"clean": 20.0},
              "masking_flags": [], "overfitting_flags": ["train and test part"], "settings": {"a": 1}},
             {"clean_acc": 82.0, "pgd_acc": 12.0, "phi": -20.0, "n_strong": 16, "broken_by": {"clean": 18.0},
              "masking_flags": ["Square breaks more"], "overfitting_flags": [], "settings": {"a": 1}},
             {"clean_acc": 87.0, "pgd_acc": 8.0, "phi": -10.0, "n_strong": 16, "broken_by": {"clean": 13.0},
              "masking_flags": [], "overfitting_flags": [], "settings": {"a": 1}}]
    r = rp.aggregate(evals, [0, 1, 2])
    # mean 83, deviations -3, -1, 4: variance (9 + 1 + 16) / (3 - 1) = 13
    assert r["clean_acc"] == pytest.approx(83.0, abs=1e-12) and r["clean_acc_std"] == pytest.approx(13 ** 0.5, abs=1e-12)
    assert r["pgd_acc"] == 10.0 and r["pgd_acc_std"] == pytest.approx(2.0, abs=1e-12)  # (4 + 0 + 4) / 2
    assert r["phi_std"] == pytest.approx(10.0, abs=1e-12)
    assert r["broken_by"] == {"clean": pytest.approx(17.0)} and r["n_strong"] == 16 and isinstance(r["n_strong"], int)
    assert r["masking_flags"] == ["seed 1: Square breaks more"]
    assert r["overfitting_flags"] == ["seed 0: train and test part"]
    assert r["settings"] == {"a": 1} and r["n_seeds"] == 3 and "worst_case_acc_std" not in r
    one = rp.aggregate(evals[:1], [5])
    assert {k: v for k, v in one.items() if not k.endswith("_std") and k != "n_seeds"} == evals[0]
    assert one["clean_acc_std"] is None and one["n_seeds"] == 1
    with pytest.raises(ValueError, match="evals: expected one eval.json per seed"):
        rp.aggregate(evals, [0])
    assert rp.pm(1.234, None, 2) == "1.23" and rp.pm(1.234, 0.5, 1) == "1.2 ± 0.5"


def test_seed_specs_keep_the_base_folder_and_name_the_others_by_seed():
    spec = rp.run_specs("synthetic-lenet", epochs=1, defences=("at",), seed=3)[0]
    runs = rp.seed_specs(spec, 3)
    assert [r.name for r in runs] == ["at", "at-s4", "at-s5"] and [r.config.seed for r in runs] == [3, 4, 5]
    assert all(r.config == tr.TrainConfig(**{**r.config.to_dict(), "synthetic_shape": (1, 28, 28)}).resolved()
               for r in runs)
    assert rp.seed_specs(spec, 1) == [spec]
    with pytest.raises(ValueError, match="seeds: expected an integer >= 1, got 0"):
        rp.seed_specs(spec, 0)


def test_reproduce_with_two_seeds_trains_both_and_shows_the_spread(tmp_path):
    out = tmp_path / "repro"
    rp.reproduce("synthetic-lenet", out, **{**TINY, "defences": ("none",)}, seeds=2, figures=False)
    for run, seed in (("none", 0), ("none-s1", 1)):
        assert json.loads((out / run / "config.json").read_text())["seed"] == seed
        assert (out / run / "eval.json").exists()
    rows = {r["run"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows) == ["none"]
    for run, r in rows.items():
        e0, e1 = (json.loads((out / f / "eval.json").read_text()) for f in (run, f"{run}-s1"))
        assert r["seeds"] == "2"
        for key in ("clean_acc", "pgd_acc", "worst_case_acc"):
            assert float(r[key]) == pytest.approx((e0[key] + e1[key]) / 2, abs=0.006)
            assert float(r[f"{key}_std"]) == pytest.approx(abs(e0[key] - e1[key]) / 2 ** 0.5, abs=0.006)
        assert float(r["phi_std"]) == pytest.approx(abs(e0["phi"] - e1["phi"]) / 2 ** 0.5, abs=0.006)
    text = (out / "results.md").read_text()
    assert "Means over 2 seeds (seed 0 to 1)" in text
    none = rows["none"]
    assert f"| No defence | {float(none['phi']):.1f} ± {float(none['phi_std']):.1f} " in text
    assert f"| {float(none['clean_acc']):.2f} ± {float(none['clean_acc_std']):.2f} |" in text
