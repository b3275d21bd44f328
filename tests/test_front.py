"""``fastland front``: the points and their configs, cost shares, the front, the table and the figure."""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import pytest

import fastland.experiments.front as fr
from fastland.choices import ATTACK_PENALTY_VARIANTS, DEFENCES
from fastland.experiments.cli import build_parser, main
from fastland.experiments.commands import _train_config
from fastland.experiments.evaluate import default_eval_settings
from fastland.experiments.train import Runtime

NAMES = ["none", "jacobian", "amsreg", "at", "fgsm_rs-a1.25", "fgsm_rs-a2", "trades-b1", "trades-b6",
         "directional-lam32", "directional-lam64", "directional-lam128"]


# the baselines and the paper's defences on or near the front: the front's seeds each
THREE_SEEDS = {"none", "amsreg", "at", "fgsm_rs-a1.25", "fgsm_rs-a2", "trades-b6", "kl-lam12", "kl-lam48"}


def test_the_points_are_the_named_ones_and_the_dominated_have_one_seed():
    names = [p.name for p in fr.POINTS]
    assert names[:len(NAMES)] == NAMES
    assert all(n.startswith(("margin-lam", "kl-lam")) for n in names[len(NAMES):])
    one = {p.name for p in fr.POINTS if p.seeds == 1}
    assert not one & THREE_SEEDS
    assert {"jacobian", "trades-b1", "directional-lam32"} <= one
    assert all(p.note == ("one seed" if p.name in one else "") for p in fr.POINTS)


def _cli_flags(point: fr.Point) -> list:
    o = point.overrides
    flags = ["--defence", o["defence"]]
    if "variant" in o:
        flags += ["--variant", o["variant"]]
    if "lam" in o:
        flags += ["--lam", f"{o['lam']:g}"]
    if "at_alpha" in o:
        flags += ["--at-alpha", {fr.POINTS[4].name: "12.5/255", fr.POINTS[5].name: "20/255"}[point.name]]
    if "beta" in o:
        flags += ["--beta", f"{o['beta']:g}"]
    return flags


@pytest.mark.parametrize("point", fr.POINTS, ids=lambda p: p.name)
def test_each_points_config_is_what_fastland_train_trains(point):
    if point.overrides["defence"] not in DEFENCES or point.overrides.get("variant", "difference") \
            not in ATTACK_PENALTY_VARIANTS:
        pytest.skip(f"{point.name}: its defence is not in this version")
    for seed in (0, 2):
        argv = ["train", *_cli_flags(point), "--epochs", "20", "--seed", str(seed)]
        args = build_parser().parse_args(argv)
        args.given = set()
        assert fr.point_config(point, epochs=20, seed=seed).to_dict() == _train_config(args).resolved().to_dict()
    alpha = fr.point_config(point, epochs=20, seed=0).at_alpha
    if point.name == "fgsm_rs-a1.25":
        assert alpha == pytest.approx(1.25 * 10 / 255, rel=1e-15)
    if point.name == "fgsm_rs-a2":
        assert alpha == pytest.approx(2 * 10 / 255, rel=1e-15)


def test_cost_share_is_the_defences_step_over_ats_and_a_missing_file_is_none(tmp_path):
    path = tmp_path / "front.json"
    assert fr.step_costs(path) is None
    path.write_text(json.dumps({"benchmarks": [
        {"param": "at", "stats": {"mean": 0.20}}, {"param": "none", "stats": {"mean": 0.02}},
        {"param": "attack_flat-directional", "stats": {"mean": 0.07}}]}))
    costs = fr.step_costs(path)
    assert costs == {"at": 0.20, "none": 0.02, "attack_flat-directional": 0.07}
    cfg = {p.name: fr.point_config(p, epochs=1, seed=0) for p in fr.POINTS if p.name in ("none", "amsreg", "at")}
    assert fr.cost_share(cfg["none"], costs) == pytest.approx(0.1)
    assert fr.cost_share(cfg["at"], costs) == 1.0
    assert fr.cost_share(cfg["amsreg"], costs) is None  # not measured
    flat = fr.point_config(fr.POINTS[8], epochs=1, seed=0)
    assert fr.cost_share(flat, costs) == pytest.approx(0.35)
    assert fr.cost_share(cfg["none"], None) is None
    path.write_text("{}")
    with pytest.raises(ValueError, match="costs: expected a pytest-benchmark JSON"):
        fr.step_costs(path)


def test_non_dominated_points_by_hand():
    #              cheap+weak  dear+strong  dominated   equal to #0  costs as #1, weaker
    cost = [0.1, 1.0, 0.5, 0.1, 1.0]
    robust = [10.0, 40.0, 9.0, 10.0, 35.0]
    assert fr.non_dominated(cost, robust) == [True, True, False, True, False]
    assert fr.non_dominated([0.3], [1.0]) == [True]


