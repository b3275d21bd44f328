"""The launches tools/triton_aot.py compiles: ops, size cases, plans on meta tensors, floors.

Every op module of :mod:`fastland.ops` exposes ``forward_plan``/``backward_plan`` (the
launches for given inputs, planned and not run), ``BLOCK_NAMES``, ``LAUNCH_CONFIGS`` and
``launch_configs(kind, dtype)``: the size cases here make the plans pick every entry
(``sweep``), the benchmark sizes (``bench``) and those rounded to 16 (``aligned``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from fastland.ops._scaffold import Launch

__all__ = ["OPS", "KINDS", "CASE_SETS", "SizeCase", "BENCH_SIZES", "ALIGNED_SIZES", "size_cases",
           "capture_launches", "floor_row", "floors_markdown", "H100_BYTES_PER_S", "H100_FP32_FLOPS"]

OPS: Tuple[str, ...] = ("weighted_projection", "grid_combine", "grid_relative_loglik")
KINDS: Tuple[str, ...] = ("forward", "backward")
CASE_SETS: Tuple[str, ...] = ("sweep", "bench", "aligned")
_INTERPRET_VAR = "TRITON_INTERPRET"


# --------------------------------------------------------------------------- sizes and inputs


@dataclass(frozen=True)
class SizeCase:
    """One launch of one op at given sizes.

    ``op`` and ``kind`` name the plan; ``sizes`` are the op's dimensions
    (weighted_projection: B, C, P; grid_combine: N, G, D; grid_relative_loglik:
    N, G, C); ``softmax`` is weighted_projection's weight flag; ``case`` says
    whether the sizes come from the configuration ``sweep`` (then ``config_index``
    is the entry of ``LAUNCH_CONFIGS[kind]`` they select), a ``bench`` size or an
    ``aligned`` one.
    """

    op: str
    kind: str
    sizes: Tuple[Tuple[str, int], ...]
    case: str
    softmax: Optional[bool] = None
    config_index: Optional[int] = None  # sweep cases: the LAUNCH_CONFIGS[kind] entry the sizes select

    @property
    def label(self) -> str:
        """``"B=4096 C=10 P=8"`` (plus ``softmax``/``uniform`` for weighted_projection)."""
        text = " ".join(f"{k}={v}" for k, v in self.sizes)
        if self.softmax is not None:
            text += " softmax" if self.softmax else " uniform"
        return text


def _meta(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``meta`` tensor (a 16-byte aligned address, as every CUDA allocation)."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _plan_args(case: SizeCase, dtype: torch.dtype) -> Tuple[Any, ...]:
    """The positional arguments of ``case``'s plan, as ``meta`` tensors of ``dtype``.

    Shapes: weighted_projection forward ``(logits [B, C], noise [P, B, C], softmax)``,
    backward ``(grad_cot [P, B, C], grad_lse [B], logits [B, C], noise [P, B, C], softmax)``;
    grid_combine forward ``(base, u, v [N, D], a, b [G])``, backward ``(grad_out [N, G, D], a, b [G])``;
    grid_relative_loglik forward ``(logits [N, G, C], base_lse [N])``, backward
    ``(grad_out [N, G], logits [N, G, C])``.
    """
    s = dict(case.sizes)
    if case.op == "weighted_projection":
        B, C, P = s["B"], s["C"], s["P"]
        if case.kind == "forward":
            return (_meta((B, C), dtype), _meta((P, B, C), dtype), case.softmax)
        return (_meta((P, B, C), dtype), _meta((B,), dtype), _meta((B, C), dtype), _meta((P, B, C), dtype), case.softmax)
    if case.op == "grid_combine":
        N, G, D = s["N"], s["G"], s["D"]
        if case.kind == "forward":
            return (_meta((N, D), dtype),) * 3 + (_meta((G,), dtype),) * 2
        return (_meta((N, G, D), dtype), _meta((G,), dtype), _meta((G,), dtype))
    if case.op == "grid_relative_loglik":
        N, G, C = s["N"], s["G"], s["C"]
        if case.kind == "forward":
            return (_meta((N, G, C), dtype), _meta((N,), dtype))
        return (_meta((N, G), dtype), _meta((N, G, C), dtype))
    raise ValueError(f"op: expected one of {OPS}, got {case.op!r}")


def _op_module(op: str):
    """The module ``fastland.ops.<op>`` (imported by name: the package re-exports a function of that name)."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    return importlib.import_module(f"fastland.ops.{op}")


