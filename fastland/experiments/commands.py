"""The ``fastland`` subcommands' bodies (the parsers are in :mod:`fastland.experiments.cli`).

Each takes the parsed ``argparse.Namespace`` and returns the exit status; heavy
modules (torch, the experiments) are imported inside, so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .train import Runtime

__all__ = ["cmd_train", "cmd_evaluate", "cmd_flatness", "cmd_landscape", "cmd_reproduce", "cmd_front", "cmd_demo"]


def _eval_settings(args: argparse.Namespace, dataset: str, seed: int = 0) -> Any:
    from .evaluate import default_eval_settings

    return default_eval_settings(
        dataset, eps=args.eps, alpha=args.alpha, steps=args.steps, n_clean=args.n_clean,
        n_pgd=args.n_pgd, n_phi=args.n_phi, phi_dirs=args.phi_dirs, phi_span=args.phi_span,
        phi_points=args.phi_points, reduction=args.reduction, batch_size=args.eval_batch_size, seed=seed,
        attack=args.attack, n_strong=args.n_strong, strong_steps=args.strong_steps, n_queries=args.n_queries)


_TRAIN_FIELDS = {"model": "model", "dataset": "dataset", "defence": "defence", "epochs": "epochs",
                 "batch_size": "batch_size", "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
                 "lam": "lam", "estimator": "estimator", "n_proj": "n_proj", "at_eps": "at_eps",
                 "at_alpha": "at_alpha", "at_steps": "at_steps", "variant": "variant", "seed": "seed",
                 "train_size": "train_size", "beta": "beta"}


def _train_config(args: argparse.Namespace) -> Any:
    """The run's settings: the flags, or with ``--resume`` the saved ones (given flags must agree)."""
    from .run_folder import saved_config
    from .train import TrainConfig

    cfg = TrainConfig(**{field: getattr(args, dest) for dest, field in _TRAIN_FIELDS.items()})
    if not (args.resume and args.out):
        return cfg
    saved = saved_config(Path(args.out))
    if saved is None:
        return cfg
    saved_cfg = TrainConfig.from_dict(saved)
    now = cfg.resolved()
    for dest in sorted(getattr(args, "given", set()) & set(_TRAIN_FIELDS)):
        field = _TRAIN_FIELDS[dest]
        if getattr(now, field) != getattr(saved_cfg, field):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag}: the run in {args.out} was saved with {getattr(saved_cfg, field)!r}, "
                             f"now {getattr(args, dest)!r}; drop the flag to continue with the saved settings")
    return saved_cfg


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = _train_config(args)
    out = args.out or f"runs/{cfg.dataset}-{cfg.model}-{cfg.defence}"
    from .run_folder import CHECKPOINT, is_complete

    if args.resume and not (Path(out) / CHECKPOINT).exists() and not is_complete(out):
        print(f"fastland train: note: no checkpoint in {out}; starting a fresh run", file=sys.stderr, flush=True)
    try:
        r = train(cfg, out, data_dir=args.data_dir, download=args.download, resume=args.resume,
                  stop_after=args.stop_after, device=args.device, progress=not args.no_progress,
                  overwrite=args.overwrite)
    finally:
        _leave_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    last = r.metrics[-1] if r.metrics else {}
    print(json.dumps({"out": str(r.out_dir), "epochs_done": r.epochs_done, "complete": r.complete, **last}))
    return 0


