"""``fastland front``: the robustness-cost front of cheap defences on Fashion-MNIST / LeNet-5.

Each :class:`Point` of :data:`POINTS` (the one list to edit) is a defence with its
settings, trained with several seeds into ``<out>/<point>-s<seed>`` and evaluated
as ``fastland reproduce`` evaluates (the paper's PGD-10 and the strong worst case).
A point's config is what ``fastland train --defence D [--variant V] [--lam L]
[--at-alpha A] [--beta B] --epochs E --seed S`` trains, so runs started that way
in those folders are reused. The cost of a point is the mean time of one training
step of its defence as a share of PGD-AT's, read from the pytest-benchmark JSON of
``benchmarks/bench_front.py``. Written into the output folder:

* ``front.md`` and ``front.csv``: per point the means ± the standard deviation over
  seeds (ddof = 1) of clean, PGD-10 and worst-case accuracy, Φ and Φ_FGSM, the cost
  share, whether the point is on the front (no other point is at most as costly and
  at least as robust, and better in one), and its masking and overfitting flags;
* ``front.png``: worst-case accuracy against the cost share, the non-dominated
  points marked (:func:`fastland.experiments.plot.plot_front`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .._io import atomic_write_bytes, atomic_write_text
from .evaluate import EvalSettings, default_eval_settings
from .jobs import Job, JobResult, finished_result, run_jobs
from .paper import CONFIGS
from .reproduce import FLAG_KEYS, SPREAD_KEYS, aggregate, eval_text, pm, write_csv
from .run_folder import METRICS, is_complete
from .train import Runtime, TrainConfig

__all__ = ["SETTING", "Point", "POINTS", "NEW_VARIANT_LAMS", "point_config", "front_jobs", "default_out",
           "step_costs", "cost_share", "COST_RESOLUTION", "non_dominated", "front"]

SETTING = "fmnist-lenet"
_EPS = 10 / 255  # Fashion-MNIST's training-time ε (fastland.experiments.paper)


@dataclass(frozen=True)
class Point:
    """One point of the front: ``name`` (its folders are ``<name>-s<seed>``), the
    :class:`~fastland.experiments.train.TrainConfig` fields it sets beside the
    setting, epochs and seed, and its seed count (None: the front's ``seeds``)."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    seeds: Optional[int] = None

    @property
    def note(self) -> str:
        return "one seed" if self.seeds == 1 else ""


def _attack_flat(variant: str, lam: float) -> Point:
    return Point(f"{variant}-lam{lam:g}", {"defence": "attack_flat", "variant": variant, "lam": float(lam)})


# λ of the attack_flat variants still being tuned: each λ listed adds the point <variant>-lam<λ>
NEW_VARIANT_LAMS: Dict[str, Tuple[float, ...]] = {"margin": (8.0,), "kl": (12.0, 24.0, 48.0)}

# the points a cheaper or equally cheap point dominated on seed 0 (jacobian and directional by
# fgsm_rs, trades-b1 by at, margin-lam8 and kl-lam24 by kl-lam12): one seed each
_ONE_SEED = frozenset({"jacobian", "trades-b1", "directional-lam32", "directional-lam64", "directional-lam128",
                       "margin-lam8", "kl-lam24"})

POINTS: Tuple[Point, ...] = tuple(replace(p, seeds=1) if p.name in _ONE_SEED else p for p in (
    Point("none", {"defence": "none"}),
    Point("jacobian", {"defence": "jacobian"}),
    Point("amsreg", {"defence": "amsreg"}),
    Point("at", {"defence": "at"}),
    Point("fgsm_rs-a1.25", {"defence": "fgsm_rs", "at_alpha": 1.25 * _EPS}),
    Point("fgsm_rs-a2", {"defence": "fgsm_rs", "at_alpha": 2 * _EPS}),
    Point("trades-b1", {"defence": "trades", "beta": 1.0}),
    Point("trades-b6", {"defence": "trades", "beta": 6.0}),
    *(_attack_flat("directional", lam) for lam in (32, 64, 128)),
    *(_attack_flat(v, lam) for v, lams in NEW_VARIANT_LAMS.items() for lam in lams),
))


def point_config(point: Point, *, epochs: int, seed: int, setting: str = SETTING,
                 **base: Any) -> TrainConfig:
    """The resolved config of ``point`` at ``seed``; ``base`` sets other fields (e.g. ``train_size`` in tests)."""
    st = CONFIGS[setting]
    return TrainConfig(**{"model": st.model, "dataset": st.dataset, **base, **point.overrides,
                          "epochs": epochs, "seed": seed}).resolved()


def _select(points: Optional[Sequence[str]]) -> List[Point]:
    if points is None:
        return list(POINTS)
    known = {p.name: p for p in POINTS}
    bad = [p for p in points if p not in known]
    if bad or not points:
        raise ValueError(f"points: expected a non-empty subset of {list(known)}, got {list(points)}")
    return [known[p] for p in dict.fromkeys(points)]


def front_jobs(out: Path, points: Sequence[Point], *, epochs: int, seeds: int, eval_settings: EvalSettings,
               setting: str = SETTING, **base: Any) -> Dict[str, List[Job]]:
    """Per point, one job per seed (``0 .. n-1``, ``n`` the point's seed count or ``seeds``)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds: expected an integer >= 1, got {seeds!r}")
    return {p.name: [Job(f"{p.name}-s{k}", point_config(p, epochs=epochs, seed=k, setting=setting, **base),
                         out / f"{p.name}-s{k}", eval_settings) for k in range(p.seeds or seeds)]
            for p in points}


def default_out(epochs: int) -> Path:
    """``runs/front/fmnist-lenet-<epochs>ep``."""
    return Path("runs") / "front" / f"{SETTING}-{epochs}ep"


# --------------------------------------------------------------------------- cost and front


def step_costs(path: Path) -> Optional[Dict[str, float]]:
    """Mean seconds of one training step per benchmark id (``none``, ``at``, ``attack_flat-directional``, ...)
    from a pytest-benchmark JSON, or None when the file is absent."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return {str(b["param"]): float(b["stats"]["mean"]) for b in data["benchmarks"] if b.get("param")}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"costs: expected a pytest-benchmark JSON of benchmarks/bench_front.py, got {path} "
                         f"({type(e).__name__}: {e})") from None


