"""Ahead-of-time compiles of the Triton kernels for sm_80 and sm_90, with no GPU (tools/triton_aot.py).

Marked ``aot``: not part of ``make test``; ``make aot`` runs them. The test process runs
under ``TRITON_INTERPRET=1`` (tests/conftest.py), where the kernels are interpreter
objects; :func:`triton_aot.compile_report` then
compiles in one subprocess without that variable. One module-scoped fixture
compiles every kernel in float32 at the benchmark sizes and at 16-aligned sizes
for both targets (20 distinct binaries, ~30-60 s cold here, cached by Triton
across runs); the whole sweep (every configuration, float32/bfloat16/float64) is
the ``slow`` test.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

pytest.importorskip("triton")

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import triton_aot as aot  # noqa: E402

pytestmark = pytest.mark.aot

TARGETS = tuple(aot.TARGETS)
THREADS_PER_WARP = 32
FP32_PER_128_BITS = 4


def _module(op: str):
    return importlib.import_module(f"fastland.ops.{op}")


def _kernel_names(op: str) -> List[str]:
    """The op module's Triton kernels, by attribute name (``_<op>_{fwd,bwd}_kernel``)."""
    return sorted(aot._kernel_attributes(_module(op)))


def _env_without_interpreter() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def rows() -> List[aot.Row]:
    """float32 compiles of every kernel at the benchmark and aligned sizes, for sm_80 and sm_90."""
    return aot.compile_report(dtypes=("float32",), case_sets=("bench", "aligned"), workers=2, timeout=900)


def _failures(rows: List[aot.Row]) -> str:
    return "\n".join(f"{r.kernel} [{r.config}] {r.dtype} {r.target} at {r.sizes}: {r.error}" for r in rows if r.error)


# --------------------------------------------------------------------------- compiles


def test_every_kernel_compiles_for_both_targets(rows):
    assert not _failures(rows), _failures(rows)
    compiled = {(r.kernel, r.target) for r in rows if r.registers > 0}
    expected = {(k, t) for op in aot.OPS for k in _kernel_names(op) for t in TARGETS}
    assert len(expected) == 6 * len(TARGETS)  # forward and backward of three ops
    assert expected <= compiled, f"not compiled: {sorted(expected - compiled)}"


def test_no_configuration_spills_at_benchmark_sizes(rows):
    spilling = [f"{r.kernel} [{r.config}] {r.target} at {r.sizes}: stack {r.stack} B, local {r.local} B, "
                f"{r.spill_instructions} LDL/STL" for r in rows if r.spills]
    assert not spilling, "\n".join(spilling)
    assert all(0 < r.registers <= 255 for r in rows)


def test_benchmark_launches_use_the_launchers_configuration(rows):
    """Each compile's block sizes and warps are one entry of the op's LAUNCH_CONFIGS (the one table)."""
    for r in rows:
        entries = aot._config_table(r.op, r.kind, getattr(torch, r.dtype))
        assert r.params in [aot._config_params(r.op, e) for e in entries], (r.kernel, r.params, entries)


# the tile each memory-bound kernel streams, and which of its global accesses carry it
TILE_STREAMS: Tuple[Tuple[str, str, str], ...] = (
    ("_grid_combine_fwd_kernel", "bench", "stg128"),  # out [BLOCK_G, BLOCK_D]
    ("_grid_combine_bwd_kernel", "bench", "ldg128"),  # grad_out [BLOCK_G, BLOCK_D] per loop step
    ("_grid_relative_loglik_fwd_kernel", "aligned", "ldg128"),  # logits [BLOCK_R, BLOCK_C]
    ("_grid_relative_loglik_bwd_kernel", "aligned", "ldg128"),  # logits [BLOCK_R, BLOCK_C]
    ("_grid_relative_loglik_bwd_kernel", "aligned", "stg128"),  # grad_logits [BLOCK_R, BLOCK_C]
)


@pytest.mark.parametrize("kernel, case, counter", TILE_STREAMS, ids=lambda v: str(v))
def test_memory_bound_tiles_move_with_128_bit_accesses_where_aligned(rows, kernel, case, counter):
    """float32 rows with 16-aligned sizes: every element of the streamed tile by a 128-bit access.

    A program's tile has ``prod(BLOCK_*)`` elements; ``n`` 128-bit instructions per
    thread move ``n · 4 · 32 · num_warps`` of them, which must equal the tile exactly.
    """
    mine = [r for r in rows if r.kernel == kernel and r.case == case]
    assert len(mine) >= len(TARGETS)
    for r in mine:
        blocks = [v for k, v in r.params.items() if k.startswith("BLOCK_")]
        tile = math.prod(blocks)
        moved = getattr(r, counter) * FP32_PER_128_BITS * THREADS_PER_WARP * r.params["num_warps"]
        assert moved == tile, f"{r.kernel} {r.target} at {r.sizes}: {counter}={getattr(r, counter)}, tile {tile}"


