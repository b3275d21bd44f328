"""Train and evaluate several models, one process per model: the scheduler of ``reproduce`` and ``front``.

A :class:`Job` is one model: train it into its run folder (resuming, as
:func:`fastland.experiments.train.train` with ``resume=True`` does: bit-for-bit
resume, the folder's lock) and evaluate it once (``eval.json``, reused while the
evaluation settings are the same). :func:`run_jobs` runs a list of them:

* ``n_jobs=1``: one after the other in this process (progress bars as usual);
* ``n_jobs>1``: each job in its own spawned process with ONE intra-op thread
  (``torch.set_num_threads(1)`` before any work), at most ``n_jobs`` at once,
  the longest first (:func:`estimated_cost`). A job's output goes to its log,
  ``<run folder>/job.log``; this process shows one line per running job on a
  terminal (``[at] epoch 7/20, loss 0.41, ...``), or a start and an end line per
  job in a log. A failing job does not stop the others: when all have ended,
  :class:`JobFailed` names the failed run and its log in one line.

A model's bits depend on the number of intra-op threads (CPU reductions split
differently), so a model of ``n_jobs>1`` equals, bit for bit, the one a
single-threaded ``n_jobs=1`` run trains.

A job whose run is finished and already evaluated with the same settings is
read from its folder, without a process.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from torch import Tensor, nn

from .._io import atomic_write_text
from .evaluate import EvalSettings, evaluate
from .run_folder import EVAL, METRICS, is_complete, saved_config
from .train import Runtime, TrainConfig

__all__ = ["STEP_COST", "TRAIN_SIZES", "Job", "JobResult", "JobFailed", "estimated_cost", "schedule", "finished_result",
           "cached_eval", "evaluate_run", "run_job", "run_jobs"]

# a training step's cost relative to a plain cross-entropy step, per defence
STEP_COST: Dict[str, float] = {"none": 1.0, "jacobian": 2.0, "amsreg": 2.0, "at": 10.0, "fgsm_rs": 2.2,
                               "trades": 11.0, "attack_flat": 4.0}
# training-set sizes of the data sets (synthetic: its default size)
TRAIN_SIZES: Dict[str, int] = {"fmnist": 60000, "cifar10": 50000, "synthetic": 512}
LOG = "job.log"


@dataclass(frozen=True)
class Job:
    """One model to train and evaluate.

    Attributes:
        name: the run's name (unique among the jobs; shown in progress lines).
        config: the run's settings.
        run_dir: the run folder.
        eval_settings: how to evaluate the trained model.
        title: what the in-process path prints before the job (default: ``name``).
    """

    name: str
    config: TrainConfig
    run_dir: Path
    eval_settings: EvalSettings
    title: str = ""

    @property
    def log(self) -> Path:
        """Where a job run in its own process writes its output."""
        return self.run_dir / LOG


@dataclass
class JobResult:
    """A finished job: its training time (the epochs' sum, seconds) and its ``eval.json``."""

    name: str
    train_time_s: float
    eval: Dict[str, Any]


class JobFailed(RuntimeError):
    """At least one job of :func:`run_jobs` failed (the message names the run and its log)."""


# --------------------------------------------------------------------------- order


def estimated_cost(config: TrainConfig, epochs_done: int = 0) -> float:
    """The training still to do, in CE-step units: the defence's step cost × epochs left × training size."""
    size = config.train_size or TRAIN_SIZES.get(config.dataset, 1)
    return STEP_COST.get(config.defence, 1.0) * max(config.epochs - epochs_done, 0) * size


def _epochs_done(run_dir: Path) -> int:
    path = run_dir / METRICS
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def schedule(jobs: Sequence[Job]) -> List[Job]:
    """``jobs`` longest first (:func:`estimated_cost` of what is left to train; ties keep their order)."""
    return sorted(jobs, key=lambda j: -estimated_cost(j.config, _epochs_done(j.run_dir)))


# --------------------------------------------------------------------------- one job


def _settings_json(s: EvalSettings) -> Dict[str, Any]:
    return json.loads(json.dumps(asdict(s)))


def _has_every_measure(res: Dict[str, Any], s: EvalSettings) -> bool:
    """Whether a cached ``eval.json`` holds every measure this version reports (else it is recomputed)."""
    need = {"clean_acc", "pgd_acc", "fgsm_acc", "overfitting_flags", "phi", "attack_flat", "anisotropy"}
    if s.attack == "strong":
        need |= {"worst_case_acc", "masking_flags"}
    return need <= set(res)


def cached_eval(run_dir: Path, s: EvalSettings) -> Optional[Dict[str, Any]]:
    """The run's ``eval.json`` when it was computed with settings ``s`` and holds every measure, else None."""
    path = run_dir / EVAL
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
    except (ValueError, OSError):
        return None
    if cached.get("settings") == _settings_json(s) and _has_every_measure(cached, s):
        return cached
    return None


def evaluate_run(model: nn.Module, run_dir: Path, test: Tuple[Tensor, Tensor], s: EvalSettings,
                 progress: bool) -> Dict[str, Any]:
    """``eval.json`` of the run: :func:`~fastland.experiments.evaluate.evaluate` of ``model`` on
    ``test = (x [N, *S], y [N])``, computed once per evaluation setting."""
    cached = cached_eval(run_dir, s)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    res = evaluate(model, *test, s, progress=progress)
    res["eval_time_s"] = round(time.perf_counter() - t0, 1)
    res["settings"] = _settings_json(s)
    atomic_write_text(run_dir / EVAL, json.dumps(res, indent=2) + "\n")
    return res


def _train_time(run_dir: Path) -> float:
    lines = (run_dir / METRICS).read_text().splitlines() if (run_dir / METRICS).exists() else []
    return sum(json.loads(line).get("time_s", 0.0) for line in lines if line.strip())


def finished_result(job: Job) -> Optional[JobResult]:
    """The job's result read from its folder when the run is finished with the job's settings and
    evaluated with them; else None (there is work to do)."""
    if not is_complete(job.run_dir):
        return None
    try:
        saved = saved_config(job.run_dir)
    except ValueError:
        return None
    if saved is None or TrainConfig.normalise(saved) != job.config.resolved().to_dict():
        return None
    ev = cached_eval(job.run_dir, job.eval_settings)
    return None if ev is None else JobResult(job.name, _train_time(job.run_dir), ev)


def run_job(job: Job, runtime: Runtime = Runtime(), on_phase: Optional[Callable[[str], None]] = None) -> JobResult:
    """Train the job's model (resuming; a finished run is loaded) and evaluate it (once).

    ``on_phase("evaluating")`` is called between the two."""
    r = runtime.train(job.config, job.run_dir)
    if on_phase is not None:
        on_phase("evaluating")
    test = runtime.data(job.config, "test")
    ev = evaluate_run(r.model.eval(), job.run_dir, test, job.eval_settings, runtime.progress)
    return JobResult(job.name, sum(m.get("time_s", 0.0) for m in r.metrics), ev)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _worker(job: Job, runtime: Runtime, queue: Any) -> None:
    """The body of a job's own process: one intra-op thread, output to the job's log, the result on ``queue``."""
    import torch

    torch.set_num_threads(1)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} job {job.name}, pid {os.getpid()}", flush=True)
        try:
            res = run_job(job, runtime, on_phase=lambda phase: queue.put(("phase", job.name, phase)))
        except BaseException as e:  # the parent reports it; the traceback stays in the log
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            queue.put(("failed", job.name, _one_line(e)))
            return
        sys.stdout.flush()
        sys.stderr.flush()
        queue.put(("done", job.name, asdict(res)))


