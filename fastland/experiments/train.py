"""The training loop of the experiments: config, run folder, checkpoints, RNG states, DDP.

Each mini-batch is one :func:`fastland.train_step` on the config's
:class:`fastland.Defence` (see :mod:`fastland.defences` for the objectives).
SGD with momentum 0.9 and weight decay, learning rate ÷10 after 50% and 75% of
the epochs (the paper's schedule). Every epoch writes an atomic checkpoint
(model, optimiser, scheduler, completed epochs, metrics, and every RNG state:
torch, CUDA, numpy, python and the loop's own generator) so that ``resume=True``
continues exactly where the run stopped: on CPU a resumed run equals an
uninterrupted one bit for bit. Under ``torchrun`` the loop runs DDP (gloo on
CPU, nccl on GPU) with a :class:`~torch.utils.data.DistributedSampler`.

Catastrophic overfitting is watched, not hidden: a ``fgsm_rs`` run with test
data records, each epoch, ``slice_pgd_acc`` (PGD-10 at the training ε, step
ε/4, random start of a fixed seed) and ``slice_fgsm_acc`` (FGSM at the training
ε) on a fixed slice of :data:`MONITOR_SIZE` test images; a PGD accuracy that
collapses while the FGSM one stays up is the sign (Wong et al. 2020). The
monitor draws from its own generators only, so resuming stays exact.

Files in a run folder ``out_dir``: ``config.json``, ``checkpoint.pt`` (the
latest epoch), ``metrics.jsonl`` (one JSON object per completed epoch) and, when
all epochs are done, ``model.pt`` (config + final weights).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .._io import atomic_torch_save, atomic_write_text
from .._progress import progress_bar
from ..defences import train_step
from ._state import (Dist, all_reduce_sum, barrier, gather_states, global_rng_state, init_distributed,
                     resolve_device, seed_everything, set_global_rng_state)
from .config import TrainConfig, build_model, load_data
from .evaluate import accuracy, fgsm_accuracy, pgd_accuracy, subset_indices
from .run_folder import (CHECKPOINT, CONFIG, FINAL, METRICS, RunFileError, check_folder, clear_run, is_complete,
                         load_run_file, locked, saved_config)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Runtime",
    "fit",
    "train",
    "build_model",
    "load_data",
    "load_trained",
    "is_complete",
    "overfitting_monitor",
    "MONITOR_SIZE",
]

_FORMAT = 1

#: Test images of the catastrophic-overfitting monitor (a fixed seeded subset, the same every epoch and run).
MONITOR_SIZE = 512
#: Seed of the monitor's test slice and of its PGD random starts (independent of the run's seed).
_MONITOR_SEED = 0
_MONITOR_STEPS = 10
# the defences whose runs record the monitor (one-step attacks are the ones that overfit catastrophically)
_MONITORED_DEFENCES = ("fgsm_rs",)


@dataclass
class TrainResult:
    """What :func:`fit` returns: the trained model (unwrapped, train mode left as is),
    the run folder, the epochs completed so far and one metrics dict per epoch."""

    model: nn.Module
    out_dir: Path
    epochs_done: int
    metrics: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return (self.out_dir / FINAL).exists()


def _epoch_indices(n: int, epoch: int, seed: int, d: Dist, shuffle: bool = True) -> List[int]:
    """This rank's sample order for ``epoch`` (a DistributedSampler's, seeded by ``seed``+epoch)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=d.world, rank=d.rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    return list(iter(sampler))


def _milestones(epochs: int) -> List[int]:
    """lr ÷10 after 50% and 75% of the epochs (epoch indices, at least 1)."""
    return [max(1, int(epochs * 0.5)), max(1, int(epochs * 0.75))]


def _make_optimizer(model: nn.Module, c: TrainConfig) -> Tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=_milestones(c.epochs), gamma=0.1)
    return opt, sched


def _scheduler_state(sched: Any) -> Dict[str, Any]:
    s = sched.state_dict()
    s["milestones"] = dict(s["milestones"])  # Counter -> dict for weights_only loading
    return s


def _load_scheduler_state(sched: Any, s: Dict[str, Any]) -> None:
    from collections import Counter

    s = dict(s)
    s["milestones"] = Counter(s["milestones"])
    sched.load_state_dict(s)


def _write_metrics(out_dir: Path, metrics: List[Dict[str, Any]]) -> None:
    atomic_write_text(out_dir / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))