def _config_table(op: str, kind: str, dtype: torch.dtype = torch.float32):
    """The launch configurations (``LaunchConfig``) the op's plans pick from for ``kind`` and ``dtype``."""
    return tuple(_op_module(op).launch_configs(kind, dtype))


def _config_params(op: str, config) -> Dict[str, int]:
    """``{"BLOCK_*": ..., "num_warps": ...}`` of one of the op's configurations."""
    params = dict(zip(_op_module(op).BLOCK_NAMES, config.block))
    params["num_warps"] = config.num_warps
    return params


def _sweep_sizes(op: str, config: Tuple[int, ...]) -> Dict[str, int]:
    """Sizes that make the plan pick ``config``, all multiples of 16 (aligned rows).

    For the width-keyed tables (weighted_projection, grid_relative_loglik) the last
    block size of a configuration is the widest row C it serves
    (:func:`fastland.ops._scaffold.pick_config`), so ``C = config.block[-1]`` selects it.
    """
    if op == "weighted_projection":
        return {"B": 4096, "C": config.block[-1], "P": 16}
    if op == "grid_relative_loglik":
        return {"N": 64, "G": 448, "C": config.block[-1]}
    return {"N": 16, "G": 448, "D": 4096}


# the benchmark sizes (benchmarks/bench_ops.py)
BENCH_SIZES: Dict[str, Tuple[Dict[str, int], ...]] = {
    "weighted_projection": ({"B": 4096, "C": 10, "P": 8}, {"B": 256, "C": 1000, "P": 1}),
    "grid_combine": ({"N": 8, "G": 441, "D": 784}, {"N": 8, "G": 441, "D": 3072}),
    "grid_relative_loglik": ({"N": 64, "G": 441, "C": 10},),
}


# the memory-bound kernels' benchmark sizes rounded up to multiples of 16, where they are not
# already: rows that allow 128-bit accesses (grid_combine's D = 784, 3072 already do)
ALIGNED_SIZES: Dict[str, Tuple[Dict[str, int], ...]] = {
    "weighted_projection": (),
    "grid_combine": (),
    "grid_relative_loglik": ({"N": 64, "G": 448, "C": 16},),
}


def size_cases(
    ops: Iterable[str] = OPS, case_sets: Iterable[str] = CASE_SETS, dtype: torch.dtype = torch.float32
) -> List[SizeCase]:
    """The launches to compile: every configuration (``sweep``), the benchmark sizes (``bench``)
    and the memory-bound kernels' benchmark sizes made 16-aligned (``aligned``).

    weighted_projection runs with both weights in the sweep, with ``softmax``
    (AMSReg) at the benchmark sizes. The sweep covers the configurations for ``dtype``.
    """
    case_sets = tuple(case_sets)
    for name in case_sets:
        if name not in CASE_SETS:
            raise ValueError(f"case_sets: expected a subset of {CASE_SETS}, got {name!r}")
    cases: List[SizeCase] = []
    for op in ops:
        _op_module(op)
        for kind in KINDS:
            if "sweep" in case_sets:
                flags = (True, False) if op == "weighted_projection" else (None,)
                for index, config in enumerate(_config_table(op, kind, dtype)):
                    for flag in flags:
                        sizes = tuple(_sweep_sizes(op, config).items())
                        cases.append(SizeCase(op, kind, sizes, "sweep", flag, index))
            flag = True if op == "weighted_projection" else None
            for name, table in (("bench", BENCH_SIZES), ("aligned", ALIGNED_SIZES)):
                if name in case_sets:
                    cases.extend(SizeCase(op, kind, tuple(sizes.items()), name, flag) for sizes in table[op])
    return cases


# --------------------------------------------------------------------------- planning launches


def _jit_kernels(module) -> Dict[str, Any]:
    """The module's compilable kernels: ``JITFunction`` attributes named ``_*_kernel``."""
    from triton.runtime.jit import JITFunction

    return {
        name: obj
        for name, obj in vars(module).items()
        if name.endswith("_kernel") and isinstance(obj, JITFunction)
    }


def _kernel_attributes(module) -> Dict[str, Any]:
    """The module's Triton kernels, ``_*_kernel`` attributes, compiled or interpreted."""
    found = {n: obj for n, obj in vars(module).items() if n.startswith("_") and n.endswith("_kernel")}
    if not found:
        raise RuntimeError(f"{module.__name__}: no Triton kernels found (is triton installed?)")
    return found