def cost_share(config: TrainConfig, costs: Optional[Mapping[str, float]]) -> Optional[float]:
    """The config's step time over PGD-AT's (None when either is not measured)."""
    if costs is None or "at" not in costs:
        return None
    key = f"attack_flat-{config.variant}" if config.defence == "attack_flat" else config.defence
    return costs[key] / costs["at"] if key in costs else None


# relative difference of two step costs within which they count as equal: the spread of one
# benchmark run (Jacobian, AMSReg and fgsm_rs, one forward-backward more each, measure 0.229-0.234 of AT)
COST_RESOLUTION = 0.05


def non_dominated(cost: Sequence[float], robust: Sequence[float],
                  cost_resolution: float = COST_RESOLUTION) -> List[bool]:
    """Whether each point is on the front: no other point costs at most as much and is at least as
    robust, and strictly better in one of the two. Costs within ``cost_resolution`` of each other
    (relative) count as equal."""
    def same(c: float, c2: float) -> bool:
        return abs(c - c2) <= cost_resolution * max(c, c2)

    def dominates(c2: float, r2: float, c: float, r: float) -> bool:
        equal = same(c, c2)
        cheaper = c2 < c and not equal
        return (cheaper or equal) and r2 >= r and (cheaper or r2 > r)

    pts = list(zip(cost, robust))
    return [not any(dominates(c2, r2, c, r) for c2, r2 in pts) for c, r in pts]


# --------------------------------------------------------------------------- the command


def _status(job: Job) -> str:
    """What a run without a result is doing: ``epoch k/E`` of its training, or ``not started``."""
    path = job.run_dir / METRICS
    done = sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0
    if is_complete(job.run_dir):
        return "trained, not evaluated"
    return f"training, epoch {done}/{job.config.epochs}" if done else "not started"