def fit(
    model: nn.Module,
    train_data: Tuple[Tensor, Tensor],
    config: TrainConfig,
    out_dir: os.PathLike | str,
    *,
    test_data: Optional[Tuple[Tensor, Tensor]] = None,
    resume: bool = False,
    stop_after: Optional[int] = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train ``model`` with ``config``, checkpointing to ``out_dir`` every epoch.

    The folder belongs to this run: it is locked while the run writes it (a second
    writer is refused), and files written with other settings are refused unless
    ``overwrite`` removes them first.

    Args:
        model: freshly initialised (seed the global RNG before building it for
            reproducible runs; :func:`train` does).
        train_data: ``(x [N, *S] float in [0, 1], y [N] int64)`` in memory; moved
            to the device once; batches are index gathers (no DataLoader).
        config: the run's settings (``None`` fields resolved here).
        out_dir: the run folder (created).
        test_data: optional ``(x, y)``; when given, each epoch's metrics have the
            clean test accuracy ``test_acc`` (and for ``fgsm_rs`` the monitor's
            ``slice_pgd_acc``/``slice_fgsm_acc``, see :func:`overfitting_monitor`).
        resume: continue from ``out_dir/checkpoint.pt`` when present (same
            config required); without it an existing checkpoint is an error.
        stop_after: stop (checkpointed) once this many epochs are done — an
            interruption on purpose; a later ``resume=True`` call finishes.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ... Under
            ``torchrun`` each rank uses ``cuda:LOCAL_RANK`` (or the CPU, gloo).
        progress: progress bars (rank 0 only).
        overwrite: replace the run in ``out_dir``: without ``resume`` every run file is removed
            first (a fresh start); with it, only a run of other settings is.
    Returns:
        :class:`TrainResult`; the model is returned unwrapped, in eval mode.
    """
    c = config.resolved()
    out_dir = Path(out_dir)
    _check_train_data(train_data)
    dist_info = init_distributed(resolve_device(device))
    if not dist_info.main:
        return _fit(model, train_data, c, out_dir, test_data, resume, stop_after, device, progress, dist_info)
    with locked(out_dir):
        if overwrite and not resume:
            clear_run(out_dir)  # a fresh run replaces whatever the folder holds, even unreadable files
        check_folder(out_dir, c.to_dict(), overwrite=overwrite, normalise=TrainConfig.normalise)
        if (out_dir / FINAL).exists() and not (out_dir / CHECKPOINT).exists() and not resume:
            raise FileExistsError(f"out: {out_dir} already holds a finished run; pass --resume (resume=True) "
                                  "to load it, --overwrite to train it again, or choose another folder")
        return _fit(model, train_data, c, out_dir, test_data, resume, stop_after, device, progress, dist_info)


def _fit(model: nn.Module, train_data: Tuple[Tensor, Tensor], c: TrainConfig, out_dir: Path,
         test_data: Optional[Tuple[Tensor, Tensor]], resume: bool, stop_after: Optional[int],
         device: str | torch.device, progress: bool, dist_info: Dist) -> TrainResult:
    """The body of :func:`fit` (rank 0 holds the folder's lock)."""
    x_all, y_all = _check_train_data(train_data)
    dev = resolve_device(device, dist_info)
    model = model.to(dev)
    opt, sched = _make_optimizer(model, c)
    gen = torch.Generator(device=dev)
    gen.manual_seed(c.seed * 7919 + dist_info.rank + 1)
    metrics: List[Dict[str, Any]] = []
    start = 0

    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists():
        if not resume:
            raise FileExistsError(
                f"out_dir: {out_dir} already holds a checkpoint; pass resume=True (--resume) "
                "to continue it, or choose another folder"
            )
        ck = load_run_file(ckpt_path, need=("config", "model", "optimizer", "scheduler", "epoch", "metrics", "rng"))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        _load_scheduler_state(sched, ck["scheduler"])
        start = int(ck["epoch"])
        metrics = list(ck["metrics"])
        set_global_rng_state(ck["rng"])
        gens = ck["rng"]["generator"]
        gen.set_state(gens[dist_info.rank % len(gens)])
    elif dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / CONFIG, json.dumps(c.to_dict(), indent=2) + "\n")

    x_all, y_all = x_all.to(dev), y_all.to(dev)
    test = None if test_data is None else tuple(t.to(dev) for t in _check_train_data(test_data, "test_data"))
    net: nn.Module = model
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    end = c.epochs if stop_after is None else min(c.epochs, stop_after)
    show = progress and dist_info.main
    for epoch in range(start, end):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        sums = _train_epoch(net, model, x_all, y_all, c, opt, gen, epoch, dist_info, dev, show)
        sched.step()
        m = {"epoch": epoch + 1, "lr": lr, **sums, "time_s": round(time.perf_counter() - t0, 3)}
        if test is not None:
            m["test_acc"] = accuracy(model, *test, batch_size=1000)
            if c.defence in _MONITORED_DEFENCES:
                m.update(overfitting_monitor(model, *test, eps=float(c.at_eps)))
        metrics.append(m)
        if show:
            print(json.dumps(m), flush=True)
        gens = gather_states(gen.get_state(), dist_info)
        if dist_info.main:
            state = {
                "format": _FORMAT,
                "epoch": epoch + 1,
                "config": c.to_dict(),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": _scheduler_state(sched),
                "metrics": metrics,
                "rng": {**global_rng_state(), "generator": gens},
            }
            atomic_torch_save(state, ckpt_path)
            _write_metrics(out_dir, metrics)
        barrier(dist_info)

    done = len(metrics)
    if done >= c.epochs and dist_info.main and (start < c.epochs or not (out_dir / FINAL).exists()):
        atomic_torch_save({"format": _FORMAT, "config": c.to_dict(), "model": model.state_dict(),
                           "epochs": done, "metrics": metrics}, out_dir / FINAL)
    barrier(dist_info)
    model.eval()
    return TrainResult(model, out_dir, done, metrics)


def overfitting_monitor(model: nn.Module, x: Tensor, y: Tensor, *, eps: float) -> Dict[str, float]:
    """PGD-10 (step ε/4, random start) and FGSM accuracy in [0, 1] at ``eps`` on a fixed slice of
    :data:`MONITOR_SIZE` test images (``x [N, *S]``, ``y [N]``; all when fewer), model in eval mode
    (its modes restored).

    Deterministic and free of side effects on every RNG: the slice and the PGD starts come from
    generators of a fixed seed. Returns ``{"slice_pgd_acc", "slice_fgsm_acc"}``.
    """
    from .._grid import eval_mode

    idx = subset_indices(x.shape[0], MONITOR_SIZE, _MONITOR_SEED).to(x.device)
    xs, ys = x.index_select(0, idx), y.index_select(0, idx)
    with eval_mode(model):
        pgd_acc = pgd_accuracy(model, xs, ys, eps=eps, alpha=eps / 4, steps=_MONITOR_STEPS,
                               batch_size=MONITOR_SIZE, seed=_MONITOR_SEED)
        fgsm_acc = fgsm_accuracy(model, xs, ys, eps=eps, batch_size=MONITOR_SIZE)
    return {"slice_pgd_acc": pgd_acc, "slice_fgsm_acc": fgsm_acc}


def _check_train_data(data: Any, name: str = "train_data") -> Tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        if hasattr(data, "tensors") and len(data.tensors) == 2:  # TensorDataset
            data = data.tensors
        else:
            raise TypeError(f"{name}: expected (x, y) tensors or a TensorDataset, got {type(data).__name__}")
    x, y = data
    if not (isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2):
        raise ValueError(f"{name}: expected x as a floating-point [N, *S] tensor, got {getattr(x, 'shape', x)!r}")
    if not (isinstance(y, Tensor) and y.dtype == torch.int64 and y.shape == x.shape[:1]):
        raise ValueError(
            f"{name}: expected y as an int64 [{x.shape[0]}] tensor, got "
            f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one example, got none")
    return x, y


def _train_epoch(
    net: nn.Module,
    model: nn.Module,
    x_all: Tensor,
    y_all: Tensor,
    c: TrainConfig,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    epoch: int,
    d: Dist,
    dev: torch.device,
    show: bool,
) -> Dict[str, float]:
    """One pass over this rank's share of the data; returns the epoch's mean loss,
    cross-entropy, penalty and training accuracy over all ranks."""
    net.train()
    order = torch.tensor(_epoch_indices(x_all.shape[0], epoch, c.seed, d), dtype=torch.long, device=dev)
    batches = [order[i:i + c.batch_size] for i in range(0, order.numel(), c.batch_size)]
    tot_loss = tot_ce = tot_pen = 0.0
    correct = count = 0
    params = [p for p in net.parameters() if p.requires_grad]
    defence = c.defence_spec()
    bar = progress_bar(len(batches), f"epoch {epoch + 1}/{c.epochs} [{c.defence}]", show, unit="batch")
    for idx in batches:
        x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)
        loss, ce, pen, logits = train_step(net, x, y, defence, opt, generator=gen, attack_model=model,
                                           params=params)
        b = y.shape[0]
        tot_loss += float(loss.detach()) * b
        tot_ce += float(ce.detach()) * b
        tot_pen += float(pen.detach()) * b
        correct += int((logits.detach().argmax(1) == y).sum())
        count += b
        bar.set_postfix(loss=f"{tot_loss / count:.4f}", acc=f"{correct / count:.3f}")
        bar.update(1)
    bar.close()
    tot_loss, tot_ce, tot_pen, correct, count = all_reduce_sum(
        [tot_loss, tot_ce, tot_pen, float(correct), float(count)], d, dev)
    return {"loss": tot_loss / count, "ce": tot_ce / count, "penalty": tot_pen / count,
            "train_acc": correct / count}


def train(
    config: TrainConfig,
    out_dir: os.PathLike | str,
    *,
    data_dir: Optional[str] = None,
    download: bool = False,
    resume: bool = False,
    stop_after: Optional[int] = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    eval_test: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Seed, build the model and the data from ``config``'s names, and :func:`fit`.

    A finished run (``out_dir/model.pt`` present) is loaded, not retrained, when
    ``resume`` is set.
    """
    c = config.resolved()
    out_dir = Path(out_dir)
    if resume and is_complete(out_dir):
        final = load_run_file(out_dir / FINAL)
        if TrainConfig.normalise(final["config"]) == c.to_dict():
            model = build_model(c)
            model.load_state_dict(final["model"])
            return TrainResult(model.eval(), out_dir, int(final["epochs"]), list(final["metrics"]))
    seed_everything(c.seed)
    model = build_model(c)
    train_xy = load_data(c, "train", data_dir=data_dir, download=download)
    test_xy = load_data(c, "test", data_dir=data_dir, download=download) if eval_test else None
    return fit(model, train_xy, c, out_dir, test_data=test_xy, resume=resume, stop_after=stop_after,
               device=device, progress=progress, overwrite=overwrite)


@dataclass(frozen=True)
class Runtime:
    """Where the data are and how a run of models runs, the same for every model of a demo,
    reproduction or front (``fastland.experiments.run_demo``, ``reproduce``, ``front``).

    Attributes:
        data_dir: the data sets' root (None: the data set's default places).
        download: fetch a missing data set where the data set allows it.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        progress: progress bars and lines (False: quiet).

    Example:
        >>> reproduce("fmnist-lenet", "runs/r", epochs=20, runtime=Runtime(device="cpu", progress=False))
    """

    data_dir: Optional[str] = None
    download: bool = False
    device: str = "auto"
    progress: bool = True

    def data(self, c: TrainConfig, split: str) -> Tuple[Tensor, Tensor]:
        """:func:`load_data` of ``c`` and ``split`` from this runtime's data."""
        return load_data(c, split, data_dir=self.data_dir, download=self.download)

    def train(self, c: TrainConfig, run_dir: os.PathLike | str) -> TrainResult:
        """:func:`train` of ``c`` into ``run_dir``, resuming (a finished run is loaded)."""
        return train(c, run_dir, data_dir=self.data_dir, download=self.download, resume=True,
                     device=self.device, progress=self.progress)


def load_trained(run_dir: os.PathLike | str, device: str | torch.device = "cpu") -> Tuple[nn.Module, TrainConfig]:
    """The finished model of ``run_dir`` (eval mode) and its config; a run folder with
    only ``checkpoint.pt`` (unfinished) gives its latest epoch's weights."""
    run_dir = Path(run_dir)
    path = run_dir / FINAL if (run_dir / FINAL).exists() else run_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"run_dir: no {FINAL} or {CHECKPOINT} in {run_dir}; train a model there first")
    state = load_run_file(path)
    saved = saved_config(run_dir)
    if saved is not None and TrainConfig.normalise(saved) != TrainConfig.normalise(state["config"]):
        raise RunFileError(f"{path}: written with other settings than {run_dir / CONFIG}; the folder mixes two "
                           "runs, retrain it with --overwrite")
    c = TrainConfig.from_dict(state["config"])
    model = build_model(c)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device)).eval(), c