def _require_compilable(module) -> None:
    """Raise a clear error when the module's kernels are interpreter objects (``TRITON_INTERPRET=1``)."""
    _kernel_attributes(module)
    if not _jit_kernels(module):
        raise RuntimeError(
            f"{module.__name__}: the Triton kernels are interpreter objects ({_INTERPRET_VAR}=1 was set when "
            f"fastland was imported); ahead-of-time compilation needs a process without {_INTERPRET_VAR} "
            "(compile_report() and `python tools/triton_aot.py` start one)"
        )


def capture_launches(case: SizeCase, dtype: torch.dtype) -> List[Launch]:
    """The launches ``case``'s plan makes on ``meta`` tensors (``fastland.ops._scaffold.Launch``); nothing runs."""
    plan = getattr(_op_module(case.op), f"{case.kind}_plan")
    _, launches = plan(*_plan_args(case, dtype))
    if not launches:
        raise RuntimeError(f"{case.op} {case.kind}_plan launched no kernel at sizes {case.label}")
    return launches


# --------------------------------------------------------------------------- floors on paper

# H100 SXM figures the floors use (computed, not measured)
H100_BYTES_PER_S = 3.35e12
H100_FP32_FLOPS = 67e12


def _flops(case: SizeCase) -> int:
    """FLOPs of one launch, counting +, -, ×, ÷, max, exp, log and sqrt as one each.

    weighted_projection forward: softmax and logsumexp 5 per logit, per projection
    and logit 4 (square, add, divide, weight) and a sqrt per row; backward (softmax
    weight): softmax again (5), per projection and logit 5 (square, add, divide,
    multiply, accumulate), ``⟨w, s⟩`` and ``s ⊙ (w + shift)`` 4 per logit.
    grid_combine forward ``base + a·u + b·v`` 4 per output element; backward 5 per
    element of grad_out (three accumulations, two products).
    grid_relative_loglik forward 4 per logit (max, subtract, exp, add) and 3 per
    row (log, add, subtract); backward 5 per logit and a divide per row.
    """
    s = dict(case.sizes)
    if case.op == "weighted_projection":
        B, C, P = s["B"], s["C"], s["P"]
        if case.kind == "forward":
            return 5 * B * C + P * B * (4 * C + 1)
        return (9 * B * C + 5 * P * B * C + P * B) if case.softmax else 6 * B * C
    if case.op == "grid_combine":
        return (4 if case.kind == "forward" else 5) * s["N"] * s["G"] * s["D"]
    rows, C = s["N"] * s["G"], s["C"]
    return 4 * rows * C + 3 * rows if case.kind == "forward" else 5 * rows * C + rows


def floor_row(case: SizeCase, dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """The compulsory traffic, FLOPs and H100 floors of one launch (computed, not measured).

    Bytes: every tensor argument of the launch (inputs and outputs as the
    launcher allocates them) read or written exactly once — re-reads that hit
    in cache are not counted. Floors: bytes / 3.35 TB/s and FLOPs / 67 TFLOP/s.
    """
    launches = capture_launches(case, dtype)
    nbytes = sum(a.numel() * a.element_size() for ln in launches for a in ln.args if isinstance(a, torch.Tensor))
    flops = _flops(case)
    return {
        "op": case.op, "kind": case.kind, "sizes": case.label, "dtype": str(dtype).replace("torch.", ""),
        "bytes": nbytes, "flops": flops, "flop_per_byte": flops / nbytes,
        "memory_floor_us": nbytes / H100_BYTES_PER_S * 1e6, "compute_floor_us": flops / H100_FP32_FLOPS * 1e6,
    }


def floors_markdown(cases: Sequence[SizeCase], dtype: torch.dtype = torch.float32) -> str:
    """:func:`floor_row` of each case as a Markdown table."""
    out = ["| launch | sizes | dtype | bytes (MB) | FLOPs (M) | FLOP/B | memory floor | compute floor | bound by |",
           "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for case in cases:
        f = floor_row(case, dtype)
        bound = "memory" if f["memory_floor_us"] >= f["compute_floor_us"] else "compute"
        out.append(f"| {f['op']} {f['kind']} | {f['sizes']} | {f['dtype']} | {f['bytes'] / 1e6:.3f} | "
                   f"{f['flops'] / 1e6:.2f} | {f['flop_per_byte']:.2f} | {f['memory_floor_us']:.2f} µs | "
                   f"{f['compute_floor_us']:.3f} µs | {bound} |")
    return "\n".join(out) + "\n"
