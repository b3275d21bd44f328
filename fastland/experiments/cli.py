"""The ``fastland`` command (also ``python -m fastland``).

Subcommands: ``train``, ``evaluate``, ``landscape``, ``flatness``,
``reproduce``, ``front``, ``demo``; ``fastland <subcommand> --help`` lists every option
with its default. Bad arguments and missing data end with one line on stderr
(``fastland: error: ...``) and exit status 2; set ``FASTLAND_DEBUG=1`` for the
traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from .run_folder import RunFolderBusy
from ..choices import ATTACK_PENALTY_VARIANTS, DATASETS, DEFENCES, DIRECTION_KINDS, ESTIMATORS, EVAL_ATTACKS, FLATNESS_REDUCTIONS, MODELS

__all__ = ["main", "build_parser"]

_FMT = argparse.ArgumentDefaultsHelpFormatter
# exceptions that mean "the user asked for something impossible", not a bug
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
                RunFolderBusy)


class _Parser(argparse.ArgumentParser):
    """argparse with exit status 2 and one line for every error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}")
    return v


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def _fraction(s: str) -> float:
    """A number, or a fraction such as ``8/255``."""
    try:
        if "/" in s:
            num, den = s.split("/")
            v = float(num) / float(den)
        else:
            v = float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


# --------------------------------------------------------------------------- shared options


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="folder with the data set files (searched before the Debian folder "
                        "/usr/share/datasets/fashion-mnist and a torchvision root)")
    p.add_argument("--download", action="store_true", help="download the data set when missing (needs internet)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_eval_options(p: argparse.ArgumentParser, n_phi: int = 500) -> None:
    g = p.add_argument_group("evaluation (PGD defaults: the paper's per data set, docs/design.md §1)")
    g.add_argument("--eps", type=_fraction, default=None,
                   help="PGD ε in pixel units (default: 25/255 F-MNIST, 8/255 CIFAR-10)")
    g.add_argument("--alpha", type=_fraction, default=None,
                   help="PGD step size (default: 6.25/255 F-MNIST, 2/255 CIFAR-10)")
    g.add_argument("--steps", type=_positive_int, default=None,
                   help="PGD steps (default: 10 F-MNIST, 5 CIFAR-10)")
    g.add_argument("--n-clean", type=_positive_int, default=None, help="test examples for clean accuracy (None: all)")
    g.add_argument("--n-pgd", type=_positive_int, default=None, help="test examples for PGD accuracy (None: all)")
    g.add_argument("--n-phi", type=_positive_int, default=n_phi, help="test examples for Φ")
    g.add_argument("--phi-dirs", type=_positive_int, default=None,
                   help="direction pairs per example for Φ (None: fastland.flatness's default)")
    g.add_argument("--phi-span", type=_fraction, default=None,
                   help="grid half-width for Φ, pixel units (None: fastland.flatness's default)")
    g.add_argument("--phi-points", type=_positive_int, default=None,
                   help="grid points per axis for Φ (None: fastland.flatness's default)")
    g.add_argument("--reduction", choices=FLATNESS_REDUCTIONS, default="sum",
                   help="Φ sums the AMS score over grid points (the paper's) or averages it")
    g.add_argument("--eval-batch-size", type=_positive_int, default=500, help="batch size of the evaluation")
    g.add_argument("--attack", choices=EVAL_ATTACKS, default="strong",
                   help="pgd: the paper's PGD alone (fast); strong: also the worst case over APGD-CE, APGD-T "
                        "and Square, with gradient-masking flags")
    g.add_argument("--n-strong", type=_positive_int, default=1000, help="test examples for the strong evaluation")
    g.add_argument("--strong-steps", type=_positive_int, default=100, help="APGD iterations")
    g.add_argument("--n-queries", type=_positive_int, default=5000, help="Square's query budget")


# --------------------------------------------------------------------------- subcommands


def _train_parser(sub: Any) -> None:

    p = sub.add_parser("train", help="train a model with a defence", formatter_class=_FMT,
                       description="Train MODEL on DATASET with DEFENCE; a checkpoint every epoch, "
                                   "--resume continues it. Under torchrun: DDP.")
    p.add_argument("--model", choices=MODELS, default="lenet", help="architecture")
    p.add_argument("--dataset", choices=DATASETS, default="fmnist",
                   help="data set (synthetic: a small random one, for tests)")
    p.add_argument("--defence", choices=DEFENCES, default="none",
                   help="none, at (PGD-k adversarial training), jacobian, amsreg, attack_flat (flattens log p "
                        "along the FGSM direction), fgsm_rs (FGSM with a random start) or trades")
    p.add_argument("--epochs", type=_positive_int, default=200, help="epochs (lr ÷10 after 50%% and 75%%)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (per process under torchrun)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: 0.01 LeNet/DDNet, 0.1 ResNet-18)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=_nonneg_float, default=5e-4, help="SGD weight decay")
    p.add_argument("--lam", type=_nonneg_float, default=None,
                   help="λ of CE + λ/2·penalty (default: the paper's; F-MNIST 0.01 Jacobian, 0.5 AMSReg; "
                        "CIFAR-10 0.05, 1.0)")
    p.add_argument("--estimator", choices=ESTIMATORS,
                   default="projection", help="penalty estimator (Jacobian: projection or exact)")
    p.add_argument("--n-proj", type=_positive_int, default=1, help="random projections per sample")
    p.add_argument("--at-eps", type=_fraction, default=None,
                   help="ε of the training-time attack: AT's PGD and attack_flat's direction "
                        "(default: 10/255 F-MNIST, 3/255 CIFAR-10)")
    p.add_argument("--variant", choices=ATTACK_PENALTY_VARIANTS, default="difference",
                   help="attack_flat's penalty: difference (log p change along the FGSM direction), "
                        "directional (its derivative), fgsm_amsreg (AMSReg at an FGSM point), "
                        "margin (drop of the true-class margin over one FGSM step) or "
                        "kl (KL between the predictions at x and at the FGSM step)")
    p.add_argument("--at-alpha", type=_fraction, default=None, help="PGD step of adversarial training (default: 2.5·ε/steps)")
    p.add_argument("--at-steps", type=_positive_int, default=10, help="PGD steps of adversarial training")
    p.add_argument("--beta", type=_nonneg_float, default=None,
                   help="TRADES' β in CE + β·KL (default: 6.0 for --defence trades; ignored by the others)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and every random draw")
    p.add_argument("--train-size", type=_positive_int, default=None, help="train on a fixed random subset of this size")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<model>-<defence>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its saved settings (flags given with it must agree)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (without --resume: start it afresh)")
    p.add_argument("--stop-after", type=_positive_int, default=None, help=argparse.SUPPRESS)
    _add_data_options(p)
    _add_run_options(p)
    p.set_defaults(func=_command("train"))


# train flag -> TrainConfig field
def _evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="clean accuracy, PGD accuracy and Φ of a trained run, as JSON",
                       formatter_class=_FMT)
    p.add_argument("run", help="run folder written by `fastland train`")
    p.add_argument("--out", default=None, help="JSON file to write (default: RUN/eval.json)")
    p.add_argument("--no-phi", action="store_true", help="skip Φ")
    p.add_argument("--seed", type=int, default=0, help="seeds the subsets, PGD starts and Φ directions")
    _add_eval_options(p)
    _add_data_options(p)
    _add_run_options(p)
    p.set_defaults(func=_command("evaluate"))


def _flatness_parser(sub: Any) -> None:
    p = sub.add_parser("flatness", help="Φ of a trained run on test examples, as JSON", formatter_class=_FMT)
    p.add_argument("run", help="run folder written by `fastland train`")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset and the directions")
    p.add_argument("--n-phi", type=_positive_int, default=500, help="test examples")
    p.add_argument("--phi-dirs", type=_positive_int, default=None, help="direction pairs per example (None: fastland.flatness's default)")
    p.add_argument("--phi-span", type=_fraction, default=None, help="grid half-width, pixel units (None: fastland.flatness's default)")
    p.add_argument("--phi-points", type=_positive_int, default=None, help="grid points per axis (None: fastland.flatness's default)")
    p.add_argument("--reduction", choices=FLATNESS_REDUCTIONS, default="sum", help="sum (the paper's) or mean over grid points")
    _add_data_options(p)
    _add_run_options(p)
    p.set_defaults(func=_command("flatness"))


def _landscape_parser(sub: Any) -> None:
    p = sub.add_parser("landscape", help="draw Δlog p landscapes of trained runs side by side (PNG + PDF)",
                       formatter_class=_FMT)
    p.add_argument("runs", nargs="+", help="run folders written by `fastland train` (one panel each)")
    p.add_argument("--index", type=int, default=0, help="test example to centre the landscape on")
    p.add_argument("--directions", choices=DIRECTION_KINDS, default="rademacher",
                   help="random signed, Gaussian orthonormal, or FGSM + random directions")
    p.add_argument("--span", type=_fraction, default=None, help="grid half-width, pixel units (None: fastland.landscape's default)")
    p.add_argument("--grid-points", type=_positive_int, default=None, help="grid points per axis (None: fastland.landscape's default)")
    p.add_argument("--kind", choices=("contour", "surface"), default="surface", help="3D surface (the paper's) or contour map")
    p.add_argument("--seed", type=int, default=0, help="seeds the random directions")
    p.add_argument("--out", default="landscape.png", help="figure path (a .pdf is written beside it)")
    _add_data_options(p)
    _add_run_options(p)
    p.set_defaults(func=_command("landscape"))


def _reproduce_parser(sub: Any) -> None:
    from .paper import CONFIGS

    p = sub.add_parser("reproduce", help="the paper's Tables 1/2 and Figs. 1-5 for one setting", formatter_class=_FMT,
                       description="Train the four defences with the paper's settings, evaluate them, and write "
                                   "results.md/results.csv (ours beside the paper's) and Figs. 1-5. Rerunning skips "
                                   "finished models and resumes unfinished ones.")
    p.add_argument("setting", choices=sorted(CONFIGS), help="data set and architecture")
    p.add_argument("--epochs", type=_positive_int, default=200, help="epochs per model (the paper: 200)")
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce/<setting>-<epochs>ep, with "
                        "-<train-size>, -b<batch-size>, -seed<seed> appended when set)")
    p.add_argument("--defences", default="none,at,jacobian,amsreg", help="comma-separated subset to train")
    p.add_argument("--train-size", type=_positive_int, default=None, help="train on a fixed random subset of this size")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="training batch size")
    p.add_argument("--seed", type=int, default=0, help="seeds training and evaluation")
    p.add_argument("--sweep", action="store_true",
                   help="also train AT and Jacobian models of increasing strength (Figs. 2 and 4)")
    p.add_argument("--no-figures", action="store_true", help="tables only (a later run without it draws them)")
    p.add_argument("--variant", choices=ATTACK_PENALTY_VARIANTS, default="difference",
                   help="the attack_flat defence's penalty (with --defences ...,attack_flat)")
    p.add_argument("--attack-lam", type=_nonneg_float, default=None,
                   help="λ of the attack_flat defence (default: its variant's)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="seeds per model: --seed, --seed+1, ... (folders <run>, <run>-s<seed>); the tables show "
                        "means ± the standard deviation over seeds")
    _add_models_options(p, "reproduce")