# --------------------------------------------------------------------------- progress


class _Display:
    """One line per running job on a terminal (redrawn at most twice a second); start and end lines in a log."""

    def __init__(self, stream: Optional[TextIO]) -> None:
        self.stream = stream
        self.tty = stream is not None and _isatty(stream)
        self.drawn = 0  # live lines on screen
        self.last = 0.0

    def event(self, text: str) -> None:
        """A line that stays (a job started, ended or failed)."""
        if self.stream is None:
            return
        if self.tty:
            self._clear()
        print(text, file=self.stream, flush=True)

    def live(self, lines: List[str], force: bool = False) -> None:
        """The running jobs' lines (terminal only)."""
        if not self.tty or self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        self._clear()
        self.stream.write("".join(line + "\x1b[K\n" for line in lines))
        self.stream.flush()
        self.drawn = len(lines)

    def _clear(self) -> None:
        if self.drawn and self.stream is not None:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _job_line(job: Job, phase: str, t0: float) -> str:
    """``[name] epoch k/E, loss ..., train acc ..., test acc ..., s/epoch`` from the run's metrics."""
    minutes = (time.monotonic() - t0) / 60
    if phase == "evaluating":
        return f"[{job.name}] evaluating ({minutes:.1f} min)"
    path = job.run_dir / METRICS
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        lines, last = [], {}
    text = f"[{job.name}] epoch {len(lines)}/{job.config.epochs}"
    for key, name, nd in (("loss", "loss", 4), ("train_acc", "train acc", 3), ("test_acc", "test acc", 3)):
        if key in last:
            text += f", {name} {last[key]:.{nd}f}"
    if "time_s" in last:
        text += f", {last['time_s']:.1f} s/epoch"
    return text + f" ({minutes:.1f} min)"