def test_rows_of_ten_logits_cannot_use_128_bit_accesses(rows):
    """C = 10: rows start 40 bytes apart, so no 16-byte alignment; the loads are 32-bit (benchmarks notes)."""
    mine = [r for r in rows if r.op == "grid_relative_loglik" and r.case == "bench"]
    assert len(mine) == 2 * len(TARGETS)
    for r in mine:
        assert r.ldg128 == 0 and r.stg128 == 0, r
        threads = THREADS_PER_WARP * r.params["num_warps"]
        # one 32-bit load per logit: each thread issues BLOCK_R·BLOCK_C / threads of them
        assert r.ldg >= r.params["BLOCK_R"] * r.params["BLOCK_C"] // threads, r


def test_specialisation_is_the_jits(rows):
    """Integer arguments divisible by 16 are marked so, as Triton's JIT marks them at a launch."""
    by_sizes = {(r.kernel, r.sizes): r.specialisation for r in rows if r.target == "sm_90"}
    assert by_sizes[("_grid_combine_fwd_kernel", "N=8 G=441 D=784")] == "div16: D"
    assert by_sizes[("_grid_relative_loglik_fwd_kernel", "N=64 G=448 C=16")] == "div16: R G C"
    assert by_sizes[("_weighted_projection_fwd_kernel", "B=4096 C=10 P=8 softmax")] == "div16: B"
    # P = 1 is compiled in as a constant, as the JIT does for integers equal to 1
    assert by_sizes[("_weighted_projection_fwd_kernel", "B=256 C=1000 P=1 softmax")] == "div16: B; =1: P"


def test_markdown_table_has_one_row_per_compile(rows):
    table = aot.markdown_table(rows).strip().splitlines()
    assert len(table) == 2 + len(rows)
    assert "regs" in table[0] and "LDG.128" in table[0] and "STG.128" in table[0] and "local B" in table[0]
    first = rows[0]
    assert f"`{first.kernel}`" in table[2] and first.target in table[2] and f"| {first.registers} |" in table[2]


# --------------------------------------------------------------------------- launch capture (no compile)


@pytest.mark.parametrize("op", aot.OPS)
def test_sweep_launches_every_launch_config(op):
    """The sweep's sizes make each plan pick every entry of its LAUNCH_CONFIGS: the one it was made for.

    Width-keyed tables (weighted_projection, grid_relative_loglik): an entry's last block
    size is the widest row it serves, its BLOCK_C (fastland.ops._scaffold.pick_config).
    """
    for kind in aot.KINDS:
        entries = aot._config_table(op, kind)
        seen = set()
        for case in aot.size_cases([op], ["sweep"]):
            if case.kind != kind:
                continue
            (launch,) = aot.capture_launches(case, torch.float32)
            entry = entries[case.config_index]
            params = aot._launch_params(launch.kwargs)
            assert params == aot._config_params(op, entry), (case.label, params, entry)
            assert launch.kwargs["num_stages"] == entry.num_stages
            if op != "grid_combine":
                assert params["BLOCK_C"] == entry.block[-1] == dict(case.sizes)["C"]
            seen.add(case.config_index)
        assert seen == set(range(len(entries)))


def test_capture_plans_on_meta_tensors_and_leaves_the_op_module_alone():
    module = _module("grid_combine")
    before = dict(vars(module))
    case = aot.SizeCase("grid_combine", "forward", (("N", 3), ("G", 5), ("D", 7)), "bench")
    (launch,) = aot.capture_launches(case, torch.bfloat16)
    assert launch.name == "_grid_combine_fwd_kernel"
    assert launch.kernel is module._grid_combine_fwd_kernel
    tensors = [a for a in launch.args if isinstance(a, torch.Tensor)]
    assert len(tensors) == 6 and all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in tensors)
    assert tensors[-1].shape == (3, 5, 7)  # the output the plan allocated
    assert launch.args[-2:] == (5, 7)  # G, D
    assert all(vars(module)[k] is v for k, v in before.items())


# --------------------------------------------------------------------------- floors on paper


def test_floor_bytes_are_every_argument_once():
    """Compulsory traffic against the shapes written out by hand (float32, 4 bytes)."""
    gc = aot.SizeCase("grid_combine", "forward", (("N", 8), ("G", 441), ("D", 784)), "bench")
    N, G, D = 8, 441, 784
    row = aot.floor_row(gc, torch.float32)
    assert row["bytes"] == 4 * (3 * N * D + 2 * G + N * G * D) == 11_142_600
    assert row["memory_floor_us"] == pytest.approx(11_142_600 / 3.35e12 * 1e6)
    wp = aot.SizeCase("weighted_projection", "backward", (("B", 256), ("C", 1000), ("P", 1)), "bench", True)
    B, C, P = 256, 1000, 1
    assert aot.floor_row(wp, torch.bfloat16)["bytes"] == 2 * (2 * P * B * C + 2 * B * C + B)
    grl = aot.SizeCase("grid_relative_loglik", "backward", (("N", 64), ("G", 441), ("C", 10)), "bench")
    assert aot.floor_row(grl)["bytes"] == 4 * (64 * 441 + 2 * 64 * 441 * 10)