def test_costs_within_the_resolution_count_as_equal():
    # 2% cheaper but far weaker: not on the front at the 5% resolution, on it without one
    cost, robust = [0.229, 0.234], [31.6, 47.5]
    assert fr.non_dominated(cost, robust) == [False, True]
    assert fr.non_dominated(cost, robust, cost_resolution=0.0) == [True, True]
    # 10% cheaper is cheaper
    assert fr.non_dominated([0.21, 0.234], [31.6, 47.5]) == [True, True]


# --------------------------------------------------------------------------- the table on fake runs


def _fake_run(out: Path, point: fr.Point, seed: int, s, **numbers) -> dict:
    """A finished, evaluated run folder (no weights: the front reads only its files)."""
    run = out / f"{point.name}-s{seed}"
    run.mkdir(parents=True)
    cfg = fr.point_config(point, epochs=2, seed=seed, setting="synthetic-lenet", train_size=64)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "model.pt").write_bytes(b"")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "time_s": 1.0}) + "\n")
    ev = {"phi_stderr": 1.0, "anisotropy": 2.0, "fgsm_acc": 50.0, "masking_flags": [], "overfitting_flags": [],
          "settings": json.loads(json.dumps(asdict(s))), **numbers}
    (run / "eval.json").write_text(json.dumps(ev))
    return ev


def test_front_table_and_figure_from_finished_runs_marking_what_is_missing(tmp_path):
    s = default_eval_settings("synthetic", attack="strong")
    pts = {p.name: p for p in fr.POINTS}
    out = tmp_path / "front"
    numbers = {  # point -> per seed (clean, pgd, worst, phi, phi_fgsm)
        "none": [(90.0, 1.0, 0.0, -50.0, -2.0), (91.0, 2.0, 0.5, -60.0, -2.5), (92.5, 0.0, 0.0, -55.0, -2.2)],
        "at": [(80.0, 50.0, 40.0, -10.0, -0.4), (79.0, 48.0, 38.0, -12.0, -0.5)],  # seed 2 missing
        "amsreg": [(85.0, 20.0, 5.0, -5.0, -0.3)] * 3,
        "jacobian": [(86.0, 25.0, 2.0, -8.0, -0.6)],  # one seed
    }
    flags = {("none", 1): ["Square breaks more than 1%"]}
    for name, seeds in numbers.items():
        for k, (c, p, w, phi, af) in enumerate(seeds):
            _fake_run(out, pts[name], k, s, clean_acc=c, pgd_acc=p, worst_case_acc=w, phi=phi, attack_flat=af,
                      **({"masking_flags": flags[(name, k)]} if (name, k) in flags else {}))
    (out / "at-s2").mkdir()
    (out / "at-s2" / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")  # still training
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"benchmarks": [{"param": p, "stats": {"mean": m}} for p, m in
                                                (("none", 0.01), ("at", 0.1), ("amsreg", 0.02), ("jacobian", 0.03))]}))
    fig = tmp_path / "docs" / "front.png"
    report = fr.front(out, epochs=2, seeds=3, points=["none", "jacobian", "amsreg", "at", "trades-b6"],
                      eval_settings=s, costs=costs, figure=fig, train=False, setting="synthetic-lenet",
                      train_size=64, runtime=Runtime(progress=False))
    assert report == out / "front.md"
    rows = {r["point"]: r for r in csv.DictReader((out / "front.csv").open())}
    assert list(rows) == ["none", "jacobian", "amsreg", "at", "trades-b6"]
    for name, seeds in numbers.items():
        r = rows[name]
        assert int(r["seeds"]) == len(seeds)
        for i, key in enumerate(("clean_acc", "pgd_acc", "worst_case_acc", "phi", "attack_flat")):
            vals = [t[i] for t in seeds]
            assert float(r[key]) == pytest.approx(statistics.fmean(vals), abs=0.006)
            if len(vals) > 1:
                assert float(r[f"{key}_std"]) == pytest.approx(statistics.stdev(vals), abs=0.006)
            else:
                assert r[f"{key}_std"] == ""
    # clean none std by hand: mean 91.1667, deviations -1.1667, -0.1667, 1.3333 -> sqrt(3.1667 / 2) = 1.2583
    assert float(rows["none"]["clean_acc_std"]) == pytest.approx(1.26, abs=0.006)
    # cost 0.1 / 0.3 / 0.2 / 1.0 of at; worst 0.17 / 2 / 5 / 39: every point is on the front but jacobian
    assert {n: r["cost_share"] for n, r in rows.items()} == {"none": "0.1", "jacobian": "0.3", "amsreg": "0.2",
                                                          "at": "1.0", "trades-b6": ""}
    assert {n: r["on_front"] for n, r in rows.items()} == {"none": "yes", "jacobian": "no", "amsreg": "yes",
                                                        "at": "yes", "trades-b6": ""}
    assert rows["none"]["masking_flags"] == "seed 1: Square breaks more than 1%"
    assert "at-s2: training, epoch 1/2" in rows["at"]["missing"]
    text = report.read_text()
    assert "| at | 2/3 |" in text and "| jacobian | 1 (one seed) |" in text
    assert "| trades-b6 | 0/3 | missing |" in text and "- trades-b6-s0: not started" in text
    assert "- **none**: ⚠ seed 1: Square breaks more than 1%" in text and "| 1 masking, 0 overfitting |" in text
    assert f"| {float(rows['none']['clean_acc']):.2f} ± {float(rows['none']['clean_acc_std']):.2f} |" in text
    assert "![front](front.png)" in text
    assert (out / "front.png").stat().st_size > 0 and fig.read_bytes() == (out / "front.png").read_bytes()

    assert text.startswith("# fastland front synthetic-lenet\n\nlenet on synthetic, 2 epochs per model.")
    # no cost file: the cost column says so, nothing is on the front, no figure (the old one removed), no crash
    fr.front(out, epochs=2, seeds=3, points=["none", "at"], eval_settings=s, costs=tmp_path / "absent.json",
             train=False, setting="synthetic-lenet", train_size=64, runtime=Runtime(progress=False))
    text = (out / "front.md").read_text()
    assert "not measured (run benchmarks/bench_front.py" in text and not (out / "front.png").exists()
    assert [r["cost_share"] for r in csv.DictReader((out / "front.csv").open())] == ["", ""]