def front(
    out: str | Path,
    *,
    epochs: int = 20,
    seeds: int = 3,
    points: Optional[Sequence[str]] = None,
    eval_settings: Optional[EvalSettings] = None,
    costs: str | Path = "benchmarks/results/front.json",
    figure: Optional[str | Path] = None,
    train: bool = True,
    jobs: int = 1,
    setting: str = SETTING,
    runtime: Runtime = Runtime(),
    **base: Any,
) -> Path:
    """Train (resuming), evaluate and tabulate the front; returns the path of ``front.md``.

    Args:
        out: the output folder (run folders ``<point>-s<seed>`` and the front's files).
        epochs: epochs per model; seeds: seeds per point (points with their own count keep it).
        points: names of :data:`POINTS` to run (None: all).
        eval_settings: None: the paper's evaluation of the data set, strong (as ``reproduce``).
        costs: the step-time benchmark JSON; absent: the cost column says so, no figure is drawn.
        figure: a path to copy ``front.png`` to.
        train: False trains nothing: finished models are evaluated (when needed), the others listed as missing.
        jobs: models at once, each in its own process (1: one after the other in this process).
        runtime: the data, device and progress output (:class:`~fastland.experiments.train.Runtime`).
        setting, base: the setting and further config fields (tests use ``synthetic-lenet`` and ``train_size``).
    """
    out = Path(out)
    chosen = _select(points)
    s = eval_settings or default_eval_settings(CONFIGS[setting].dataset)
    by_point = front_jobs(out, chosen, epochs=epochs, seeds=seeds, eval_settings=s, setting=setting, **base)
    wanted = [j for js in by_point.values() for j in js if train or is_complete(j.run_dir)]
    if any(finished_result(j) is None for j in wanted):
        runtime.data(wanted[0].config, "test")  # a missing data set: one error now
    done = run_jobs(wanted, n_jobs=jobs, runtime=runtime)
    rows = _rows(chosen, by_point, done, step_costs(Path(costs)))
    _write_front(out, setting, rows, s, epochs, Path(costs), figure)
    return out / "front.md"


def _rows(points: List[Point], by_point: Dict[str, List[Job]], done: Dict[str, JobResult],
          costs: Optional[Dict[str, float]]) -> List[Dict[str, Any]]:
    """One dict per point: the aggregated results of its finished seeds (``result`` None when none),
    its cost share, whether it is on the front, and what is missing."""
    rows = []
    for p in points:
        js = by_point[p.name]
        have = [j for j in js if j.name in done]
        rows.append({
            "point": p, "jobs": js, "have": have,
            "result": aggregate([done[j.name].eval for j in have], [j.config.seed for j in have]) if have else None,
            "cost": cost_share(js[0].config, costs),
            "missing": [f"{j.name}: {_status(j)}" for j in js if j.name not in done],
        })
    ranked = [r for r in rows if r["result"] is not None and r["cost"] is not None
              and "worst_case_acc" in r["result"]]
    for r, on in zip(ranked, non_dominated([r["cost"] for r in ranked],
                                           [r["result"]["worst_case_acc"] for r in ranked])):
        r["on_front"] = on
    return rows


def _seeds_text(r: Dict[str, Any]) -> str:
    text = f"{len(r['have'])}" if len(r["have"]) == len(r["jobs"]) else f"{len(r['have'])}/{len(r['jobs'])}"
    return text + (f" ({r['point'].note})" if r["point"].note else "")


def _flag_counts(res: Dict[str, Any]) -> str:
    parts = [f"{len(res.get(k) or [])} {k.split('_')[0]}" for k in FLAG_KEYS if k in res]
    return ", ".join(parts) if parts else "—"


def _csv_row(r: Dict[str, Any]) -> Dict[str, Any]:
    res = r["result"] or {}
    row: Dict[str, Any] = {"point": r["point"].name, "seeds": len(r["have"]), "seeds_planned": len(r["jobs"])}
    for key in SPREAD_KEYS:
        nd = 3 if key == "attack_flat" else 2
        row[key] = round(res[key], nd) if key in res else ""
        std = res.get(f"{key}_std")
        row[f"{key}_std"] = round(std, nd) if std is not None else ""
    row["cost_share"] = "" if r["cost"] is None else round(r["cost"], 3)
    row["on_front"] = {True: "yes", False: "no"}.get(r.get("on_front"), "")
    for key in FLAG_KEYS:
        row[key] = " | ".join(res.get(key) or [])
    row["missing"] = "; ".join(r["missing"])
    return row


