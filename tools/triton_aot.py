"""Ahead-of-time compilation of fastland's Triton kernels for real GPUs, with no GPU present.

A tool, not part of the library. The Triton interpreter (``TRITON_INTERPRET=1``, what the
tests run on CPU) checks semantics only: it accepts code a real compile rejects and says
nothing of registers, spills or memory instructions. This tool compiles every Triton
kernel of :mod:`fastland.ops` for named targets (``sm_80``, ``sm_90``) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads the
cubin with the ``cuobjdump`` shipped inside the triton package: registers, shared
memory, stack/local (spill) bytes (``-res-usage``) and the global loads and stores of
the SASS (``-sass``), how many of them 128-bit.

No second copy of the launch configurations: each compile is what an op launches.
Every op module exposes ``forward_plan``/``backward_plan`` (the launches for given
inputs, planned and not run) and its ``LAUNCH_CONFIGS``/``launch_configs``; the plans
run here on ``meta`` tensors of given sizes, so the kernels, block sizes, ``num_warps``,
``num_stages`` and constexprs are the op's own. The argument specialisation (16-byte
pointer alignment, integers divisible by 16, integers equal to 1) comes from Triton's
own binder, as at a real launch.

Command line (from the repository root)::

    python tools/triton_aot.py                 # the table, one row per compile
    python tools/triton_aot.py --json rows.json --markdown table.md
    python tools/triton_aot.py --cases bench --dtypes float32 --targets sm_90

It exits non-zero, naming the kernel, configuration, dtype and target, where a compile
fails. Under ``TRITON_INTERPRET=1`` the kernels are interpreter objects that cannot be
compiled, so the command (and :func:`compile_report`) re-runs itself in a subprocess with
that variable removed. Tests: ``make aot`` (``tests/test_aot.py``, marker ``aot``).
The size cases, plans and floors live in ``aot_cases.py``, the cubin reading in
``aot_cubin.py`` (both beside this file).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from fastland.ops._scaffold import Launch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aot_cases import (  # noqa: E402  (sibling modules, whether run as a script or imported)
    ALIGNED_SIZES,
    BENCH_SIZES,
    CASE_SETS,
    H100_BYTES_PER_S,
    H100_FP32_FLOPS,
    KINDS,
    OPS,
    SizeCase,
    _config_params,
    _config_table,
    _INTERPRET_VAR,
    _jit_kernels,
    _kernel_attributes,
    _op_module,
    _require_compilable,
    capture_launches,
    floor_row,
    floors_markdown,
    size_cases,
)
from aot_cubin import (  # noqa: E402
    Row,
    count_global_accesses,
    cuobjdump,
    failure_message,
    markdown_table,
    parse_res_usage,
)

__all__ = [
    "TARGETS",
    "DEFAULT_DTYPES",
    "OPS",
    "SizeCase",
    "size_cases",
    "CompileJob",
    "Row",
    "capture_launches",
    "plan",
    "compile_job",
    "compile_jobs",
    "compile_report",
    "parse_res_usage",
    "count_global_accesses",
    "markdown_table",
    "floor_row",
    "floors_markdown",
    "main",
]

# compute capability of each named target
TARGETS: Dict[str, int] = {"sm_80": 80, "sm_90": 90}
# the dtypes compiled by default (each only where the op's TRITON_DTYPES has it)
DEFAULT_DTYPES: Tuple[str, ...] = ("float32", "bfloat16", "float64")
# the ops with Triton kernels: module fastland.ops.<op>, plans {forward,backward}_plan
# --------------------------------------------------------------------------- compile jobs


@dataclass
class CompileJob:
    """One ahead-of-time compile: a kernel, its launch (configuration, dtype, sizes) and a target."""

    op: str
    kind: str
    case: str
    sizes: str
    kernel: str
    dtype: str
    target: str
    config: str
    params: Dict[str, int]
    specialisation: str
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    attrs: Dict[Tuple[int, ...], Any]
    options: Dict[str, Any]


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtypes: expected torch dtype names such as 'float32', got {name!r}")
    return dt


def _config_label(kwargs: Dict[str, Any]) -> str:
    """``"BLOCK_B=128 BLOCK_C=16 num_warps=4"``: the block sizes and warps of a launch (sorted)."""
    keys = sorted(k for k in kwargs if k.startswith("BLOCK_")) + [k for k in ("num_warps", "num_stages") if k in kwargs]
    return " ".join(f"{k}={kwargs[k]}" for k in keys)


def _launch_params(kwargs: Dict[str, Any]) -> Dict[str, int]:
    """The integer launch parameters: ``BLOCK_*`` sizes and ``num_warps`` (as :func:`_config_params`)."""
    return {k: int(v) for k, v in kwargs.items() if k.startswith("BLOCK_") or k == "num_warps"}


def _specialisation_label(kernel, signature: Dict[str, str], attrs) -> str:
    """Which integer arguments Triton specialised: ``"div16: B C; =1: P"`` (``"none"`` if none).

    ``div16``: known to be a multiple of 16 (``tt.divisibility``); ``=1``: equal to 1,
    compiled in as a constant — as the JIT does for those values at a real launch.
    """
    names = kernel.arg_names
    runtime = [n for n, p in zip(names, kernel.params) if not p.is_constexpr]
    div = {names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in [list(x) for x in v]}
    div_ints = [n for n in runtime if n in div and signature[n].startswith(("i", "u"))]
    ones = [n for n in runtime if signature[n] == "constexpr"]
    parts = []
    if div_ints:
        parts.append("div16: " + " ".join(div_ints))
    if ones:
        parts.append("=1: " + " ".join(ones))
    return "; ".join(parts) or "none"


def _bind(kernel, launch: Launch, target: int):
    """Triton's own binder on the recorded arguments: (signature, constexprs, attrs, options).

    The same steps as ``JITFunction.run`` at a real launch (argument
    specialisation included), with the backend of ``target`` instead of the
    current device's. Uses Triton 3.8's ``create_function_from_signature`` and
    ``JITFunction._pack_args`` (internal API: a Triton upgrade may need this revisited).
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", target, 32))
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _constexpr_names(constexprs: Dict[Any, Any], arg_names: Sequence[str]) -> Dict[str, Any]:
    return {arg_names[k[0]] if isinstance(k, tuple) else k: v for k, v in constexprs.items()}