def _add_models_options(p: argparse.ArgumentParser, command: str) -> None:
    """The options of a command that trains and evaluates many models (reproduce, front), and its body."""
    _add_jobs_option(p)
    _add_eval_options(p, n_phi=1000)
    _add_data_options(p)
    _add_run_options(p)
    p.set_defaults(func=_command(command))


def _add_jobs_option(p: argparse.ArgumentParser) -> None:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    p.add_argument("--jobs", type=_positive_int, default=cores,
                   help="models trained and evaluated at once, each in its own process with one thread, the "
                        "longest first (1: one after the other in this process; default: the usable cores)")


def _front_parser(sub: Any) -> None:
    p = sub.add_parser("front", help="the robustness-cost front of cheap defences on Fashion-MNIST / LeNet-5",
                       formatter_class=_FMT,
                       description="Train (resuming) and evaluate each point of the front (a defence and its "
                                   "settings, fastland.experiments.front.POINTS) with several seeds, and write "
                                   "front.md, front.csv and front.png: worst-case accuracy against the cost of a "
                                   "training step as a share of PGD-AT's, the non-dominated points marked.")
    p.add_argument("--epochs", type=_positive_int, default=20, help="epochs per model")
    p.add_argument("--out", default=None, help="output folder, one run folder <point>-s<seed> per model "
                                               "(None: runs/front/fmnist-lenet-<epochs>ep)")
    p.add_argument("--seeds", type=_positive_int, default=3,
                   help="seeds per point (0, 1, ...); the points marked 'one seed' use 1")
    p.add_argument("--points", default=None, help="comma-separated points to run (None: all)")
    p.add_argument("--costs", default="benchmarks/results/front.json",
                   help="pytest-benchmark JSON of benchmarks/bench_front.py (a step's mean time per defence)")
    p.add_argument("--figure", default=None, help="also copy front.png there (e.g. docs/front.png)")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: the table from the finished models (evaluated when needed), "
                        "the others marked missing")
    _add_models_options(p, "front")


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="Fashion-MNIST demo: LeNet-5 without defence vs AMSReg (runs/demo/report.md)",
                       formatter_class=_FMT)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--epochs", type=_positive_int, default=6, help="epochs per model")
    p.add_argument("--train-size", type=_positive_int, default=None,
                   help="train on a fixed random subset of this size (None: all 60 000 images)")
    p.add_argument("--n-eval", type=_positive_int, default=1000, help="test examples for clean and PGD accuracy")
    p.add_argument("--n-phi", type=_positive_int, default=100, help="test examples for Φ")
    p.add_argument("--seed", type=int, default=0, help="seeds training and evaluation")
    _add_data_options(p)
    _add_run_options(p)
    p.set_defaults(func=_command("demo"))


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``fastland`` argument parser (one sub-parser per subcommand)."""
    from .._version import __version__

    parser = _Parser(prog="fastland", formatter_class=_FMT,
                     description="Likelihood landscapes, flatness Φ and AMSReg for adversarial robustness.")
    parser.add_argument("--version", action="version", version=f"fastland {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_train_parser, _evaluate_parser, _landscape_parser, _flatness_parser, _reproduce_parser,
                _front_parser, _demo_parser):
        add(sub)
    return parser


def _given_flags(parser: argparse.ArgumentParser, command: str, argv: Sequence[str]) -> set:
    """The ``dest`` of every option spelled out in ``argv`` for ``command``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    given = set()
    for action in sub._actions:
        for opt in action.option_strings:
            if any(tok == opt or tok.startswith(opt + "=") for tok in argv):
                given.add(action.dest)
    return given


def _command(name: str) -> Any:
    """The body of subcommand ``name``, imported when it runs (keeps ``--help`` free of torch)."""

    def run(args: argparse.Namespace) -> int:
        from . import commands

        return getattr(commands, f"cmd_{name}")(args)

    return run


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``fastland`` command; returns the exit status (0 ok, 2 bad arguments or missing data)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, argparse errors
        return int(e.code or 0)
    args.given = _given_flags(parser, args.command, argv)
    try:
        return int(args.func(args))
    except _USER_ERRORS as e:
        if os.environ.get("FASTLAND_DEBUG"):
            raise
        print(f"fastland {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastland {args.command}: interrupted", file=sys.stderr)
        return 130