def _write_front(out: Path, setting: str, rows: List[Dict[str, Any]], s: EvalSettings, epochs: int,
                 costs_path: Path, figure: Optional[str | Path]) -> None:
    st = CONFIGS[setting]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "front.csv", [_csv_row(r) for r in rows])
    have_costs = any(r["cost"] is not None for r in rows)
    lines = [f"# fastland front {setting}", "",
             f"{st.model} on {st.dataset}, {epochs} epochs per model. Means over the seeds ± their standard "
             "deviation (ddof = 1). Cost share: the mean time of one training step of the point's defence over "
             f"PGD-AT's, from {costs_path}" + ("." if have_costs else
                                              " — not measured (run benchmarks/bench_front.py to write it)."), "",
             "On the front: no other point costs at most as much and has at least the worst-case accuracy "
             f"(and is better in one); costs within {COST_RESOLUTION:.0%} of each other count as equal, the "
             "benchmark's resolution.", "",
             f"| point | seeds | clean % | PGD-{s.steps} % | worst case % | Φ | Φ_FGSM | cost share | on the front "
             "| flags |",
             "|---|---:|---:|---:|---:|---:|---:|---:|:---:|---|"]
    for r in rows:
        res = r["result"]
        cost = "—" if r["cost"] is None else f"{r['cost']:.2f}"
        on = {True: "yes", False: "no"}.get(r.get("on_front"), "—")
        if res is None:
            lines.append(f"| {r['point'].name} | 0/{len(r['jobs'])} | missing | | | | | {cost} | — | |")
            continue
        cell = lambda key, nd: pm(res[key], res.get(f"{key}_std"), nd) if key in res else "—"  # noqa: E731
        lines.append(f"| {r['point'].name} | {_seeds_text(r)} | {cell('clean_acc', 2)} | {cell('pgd_acc', 2)} "
                     f"| {cell('worst_case_acc', 2)} | {cell('phi', 1)} | {cell('attack_flat', 3)} | {cost} "
                     f"| {on} | {_flag_counts(res)} |")
    flagged = [(r["point"].name, f) for r in rows if r["result"] for k in FLAG_KEYS for f in r["result"].get(k) or []]
    if flagged:
        lines += ["", "Flags:", ""] + [f"- **{name}**: ⚠ {f}" for name, f in flagged]
    missing = [m for r in rows for m in r["missing"]]
    if missing:
        lines += ["", "Missing (not in the table's means):", ""] + [f"- {m}" for m in missing]
    drawn = _draw(out, rows, setting)
    lines += ["", "Evaluation: " + eval_text(s), ""]
    lines += ["![front](front.png)", ""] if drawn else ["No figure: no point has both a cost share and a worst "
                                                        "case yet.", ""]
    atomic_write_text(out / "front.md", "\n".join(lines))
    if drawn and figure is not None:
        atomic_write_bytes(Path(figure), (out / "front.png").read_bytes())


def _draw(out: Path, rows: List[Dict[str, Any]], setting: str) -> bool:
    """``front.png`` of the points with a cost share and a worst case; False (and no ``front.png``)
    when there is none."""
    from . import plot

    pts = [r for r in rows if "on_front" in r]
    if not pts:
        (out / "front.png").unlink(missing_ok=True)  # a figure of earlier numbers would mislead
        return False
    plot.plot_front([r["cost"] for r in pts], [r["result"]["worst_case_acc"] for r in pts],
                    [r["result"].get("worst_case_acc_std") or 0.0 for r in pts],
                    labels=[f"{r['point'].name}: clean {r['result']['clean_acc']:.1f}%" for r in pts],
                    on_front=[r["on_front"] for r in pts], path=out / "front.png",
                    title=f"{setting}: worst-case accuracy vs training cost")
    return True