def plan(
    ops: Iterable[str] = OPS,
    dtypes: Iterable[str] = DEFAULT_DTYPES,
    targets: Iterable[str] = tuple(TARGETS),
    case_sets: Iterable[str] = CASE_SETS,
) -> List[CompileJob]:
    """Every compile job: each size case's launches × dtype (where the op's ``TRITON_DTYPES`` has it) × target.

    Needs a process where the kernels are ``JITFunction`` objects (``TRITON_INTERPRET`` unset).
    """
    targets = tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"targets: expected a subset of {tuple(TARGETS)}, got {t!r}")
    dtype_names = tuple(dtypes)
    jobs: List[CompileJob] = []
    seen = set()
    for dname in dtype_names:
        dt = _dtype(dname)
        for case in size_cases(ops, case_sets, dt):
            module = _op_module(case.op)
            _require_compilable(module)
            kernels = _jit_kernels(module)
            if dt not in module.TRITON_DTYPES:
                continue
            for launch in capture_launches(case, dt):
                kernel = kernels[launch.name]
                for target in targets:
                    signature, constexprs, attrs, options = _bind(kernel, launch, TARGETS[target])
                    named = _constexpr_names(constexprs, kernel.arg_names)
                    job = CompileJob(
                        op=case.op,
                        kind=case.kind,
                        case=case.case,
                        sizes=case.label,
                        kernel=launch.name,
                        dtype=dname,
                        target=target,
                        config=_config_label({**named, "num_warps": options.num_warps}),
                        params=_launch_params({**named, "num_warps": options.num_warps}),
                        specialisation=_specialisation_label(kernel, signature, attrs),
                        signature=signature,
                        constexprs=constexprs,
                        attrs=attrs,
                        options=dict(options.__dict__),
                    )
                    key = (job.case, job.sizes, job.kernel, job.dtype, job.target)
                    if key not in seen:
                        seen.add(key)
                        jobs.append(job)
    return sorted(jobs, key=_table_order(jobs, dtype_names, targets))