def _leave_process_group() -> None:
    """Destroy the torchrun process group that training joined (if any)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _load_run_and_test(args: argparse.Namespace) -> Any:
    from .train import load_trained

    model, cfg = load_trained(args.run, device=_device(args.device))
    x, y = _runtime(args).data(cfg, "test")
    return model, cfg, x, y


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .._io import atomic_write_text

    from .run_folder import check_writable, is_complete

    dest = Path(args.out) if args.out else Path(args.run) / "eval.json"
    check_writable(dest.parent)  # before the work, not after it
    model, cfg, x, y = _load_run_and_test(args)
    res = evaluate(model, x, y, _eval_settings(args, cfg.dataset, args.seed),
                   progress=not args.no_progress, phi=not args.no_phi)
    res = {"run": str(args.run), "model": cfg.model, "dataset": cfg.dataset, "defence": cfg.defence,
           "complete": is_complete(args.run), **res}
    text = json.dumps(res, indent=2)
    print(text, flush=True)  # the result is shown even if writing it fails
    if not res["complete"]:
        print(f"fastland evaluate: note: {args.run} is unfinished (no model.pt); evaluated its latest checkpoint",
              file=sys.stderr)
    atomic_write_text(dest, text + "\n")
    return 0


def cmd_flatness(args: argparse.Namespace) -> int:
    from .evaluate import default_eval_settings, flatness_of, subset_indices

    model, cfg, x, _ = _load_run_and_test(args)
    s = default_eval_settings(cfg.dataset, n_phi=args.n_phi, phi_dirs=args.phi_dirs, phi_span=args.phi_span,
                              phi_points=args.phi_points, reduction=args.reduction, seed=args.seed)
    idx = subset_indices(x.shape[0], s.n_phi, s.seed)
    res = flatness_of(model, x[idx], s, progress=not args.no_progress)
    print(json.dumps({"run": str(args.run), "n_phi": int(idx.numel()), "reduction": s.reduction, **res}))
    return 0


def cmd_landscape(args: argparse.Namespace) -> int:
    from .reproduce import landscape_figure
    from .train import load_trained

    loaded = [load_trained(r, device=_device(args.device)) for r in args.runs]
    datasets = {c.dataset for _, c in loaded}
    if len(datasets) != 1:
        raise ValueError(f"runs: expected runs on one data set, got {sorted(datasets)}")
    x, y = _runtime(args).data(loaded[0][1], "test")
    if not 0 <= args.index < x.shape[0]:
        raise ValueError(f"--index: expected 0 <= index < {x.shape[0]}, got {args.index}")
    models = {Path(r).name: m for r, (m, _) in zip(args.runs, loaded)}
    paths = landscape_figure(models, x[args.index:args.index + 1], y[args.index:args.index + 1], args.out,
                             directions=args.directions, span=args.span, points=args.grid_points,
                             kind=args.kind, seed=args.seed)
    print(json.dumps({"figures": [str(p) for p in paths]}))
    return 0


def _names(text: str) -> tuple:
    """A comma-separated list as a tuple of its non-empty names."""
    return tuple(d.strip() for d in text.split(",") if d.strip())


def _report_failed_jobs(command: str, e: Exception) -> int:
    """A failed job (the others finished): one line naming the run and its log, exit status 1."""
    print(f"fastland {command}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1


def _runtime(args: argparse.Namespace) -> Runtime:
    """The :class:`~fastland.experiments.train.Runtime` of the shared options ``--data-dir``,
    ``--download``, ``--device`` and ``--no-progress``."""
    from .train import Runtime

    return Runtime(data_dir=args.data_dir, download=args.download, device=args.device,
                   progress=not args.no_progress)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .jobs import JobFailed
    from .reproduce import CONFIGS, default_out, reproduce

    out = args.out or default_out(args.setting, args.epochs, train_size=args.train_size,
                                  batch_size=args.batch_size, seed=args.seed)
    s = _eval_settings(args, CONFIGS[args.setting].dataset, args.seed)
    try:
        report = reproduce(args.setting, out, epochs=args.epochs, defences=_names(args.defences), eval_settings=s,
                           train_size=args.train_size, batch_size=args.batch_size, seed=args.seed,
                           seeds=args.seeds, jobs=args.jobs, sweep=args.sweep, variant=args.variant,
                           attack_lam=args.attack_lam, figures=not args.no_figures, runtime=_runtime(args))
    except JobFailed as e:
        return _report_failed_jobs("reproduce", e)
    print(f"results: {report}")
    return 0


def cmd_front(args: argparse.Namespace) -> int:
    from .front import SETTING, default_out, front
    from .jobs import JobFailed
    from .reproduce import CONFIGS

    s = _eval_settings(args, CONFIGS[SETTING].dataset)
    try:
        report = front(args.out or default_out(args.epochs), epochs=args.epochs, seeds=args.seeds,
                       points=_names(args.points) if args.points is not None else None, eval_settings=s,
                       costs=args.costs, figure=args.figure, train=not args.no_train, jobs=args.jobs,
                       runtime=_runtime(args))
    except JobFailed as e:
        return _report_failed_jobs("front", e)
    print(f"front: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.out, epochs=args.epochs, train_size=args.train_size, n_eval=args.n_eval,
                      n_phi=args.n_phi, seed=args.seed, runtime=_runtime(args))
    print(f"demo report: {report}")
    return 0