def _summary(res: JobResult) -> str:
    ev = res.eval
    parts = [f"clean {ev['clean_acc']:.1f}%", f"PGD {ev['pgd_acc']:.1f}%"]
    if "worst_case_acc" in ev:
        parts.append(f"worst case {ev['worst_case_acc']:.1f}%")
    return ", ".join(parts)


# --------------------------------------------------------------------------- many jobs


def run_jobs(
    jobs: Sequence[Job],
    *,
    n_jobs: int = 1,
    runtime: Runtime = Runtime(),
    stream: Optional[TextIO] = None,
) -> Dict[str, JobResult]:
    """Run every job; returns ``{job.name: JobResult}``.

    Args:
        jobs: the models (distinct names and run folders).
        n_jobs: 1 runs them in this process, in the given order, and lets the first error propagate;
            more runs each in its own spawned process (see the module doc).
        runtime: the data, device and progress output (:class:`~fastland.experiments.train.Runtime`;
            progress: bars in process, with ``n_jobs>1`` the jobs' lines).
        stream: where the jobs' lines go (``sys.stderr`` by default).
    Raises:
        JobFailed: with ``n_jobs>1``, after every job has ended, when any failed.
    """
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs < 1:
        raise ValueError(f"jobs: expected an integer >= 1, got {n_jobs!r}")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names) or len({j.run_dir.resolve() for j in jobs}) != len(jobs):
        raise ValueError(f"jobs: expected distinct names and run folders, got {names}")
    done: Dict[str, JobResult] = {}
    todo: List[Job] = []
    for j in jobs:
        res = finished_result(j)
        if res is None:
            todo.append(j)
        else:
            done[j.name] = res
    if n_jobs == 1:
        for i, j in enumerate(jobs):
            if runtime.progress:
                print(f"[{i + 1}/{len(jobs)}] {j.title or j.name}", flush=True)
            if j.name not in done:
                done[j.name] = run_job(j, runtime)
        return done
    done.update(_run_in_processes(schedule(todo), n_jobs, runtime,
                                  stream=(sys.stderr if stream is None else stream) if runtime.progress else None))
    return {j.name: done[j.name] for j in jobs}


def _run_in_processes(order: List[Job], n_jobs: int, runtime: Runtime,
                      stream: Optional[TextIO]) -> Dict[str, JobResult]:
    """Run ``order`` (longest first), at most ``n_jobs`` spawned processes at once."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    display = _Display(stream)
    pending = list(order)
    running: Dict[str, Tuple[Any, Job, float]] = {}
    phases: Dict[str, str] = {}
    results: Dict[str, JobResult] = {}
    failed: Dict[str, str] = {}
    child_runtime = replace(runtime, progress=True)  # the log gets the usual start/end lines

    def finish(name: str) -> None:
        proc, job, t0 = running.pop(name)
        proc.join()
        minutes = (time.monotonic() - t0) / 60
        if name in results:
            display.event(f"[{name}] done in {minutes:.1f} min: {_summary(results[name])}")
        else:
            failed.setdefault(name, f"its process ended with exit code {proc.exitcode}")
            display.event(f"[{name}] FAILED after {minutes:.1f} min: {failed[name]} (log: {job.log})")

    while pending or running:
        while pending and len(running) < n_jobs:
            job = pending.pop(0)
            job.run_dir.mkdir(parents=True, exist_ok=True)
            proc = ctx.Process(target=_worker, args=(job, child_runtime, queue), name=f"fastland-{job.name}")
            proc.start()
            running[job.name] = (proc, job, time.monotonic())
            phases[job.name] = "training"
            display.event(f"[{job.name}] started, pid {proc.pid}, {len(results) + len(failed)}/{len(order)} "
                          f"ended; log {job.log}")
        try:
            kind, name, payload = queue.get(timeout=0.5)
        except Exception:  # queue.Empty: nothing new
            kind = ""
        if kind == "phase":
            phases[name] = payload
        elif kind == "done":
            results[name] = JobResult(**payload)
            finish(name)
        elif kind == "failed":
            failed[name] = payload
            finish(name)
        for name in [n for n, (p, _, _) in running.items() if not p.is_alive() and queue.empty()]:
            finish(name)  # died without a word (killed, out of memory)
        display.live([_job_line(job, phases[n], t0) for n, (_, job, t0) in running.items()])
    display.live([], force=True)
    if failed:
        jobs = {j.name: j for j in order}
        first = next(iter(failed))
        more = f"; also failed: {', '.join(list(failed)[1:])} (logs in their run folders)" if len(failed) > 1 else ""
        raise JobFailed(f"run {first} failed ({failed[first]}); its log: {jobs[first].log}{more}")
    return results
