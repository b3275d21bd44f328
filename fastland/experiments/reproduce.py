"""``fastland reproduce``: the paper's Tables 1/2 and Figs. 1-5 for one setting.

For a setting such as ``fmnist-lenet`` this trains the four defences with the
paper's settings (:func:`fastland.train.paper_settings`), evaluates each
(clean accuracy, PGD accuracy, Φ), and writes into the output folder:

* ``results.csv`` and ``results.md``: our numbers beside the paper's, with the
  paper's qualitative findings checked one by one;
* ``fig1_landscapes``, ``fig3_histograms``, ``fig4_flatness_vs_robustness``,
  ``fig5_fgsm_landscapes`` (and ``fig2_strength`` with ``sweep=True``), PNG + PDF.

Every model lives in its own run folder ``<out>/<run>/`` (checkpoint every
epoch, ``eval.json`` once evaluated): rerunning skips finished models and
evaluations and resumes unfinished training. With ``seeds=N`` each model is
trained with N seeds (``<out>/<run>-s<seed>`` after the first) and the tables
show means ± the standard deviation over seeds; with ``jobs=N`` the models train
N at a time, each in its own process (:mod:`fastland.experiments.jobs`).
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypedDict, Unpack

import torch
from torch import Tensor, nn

from .evaluate import EvalSettings, default_eval_settings
from .._io import atomic_write_text
from ..choices import DEFENCES, PAPER_DEFENCES
from .paper import CONFIGS, SWEEP_FACTORS, PaperRow, Setting, paper_settings
from .train import Runtime, TrainConfig

__all__ = ["PaperRow", "Setting", "CONFIGS", "RunSpec", "run_specs", "seed_specs", "SpecOptions", "default_out",
           "reproduce", "aggregate", "pm", "findings", "flag_lines", "eval_text", "write_csv", "landscape_figure"]


@dataclass(frozen=True)
class RunSpec:
    """One model to train: its folder name, a legend label and its config."""

    name: str
    label: str
    config: TrainConfig
    main: bool  # one of the four table rows (else a sweep model)


_DEFENCE_NAMES = {"none": "No defence", "at": "AT", "jacobian": "Jacobian", "amsreg": "AMSReg",
                  "attack_flat": "Attack-flat"}


def _label(c: TrainConfig) -> str:
    name = _DEFENCE_NAMES[c.defence]
    if c.defence == "none":
        return name
    if c.defence == "at":
        return f"{name} (ε = {c.at_eps * 255:.3g}/255)"
    if c.defence == "attack_flat":
        return f"{name} {c.variant} (λ = {c.lam:.3g}, ε = {c.at_eps * 255:.3g}/255)"
    return f"{name} (λ = {c.lam:.3g})"


def run_specs(
    setting: str,
    *,
    epochs: int,
    defences: Sequence[str] = PAPER_DEFENCES,
    train_size: Optional[int] = None,
    batch_size: int = 128,
    seed: int = 0,
    sweep: bool = False,
    variant: str = "difference",
    attack_lam: Optional[float] = None,
) -> List[RunSpec]:
    """The models of a reproduction: one per defence, plus (``sweep``) AT and
    Jacobian models at 0.25×, 0.5× and 2× the paper's strength. ``attack_flat``
    uses penalty ``variant`` with strength ``attack_lam`` (None: its default)."""
    if setting not in CONFIGS:
        raise ValueError(f"setting: expected one of {sorted(CONFIGS)}, got {setting!r}")
    bad = [d for d in defences if d not in DEFENCES]
    if bad or not defences:
        raise ValueError(f"defences: expected a non-empty subset of {DEFENCES}, got {tuple(defences)}")
    st = CONFIGS[setting]
    base = TrainConfig(model=st.model, dataset=st.dataset, epochs=epochs, batch_size=batch_size,
                       seed=seed, train_size=train_size)
    specs = []
    for d in defences:
        extra = {"variant": variant, "lam": attack_lam} if d == "attack_flat" else {}
        c = TrainConfig(**{**asdict(base), "defence": d, **extra}).resolved()
        name = d if d != "attack_flat" else f"{d}-{variant}" + ("" if attack_lam is None else f"-lam{attack_lam:g}")
        specs.append(RunSpec(name, _label(c), c, True))
    if sweep:
        ps = paper_settings(st.dataset)
        for f in SWEEP_FACTORS:
            at = TrainConfig(**{**asdict(base), "defence": "at", "at_eps": ps.at_eps * f}).resolved()
            jac = TrainConfig(**{**asdict(base), "defence": "jacobian", "lam": ps.lam_jacobian * f}).resolved()
            specs.append(RunSpec(f"at-x{f:g}", _label(at), at, False))
            specs.append(RunSpec(f"jacobian-x{f:g}", _label(jac), jac, False))
    return specs


# the measures whose spread over seeds the tables show (as ``<key>_std``), and the flag lists
SPREAD_KEYS: Tuple[str, ...] = ("clean_acc", "pgd_acc", "worst_case_acc", "phi", "attack_flat")
FLAG_KEYS: Tuple[str, ...] = ("masking_flags", "overfitting_flags")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def aggregate(evals: Sequence[Dict[str, Any]], seeds: Sequence[int]) -> Dict[str, Any]:
    """One table row from the ``eval.json`` of each seed of a model.

    Numbers (and the numbers of a mapping such as ``broken_by``) become their mean
    over seeds; each key of :data:`SPREAD_KEYS` present gets ``<key>_std``, the
    standard deviation over seeds (ddof = 1; None for one seed); the flag lists of
    :data:`FLAG_KEYS` are joined, each sentence prefixed ``seed k:`` when there are
    several seeds; anything else is the first seed's. ``n_seeds`` is added. One
    seed gives its ``eval.json`` unchanged (plus the None spreads and ``n_seeds``).
    """
    if len(evals) != len(seeds) or not evals:
        raise ValueError(f"evals: expected one eval.json per seed ({len(seeds)}), got {len(evals)}")
    out: Dict[str, Any] = dict(evals[0])
    many = len(evals) > 1
    for key, first in evals[0].items():
        if not many:
            break
        values = [e.get(key) for e in evals]
        if key in FLAG_KEYS:
            out[key] = [f"seed {k}: {f}" for k, v in zip(seeds, values) for f in (v or [])]
        elif all(_is_number(v) for v in values):
            out[key] = first if all(v == first for v in values) else _mean(values)
        elif isinstance(first, dict) and all(isinstance(v, dict) and v.keys() == first.keys() for v in values) \
                and all(_is_number(x) for v in values for x in v.values()):
            out[key] = {k: _mean([v[k] for v in values]) for k in first}
    for key in SPREAD_KEYS:
        if key in out:
            out[f"{key}_std"] = statistics.stdev([e[key] for e in evals]) if many else None
    out["n_seeds"] = len(evals)
    return out


def pm(mean: float, std: Optional[float], nd: int) -> str:
    """``mean ± std`` with ``nd`` decimals (``mean`` alone when ``std`` is None)."""
    return f"{mean:.{nd}f}" + ("" if std is None else f" ± {std:.{nd}f}")


def findings(results: Dict[str, Dict[str, Any]]) -> List[Tuple[str, bool]]:
    """The paper's Table 1/2 findings, checked on our numbers (``results[defence]``
    has ``phi``, ``clean_acc``, ``pgd_acc``). Only findings whose defences were run."""
    out: List[Tuple[str, bool]] = []
    results = {d: r for d, r in results.items() if d in PAPER_DEFENCES}
    have = set(results)
    pgd = {d: r["pgd_acc"] for d, r in results.items()}
    phi = {d: r["phi"] for d, r in results.items()}
    clean = {d: r["clean_acc"] for d, r in results.items()}
    if "at" in have and len(have) > 1:
        out.append(("adversarial training is the most robust under PGD", max(pgd, key=pgd.get) == "at"))
    if "amsreg" in have and len(have) > 1:
        out.append(("AMSReg has the flattest landscape (highest Φ)", max(phi, key=phi.get) == "amsreg"))
    if "none" in have:
        for d in ("jacobian", "amsreg"):
            if d in have:
                out.append((f"{d} is far more robust than no defence (PGD acc. +10 points or more)",
                            pgd[d] >= pgd["none"] + 10))
        out.append(("no defence sits near 0% PGD accuracy (< 5%)", pgd["none"] < 5))
    if len(have) > 1:
        spread = max(clean.values()) - min(clean.values())
        out.append((f"clean accuracies within a few points of each other (max − min ≤ 5 points; "
                    f"ours {spread:.1f})", spread <= 5))
    return out


def _table_row(setting: str, spec: RunSpec, r: Dict[str, Any], train_time: float) -> Dict[str, Any]:
    """One row of ``results.csv``: the (mean) numbers, rounded; with several seeds also their spreads."""
    p = CONFIGS[setting].paper.get(spec.config.defence) if spec.main else None
    opt = lambda key, nd: round(r[key], nd) if key in r else ""  # noqa: E731
    row: Dict[str, Any] = {
        "setting": setting, "run": spec.name, "defence": spec.label, "epochs": spec.config.epochs,
        "phi": round(r["phi"], 2), "phi_stderr": round(r["phi_stderr"], 2),
        "clean_acc": round(r["clean_acc"], 2), "pgd_acc": round(r["pgd_acc"], 2),
        "paper_defence": p.label if p else "", "paper_phi": p.phi if p else "",
        "paper_clean_acc": p.clean if p else "", "paper_pgd_acc": p.pgd if p else "",
        "worst_case_acc": opt("worst_case_acc", 2), "attack_flat": opt("attack_flat", 3),
        "anisotropy": opt("anisotropy", 2),
        "train_time_s": round(train_time, 1), "eval_time_s": r.get("eval_time_s", ""),
    }
    if r.get("n_seeds", 1) > 1:
        row["seeds"] = r["n_seeds"]
        for key in SPREAD_KEYS:
            std = r.get(f"{key}_std")
            row[f"{key}_std"] = "" if std is None else round(std, 3 if key == "attack_flat" else 2)
    return row


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _write_tables(out: Path, setting: str, specs: List[RunSpec], results: Dict[str, Dict[str, Any]],
                  train_times: Dict[str, float], s: EvalSettings, figures: List[str]) -> Path:
    st = CONFIGS[setting]
    rows = [_table_row(setting, spec, results[spec.name], train_times[spec.name]) for spec in specs]
    write_csv(out / "results.csv", rows)
    seeds = max(r.get("n_seeds", 1) for r in results.values())
    lines = [f"# fastland reproduce {setting}", "",
             f"{st.model} on {st.dataset}, {specs[0].config.epochs} epochs "
             f"(paper: 200; {st.table}). Ours first, the paper's in parentheses.", ""]
    if seeds > 1:
        lines += [f"Means over {seeds} seeds (seed {specs[0].config.seed} to {specs[0].config.seed + seeds - 1}), "
                  "± the standard deviation over seeds (ddof = 1); the findings are checked on the means.", ""]
    lines += ["| Defence | Φ (flatness ↑) | Clean acc. % ↑ | PGD acc. % ↑ | worst case % ↑ "
              "| Φ_FGSM (flatness along FGSM ↑) | anisotropy | train time |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, spec in zip(rows, specs):
        r = results[spec.name]
        p = st.paper.get(spec.config.defence) if spec.main else None
        paren = (lambda v: f" ({v})") if p else (lambda v: "")
        std = (lambda key: r.get(f"{key}_std")) if seeds > 1 else (lambda key: None)
        phi_spread = r["phi_std"] if seeds > 1 else row["phi_stderr"]
        wc = pm(r["worst_case_acc"], std("worst_case_acc"), 2) if "worst_case_acc" in r else "—"
        af = pm(r["attack_flat"], std("attack_flat"), 3) if "attack_flat" in r else "—"
        an = f"{row['anisotropy']:.2f}" if row["anisotropy"] != "" else "—"
        lines.append(
            f"| {row['defence']} | {pm(r['phi'], phi_spread, 1)}{paren(p.phi if p else '')} "
            f"| {pm(r['clean_acc'], std('clean_acc'), 2)}{paren(p.clean if p else '')} "
            f"| {pm(r['pgd_acc'], std('pgd_acc'), 2)}{paren(p.pgd if p else '')} "
            f"| {wc} | {af} | {an} | {row['train_time_s'] / 60:.1f} min |")
    lines += _strong_lines(specs, results)
    main_results = {spec.config.defence: results[spec.name] for spec in specs if spec.main}
    lines += ["", "Findings of the paper, checked on our numbers:", ""]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in findings(main_results)]
    lines += ["", "Evaluation: " + eval_text(s), ""]
    if figures:
        lines += ["Figures:", ""] + [f"- [{Path(f).stem}]({Path(f).name})" for f in figures] + [""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    return out / "results.md"


def flag_lines(r: Dict[str, Any]) -> List[str]:
    """The masking flags of a result (a line saying there is none when the list is empty), then its
    overfitting flags when the evaluation reports them."""
    lines = [f"  - ⚠ {f}" for f in r.get("masking_flags") or []] or ["  - no gradient-masking flag"]
    if "overfitting_flags" in r:
        lines += [f"  - ⚠ {f}" for f in r["overfitting_flags"]] or ["  - no overfitting flag"]
    return lines


def _strong_lines(specs: List[RunSpec], results: Dict[str, Dict[str, Any]]) -> List[str]:
    """Per model: how many points PGD-10 overstates robustness, who broke what, the masking flags
    (and, when evaluated, FGSM accuracy and the overfitting flags)."""
    out: List[str] = []
    for spec in specs:
        r = results[spec.name]
        if "worst_case_acc" not in r:
            continue
        if not out:
            out = ["", "Strong evaluation (worst case over APGD-CE, APGD-T and Square, per sample):", ""]
        over = r["pgd10_acc"] - r["worst_case_acc"]
        broke = ", ".join(f"{k} {v:.1f}%" for k, v in r["broken_by"].items())
        fgsm = f", FGSM {r['fgsm_acc']:.1f}%" if "fgsm_acc" in r else ""
        out.append(f"- **{spec.label}**: PGD-10 overstates robustness by {over:.1f} points "
                   f"(PGD-10 {r['pgd10_acc']:.1f}%, worst case {r['worst_case_acc']:.1f}% on {r['n_strong']} images; "
                   f"broken by: {broke}; PGD-100 {r['pgd100_acc']:.1f}%, APGD-CE at 4ε {r['large_eps_acc']:.1f}%"
                   f"{fgsm}).")
        out += flag_lines(r)
    return out


def eval_text(s: EvalSettings) -> str:
    """The evaluation settings in a sentence (the tables' last line)."""
    n = lambda v: "all" if v is None else str(v)  # noqa: E731
    from ..measures import FLATNESS_DIRS, FLATNESS_POINTS, FLATNESS_SPAN

    dirs = s.phi_dirs or FLATNESS_DIRS
    span = FLATNESS_SPAN if s.phi_span is None else s.phi_span
    points = s.phi_points or FLATNESS_POINTS
    return (f"PGD-{s.steps} L∞ ε={s.eps * 255:.3g}/255 α={s.alpha * 255:.3g}/255 with random start on "
            f"{n(s.n_pgd)} test images; clean accuracy on {n(s.n_clean)}; Φ = {s.reduction} of AMS scores over a "
            f"{points}×{points} grid of half-width {span * 255:.3g}/255 along {dirs} random signed direction "
            f"pair(s), averaged over pairs, on {n(s.n_phi)} test images. Φ_FGSM (fastland.attack_flatness) = "
            f"−mean |Δlog p| along the FGSM direction over 9 points of [−16/255, 16/255] on the same images; "
            f"anisotropy = that steepness over the steepness along 4 random signed directions."
            + (f" Strong evaluation on {n(s.n_strong)} test images: APGD-CE and APGD-T ({s.strong_steps} steps), "
               f"Square ({s.n_queries} queries), at the same ε." if s.attack == "strong" else ""))


def default_out(setting: str, epochs: int, *, train_size: Optional[int] = None, batch_size: int = 128,
                seed: int = 0) -> Path:
    """The default output folder of a reproduction: ``runs/reproduce/<setting>-<epochs>ep``,
    with ``-<train_size>`` (``-10k`` for 10 000), ``-b<batch_size>`` and ``-seed<seed>``
    appended when those differ from the paper's run, so that runs with different
    training settings never share (and refuse to resume) each other's models."""
    name = f"{setting}-{epochs}ep"
    if train_size is not None:
        name += f"-{train_size // 1000}k" if train_size % 1000 == 0 else f"-{train_size}"
    if batch_size != 128:
        name += f"-b{batch_size}"
    if seed != 0:
        name += f"-seed{seed}"
    return Path("runs") / "reproduce" / name


class SpecOptions(TypedDict, total=False):
    """The keywords of :func:`run_specs` that choose the models (their defaults are its defaults)."""

    defences: Sequence[str]
    train_size: Optional[int]
    batch_size: int
    seed: int
    sweep: bool
    variant: str
    attack_lam: Optional[float]


def seed_specs(spec: RunSpec, seeds: int) -> List[RunSpec]:
    """``spec`` trained with ``seeds`` seeds: ``spec`` itself (its seed ``s``, its folder name), then
    seeds ``s + 1``, ... in folders ``<name>-s<seed>``."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds: expected an integer >= 1, got {seeds!r}")
    out = [spec]
    for k in range(1, seeds):
        seed = spec.config.seed + k
        out.append(replace(spec, name=f"{spec.name}-s{seed}", config=replace(spec.config, seed=seed)))
    return out


def reproduce(
    setting: str,
    out: str | Path,
    *,
    epochs: int = 200,
    eval_settings: Optional[EvalSettings] = None,
    seeds: int = 1,
    jobs: int = 1,
    figures: bool = True,
    figure_points: Optional[int] = None,
    runtime: Runtime = Runtime(),
    **options: Unpack[SpecOptions],
) -> Path:
    """Train, evaluate and report one setting of the paper; returns the path of ``results.md``.

    Args:
        setting: a key of :data:`CONFIGS` (``"fmnist-lenet"``, ...).
        out: the output folder; each model's run folder is ``out/<run>`` (``out/<run>-s<seed>``
            for the seeds after the first).
        epochs: epochs per model.
        eval_settings: the evaluation (None: the paper's for the data set, strong).
        seeds: seeds per model (``seed``, ``seed + 1``, ...); the tables show the means and, for
            several seeds, ± their standard deviation over seeds (ddof = 1).
        jobs: 1 trains and evaluates the models one after the other in this process; more runs
            that many at once, each in its own process (:func:`fastland.experiments.jobs.run_jobs`).
        figures: draw Figs. 1-5 (from the first seed's models); ``figure_points`` sets the
            landscape figures' grid points per axis (None: :func:`fastland.landscape`'s default).
        runtime: the data, device and progress output (:class:`~fastland.experiments.train.Runtime`).
        options: which models (:func:`run_specs`' keywords: ``defences``, ``train_size``,
            ``batch_size``, ``seed``, ``sweep``, ``variant``, ``attack_lam``).

    Resumable: finished models (``model.pt``) and evaluations (``eval.json`` with
    the same settings) are reused, unfinished training resumes from its checkpoint.
    """
    from ._state import resolve_device
    from .jobs import Job, run_jobs
    from .train import load_trained

    out = Path(out)
    specs = run_specs(setting, epochs=epochs, **options)
    runs = {spec.name: seed_specs(spec, seeds) for spec in specs}
    st = CONFIGS[setting]
    s = eval_settings or default_eval_settings(st.dataset)
    test = runtime.data(specs[0].config, "test")
    title = lambda r: f"{setting}: {r.label}" + (f" (seed {r.config.seed})" if seeds > 1 else "")  # noqa: E731
    done = run_jobs([Job(r.name, r.config, out / r.name, s, title(r)) for group in runs.values() for r in group],
                    n_jobs=jobs, runtime=runtime)
    results = {name: aggregate([done[r.name].eval for r in group], [r.config.seed for r in group])
               for name, group in runs.items()}
    train_times = {name: _mean([done[r.name].train_time_s for r in group]) for name, group in runs.items()}
    fig_paths: List[str] = []
    if figures:
        dev = resolve_device(runtime.device)
        models = {spec.name: load_trained(out / spec.name, device=dev)[0] for spec in specs}
        fig_paths = _draw_figures(out, specs, models, results, test, figure_points)
    return _write_tables(out, setting, specs, results, train_times, s, fig_paths)


# --------------------------------------------------------------------------- figures


def landscape_figure(models: Dict[str, nn.Module], x: Tensor, y: Tensor, path: str | Path, *,
                     directions: str = "rademacher", span: Optional[float] = None, points: Optional[int] = None,
                     kind: str = "surface", seed: int = 0, title: Optional[str] = None) -> List[Path]:
    """Δlog p landscapes of several models around the same sample, side by side.

    Args:
        models: legend label -> model (eval mode); all on one device.
        x: ``[1, *S]`` the centre sample; y: ``[1]`` its label (for ``"fgsm"``).
        path: figure path; a ``.pdf`` is written beside a ``.png`` (and vice versa).
        directions: ``"rademacher"``, ``"gaussian"`` or ``"fgsm"`` (each model its own FGSM direction).
        span, points: the grid (None: :func:`fastland.landscape`'s defaults).
    Returns:
        the written figure paths.
    """
    from . import plot
    from ..landscapes import landscape

    kw: Dict[str, Any] = {"directions": directions}
    if span is not None:
        kw["span"] = span
    if points is not None:
        kw["points"] = points
    lands = {}
    for name, m in models.items():
        dev = next(m.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(seed)  # the same random directions for every model
        lands[name] = landscape(m, x.to(dev), y=y.to(dev), generator=gen, **kw)
    fig = plot.plot_landscapes(lands, kind=kind)
    return _save(fig, path, title)


def _save(fig: Any, path: str | Path, title: Optional[str] = None) -> List[Path]:
    """Write ``fig`` as ``path`` with a ``.png`` and a ``.pdf`` suffix; returns both paths."""
    from .plot import save_figure

    if title:
        fig.suptitle(title)
    paths = [Path(path).with_suffix(".png"), Path(path).with_suffix(".pdf")]
    save_figure(fig, paths)
    return paths


def _draw_figures(out: Path, specs: List[RunSpec], models: Dict[str, nn.Module],
                  results: Dict[str, Dict[str, Any]], test: Tuple[Tensor, Tensor],
                  points: Optional[int] = None) -> List[str]:
    """Figs. 1, 3, 4, 5 (and 2 when a sweep was trained) into ``out``; returns the PNG paths."""
    from . import plot
    from ..histograms import loglik_histogram

    x, y = test
    main = {s.label: models[s.name] for s in specs if s.main}
    paths: List[str] = []
    x0, y0 = x[:1], y[:1]
    paths += [str(p) for p in landscape_figure(main, x0, y0, out / "fig1_landscapes.png", points=points,
                                               title="Fig. 1: Δlog p over two random signed directions")]
    sweep = [s for s in specs if not s.main or s.config.defence in ("at", "jacobian")]
    if any(not s.main for s in specs):
        for d in ("at", "jacobian"):
            group = sorted((s for s in sweep if s.config.defence == d),
                           key=lambda s: s.config.at_eps if d == "at" else s.config.lam)
            paths += [str(p) for p in landscape_figure(
                {s.label: models[s.name] for s in group}, x0, y0, out / f"fig2_strength_{d}.png", points=points,
                title=f"Fig. 2: increasing {'AT ε' if d == 'at' else 'Jacobian λ'}")]
    hists = {}
    for label, m in main.items():
        dev = next(m.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(0)
        hists[label] = loglik_histogram(m, x[:1000].to(dev), generator=gen)
    paths += [str(p) for p in _save(plot.plot_loglik_histograms(hists), out / "fig3_histograms.png",
                                    "Fig. 3: log p of clean and randomly perturbed test images")]
    pts = sorted((DEFENCES.index(s.config.defence), results[s.name]["phi"], results[s.name]["pgd_acc"],
                  s.label, _DEFENCE_NAMES[s.config.defence]) for s in specs)
    fig4 = plot.plot_flatness_vs_accuracy([p[1] for p in pts], [p[2] for p in pts], labels=[p[3] for p in pts],
                                          groups=[p[4] for p in pts],
                                          title="Fig. 4: flatness Φ vs PGD accuracy",
                                          ylabel="PGD accuracy (%)")
    paths += [str(p) for p in _save(fig4, out / "fig4_flatness_vs_robustness.png")]
    paths += [str(p) for p in landscape_figure(main, x0, y0, out / "fig5_fgsm_landscapes.png", directions="fgsm", points=points,
                                               title="Fig. 5: Δlog p along the FGSM direction and a random one")]
    return [p for p in paths if p.endswith(".png")]