def test_front_rejects_unknown_points(tmp_path):
    with pytest.raises(ValueError, match=r"points: expected a non-empty subset of \['none'"):
        fr.front(tmp_path, points=["none", "magic"], train=False)


def test_front_command_help_and_a_table_of_nothing_finished(tmp_path, capsys):
    assert main(["front", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--seeds SEEDS" in text and "--jobs JOBS" in text and "--no-train" in text and "--figure" in text
    assert main(["front", "--out", str(tmp_path / "f"), "--no-train", "--points", "none,at",
                 "--costs", str(tmp_path / "none.json")]) == 0
    assert "front: " in capsys.readouterr().out
    md = (tmp_path / "f" / "front.md").read_text()
    assert "| none | 0/3 | missing |" in md and "- at-s2: not started" in md
    assert main(["front", "--out", str(tmp_path / "f"), "--no-train", "--points", "magic"]) == 2
    assert "points: expected a non-empty subset" in capsys.readouterr().err


def test_front_trains_evaluates_then_reads_back_a_tiny_point(tmp_path, monkeypatch):
    from fastland.experiments import jobs
    from fastland.experiments.evaluate import EvalSettings

    s = EvalSettings(eps=25 / 255, alpha=6.25 / 255, steps=2, n_pgd=16, n_phi=2, phi_points=3, attack="pgd")
    kw = dict(epochs=1, points=["jacobian"], eval_settings=s, costs=tmp_path / "none.json",
              setting="synthetic-lenet", train_size=32, batch_size=32, runtime=Runtime(progress=False))
    fr.front(tmp_path, **kw)
    ev = json.loads((tmp_path / "jacobian-s0" / "eval.json").read_text())
    row = next(csv.DictReader((tmp_path / "front.csv").open()))
    assert row["point"] == "jacobian" and row["seeds"] == "1"
    assert float(row["clean_acc"]) == pytest.approx(ev["clean_acc"], abs=0.006) and row["worst_case_acc"] == ""
    monkeypatch.setattr(jobs, "run_job", lambda *a, **k: pytest.fail("finished work was redone"))
    fr.front(tmp_path, **kw)
    assert next(csv.DictReader((tmp_path / "front.csv").open())) == row


def test_plot_front_refuses_mismatched_or_negative_inputs():
    from fastland.experiments.plot import plot_front

    fig = plot_front([0.1, 1.0], [5.0, 40.0], [0.0, 1.0], labels=["a", "b"], on_front=[True, True])
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="labels: expected 2 values"):
        plot_front([0.1, 1.0], [5.0, 40.0], [0.0, 1.0], labels=["a"], on_front=[True, True])
    with pytest.raises(ValueError, match="robust_std >= 0"):
        plot_front([0.1], [5.0], [-1.0], labels=["a"], on_front=[True])