def _table_order(jobs: Sequence[CompileJob], dtypes: Sequence[str], targets: Sequence[str]):
    """Sort key: case set, op, kind, sizes (first appearance), dtype, target — a readable table."""
    first: Dict[str, int] = {}
    for j in jobs:
        first.setdefault(j.sizes, len(first))
    return lambda j: (CASE_SETS.index(j.case), OPS.index(j.op), KINDS.index(j.kind), first[j.sizes],
                      dtypes.index(j.dtype), targets.index(j.target))


def _compile(job: CompileJob):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _jit_kernels(_op_module(job.op))[job.kernel]
    src = ASTSource(fn=kernel, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
    return triton.compile(src, target=GPUTarget("cuda", TARGETS[job.target], 32), options=job.options)


def compile_job(job: CompileJob) -> Row:
    """Compile ``job`` and read its resources; a failed compile gives a row with ``error`` set."""
    head = {k: getattr(job, k) for k in ("op", "kind", "case", "sizes", "kernel", "config", "params",
                                          "specialisation", "dtype", "target")}
    try:
        compiled = _compile(job)
        cubin = compiled.asm["cubin"]
        res = parse_res_usage(cuobjdump("-res-usage", cubin))
        counts = count_global_accesses(cuobjdump("-sass", cubin))
    except Exception as err:  # noqa: BLE001 - reported per row, the command then fails
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        return Row(**head, error=f"{type(err).__name__}: {' | '.join(lines[-6:])[:1500]}")
    shared = max(res["shared"], int(compiled.metadata.shared))
    return Row(**head, registers=res["registers"], shared=shared, stack=res["stack"], local=res["local"], **counts)


def _compile_key(job: CompileJob) -> str:
    """What determines the binary: kernel, signature, constexprs, attributes, options and target."""
    return repr((job.op, job.kernel, sorted(job.signature.items()), sorted(job.constexprs.items(), key=repr),
                 sorted(job.attrs.items()), sorted(job.options.items(), key=repr), job.target))


def compile_jobs(jobs: Sequence[CompileJob], workers: int = 1, progress: bool = False) -> List[Row]:
    """Compile every job (``workers`` processes when > 1); rows in job order; a tqdm bar when ``progress``.

    Jobs that make the same binary (e.g. two sizes with the same specialisation)
    are compiled once; their rows differ only in ``case`` and ``sizes``.
    """
    unique: Dict[str, CompileJob] = {}
    for job in jobs:
        unique.setdefault(_compile_key(job), job)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(unique), desc="aot compile", unit="kernel", file=sys.stderr)
    done: Dict[str, Row] = {}
    try:
        if workers <= 1 or len(unique) <= 1:
            results: Iterable[Row] = map(compile_job, unique.values())
            for key, row in zip(unique, results):
                done[key] = row
                if bar is not None:
                    bar.update()
        else:
            ctx = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for key, row in zip(unique, pool.map(compile_job, unique.values())):
                    done[key] = row
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return [dataclasses.replace(done[_compile_key(j)], case=j.case, sizes=j.sizes) for j in jobs]


# --------------------------------------------------------------------------- output


def _emit(path: str, text: str) -> None:
    """``text`` to stdout when ``path`` is ``"-"``, else atomically to the file ``path``."""
    if path == "-":
        print(text)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- entry points


def _kernels_interpreted() -> bool:
    """True when fastland's kernels were defined under ``TRITON_INTERPRET=1`` (no JITFunction to compile)."""
    return not _jit_kernels(_op_module(OPS[0]))