def test_every_benchmark_launch_is_memory_bound_on_an_h100():
    ridge = aot.H100_FP32_FLOPS / aot.H100_BYTES_PER_S  # 20 FLOP per byte
    for case in aot.size_cases(case_sets=["bench"]):
        row = aot.floor_row(case)
        assert 0 < row["flop_per_byte"] < ridge / 10, row


# --------------------------------------------------------------------------- parsing cuobjdump


RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _k:
  REG:40 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _helper:
  REG:72 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
        /*01e0*/              @!P0 LDG.E.64 R16, desc[UR6][R4.64] ;               /* 0x0000000604108981 */
        /*0310*/              @!P0 LDG.E R12, desc[UR6][R28.64] ;                 /* 0x000000061c0c8981 */
        /*0320*/                   LDG.E.128.CONSTANT R8, desc[UR6][R2.64] ;      /* 0x0000000602087981 */
        /*0330*/               @P1 LDG.E.U16 R3, desc[UR6][R2.64] ;               /* 0x0000000602037981 */
        /*0340*/                   STL [R1+0x4], R3 ;                             /* 0x0000000301007387 */
        /*0350*/                   LDL R5, [R1+0x4] ;                             /* 0x0000000401057983 */
        /*09c0*/               @P0 STG.E.128 desc[UR6][R28.64], R12 ;             /* 0x0000000c1c000986 */
        /*0a00*/                   STG.E desc[UR6][R2.64], R0 ;                   /* 0x0000000002007986 */
        /*0a10*/                   MOV R1, c[0x0][0x28] ;  // LDG.E.128 in a comment is not counted
"""


def test_parse_res_usage_takes_max_registers_and_sums_memory():
    assert aot.parse_res_usage(RES_USAGE) == {"registers": 72, "stack": 16, "shared": 1024, "local": 8}
    with pytest.raises(ValueError, match="REG"):
        aot.parse_res_usage("cuobjdump: nothing here")


def test_count_global_accesses_reads_opcodes_and_widths():
    counts = aot.count_global_accesses(SASS)
    assert counts == {
        "ldg": 4, "ldg128": 1, "stg": 2, "stg128": 1,
        "ldg_bytes": 8 + 4 + 16 + 2, "stg_bytes": 16 + 4, "spill_instructions": 2,
    }


def test_row_reports_spills_from_any_local_memory_use():
    head = dict(op="o", kind="forward", case="bench", sizes="", kernel="_k", config="", params={},
                specialisation="none", dtype="float32", target="sm_90")
    clean = aot.Row(**head, registers=32, shared=0, stack=0, local=0, spill_instructions=0)
    assert not clean.spills
    assert aot.Row(**head, registers=255, shared=0, stack=8, local=0, spill_instructions=0).spills
    assert aot.Row(**head, registers=255, shared=0, stack=0, local=0, spill_instructions=2).spills


# --------------------------------------------------------------------------- failures and the command


FAILING_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    import triton_aot as aot
    (job,) = aot.plan(["grid_combine"], ["float32"], ["sm_90"], ["bench"])[:1]
    job.options["num_warps"] = 3  # not a power of two: the compile must fail
    job.config = job.config.replace("num_warps=4", "num_warps=3")
    aot.plan = lambda *a, **k: [job]
    sys.exit(aot.main(["--quiet", "--markdown", sys.argv[1]]))
    """
)


def test_a_failed_compile_fails_the_command_naming_kernel_config_dtype_target(tmp_path):
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, "-c", FAILING_SCRIPT, str(out), str(TOOLS)], env=_env_without_interpreter(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "1 of 1 ahead-of-time compiles failed" in done.stderr
    line = [ln for ln in done.stderr.splitlines() if "_grid_combine_fwd_kernel" in ln]
    assert line and "num_warps=3" in line[0] and "float32" in line[0] and "sm_90" in line[0], done.stderr[-2000:]
    assert "_grid_combine_fwd_kernel" in out.read_text()  # the table is still written, error in its row


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="targets"):
        aot.plan(targets=["sm_75"])
    with pytest.raises(ValueError, match="dtypes"):
        aot._dtype("float33")
    with pytest.raises(ValueError, match="case_sets"):
        aot.size_cases(case_sets=["everything"])
    with pytest.raises(ValueError, match="op"):
        aot.size_cases(ops=["softmax"])


# --------------------------------------------------------------------------- the whole sweep


@pytest.mark.slow
def test_whole_sweep_compiles_without_spills(tmp_path):
    """Every kernel × configuration × dtype × target via the command line (several minutes cold)."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(TOOLS / "triton_aot.py"), "--quiet", "--keep-going", "--workers", "2",
                           "--json", str(out)], env=_env_without_interpreter(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [aot.Row(**r) for r in json.loads(out.read_text())]
    assert not _failures(rows), _failures(rows)
    expected = {(k, t, d) for op in aot.OPS for k in _kernel_names(op) for t in TARGETS
                for d in aot.DEFAULT_DTYPES if getattr(torch, d) in _module(op).TRITON_DTYPES}
    assert expected <= {(r.kernel, r.target, r.dtype) for r in rows}
    spilling = [f"{r.kernel} [{r.config}] {r.dtype} {r.target}: stack {r.stack} B" for r in rows if r.spills]
    assert not spilling, "\n".join(spilling)