def _cli_args(ops, dtypes, targets, case_sets, workers) -> List[str]:
    return ["--ops", *ops, "--dtypes", *dtypes, "--targets", *targets, "--cases", *case_sets,
            "--workers", str(workers)]


def compile_report(
    ops: Iterable[str] = OPS,
    dtypes: Iterable[str] = DEFAULT_DTYPES,
    targets: Iterable[str] = tuple(TARGETS),
    case_sets: Iterable[str] = CASE_SETS,
    workers: int = 1,
    progress: bool = False,
    timeout: Optional[float] = None,
) -> List[Row]:
    """Plan and compile; rows in plan order. Failed compiles are rows with ``error`` set.

    When this process's kernels are interpreter objects (``TRITON_INTERPRET=1``,
    as under the test suite), runs ``python tools/triton_aot.py --json`` in a
    subprocess without that variable and reads its rows back.
    """
    ops, dtypes, targets, case_sets = tuple(ops), tuple(dtypes), tuple(targets), tuple(case_sets)
    if not _kernels_interpreted():
        return compile_jobs(plan(ops, dtypes, targets, case_sets), workers=workers, progress=progress)
    env = {k: v for k, v in os.environ.items() if k != _INTERPRET_VAR}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--json", out, "--quiet", "--keep-going",
               *_cli_args(ops, dtypes, targets, case_sets, workers)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(
                f"`{' '.join(cmd[1:])}` failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
            )
        with open(out) as f:
            return [Row(**r) for r in json.load(f)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/triton_aot.py",
        description="Compile fastland's Triton kernels ahead of time for sm_80/sm_90 (no GPU needed) and "
        "report registers, shared and local (spill) memory and global memory instructions per compile.",
    )
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="ops to compile (default: all)")
    p.add_argument("--dtypes", nargs="+", default=list(DEFAULT_DTYPES),
                   help="torch dtype names (default: %(default)s; each where the op's kernels take it)")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=tuple(TARGETS))
    p.add_argument("--cases", nargs="+", default=list(CASE_SETS), choices=CASE_SETS,
                   help="sweep: every launch configuration at aligned sizes; bench: the benchmark sizes; "
                   "aligned: memory-bound benchmark sizes rounded up to multiples of 16")
    p.add_argument("--workers", type=int, default=1, help="compile processes (default 1; Triton caches compiles)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON ('-' for stdout)")
    p.add_argument("--markdown", metavar="PATH", help="write the rows as a Markdown table ('-' for stdout)")
    p.add_argument("--floors", metavar="PATH", help="write the bench launches' bytes, FLOPs and H100 floors "
                   "(computed, not measured) as a Markdown table ('-' for stdout); compiles nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table on stdout")
    p.add_argument("--keep-going", action="store_true", help="exit 0 even when compiles fail (rows carry errors)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (1 when a compile failed, unless ``--keep-going``)."""
    args = _parser().parse_args(argv)
    from fastland.ops.utils import triton_available

    if not triton_available():
        print("tools/triton_aot.py: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    if _kernels_interpreted():  # re-run without the interpreter: its kernels cannot be compiled
        env = {k: v for k, v in os.environ.items() if k != _INTERPRET_VAR}
        argv = list(sys.argv[1:] if argv is None else argv)
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env).returncode
    for name in args.dtypes:
        _dtype(name)
    if args.floors:
        _emit(args.floors, floors_markdown(size_cases(args.ops, ["bench"])))
        return 0
    jobs = plan(args.ops, args.dtypes, args.targets, args.cases)
    rows = compile_jobs(jobs, workers=args.workers, progress=not args.quiet)
    table = markdown_table(rows)
    if args.json:
        _emit(args.json, json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    if args.markdown:
        _emit(args.markdown, table)
    if not args.quiet and "-" not in (args.json, args.markdown):
        print(table)
    if any(r.error for r in rows):
        print(failure_message(rows), file=sys.stderr)
        return 0 if args.keep_going else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
