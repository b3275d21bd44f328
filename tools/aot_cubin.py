"""Reading the cubins of tools/triton_aot.py: resources, memory instructions, the table.

``cuobjdump -res-usage`` gives registers, stack, shared and local bytes; ``cuobjdump -sass``
the instructions, of which the global loads/stores (``LDG``/``STG``), their 128-bit forms and
the local-memory (spill) accesses are counted. :class:`Row` is one compile's result.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["Row", "parse_res_usage", "count_global_accesses", "cuobjdump", "markdown_table", "failure_message"]


# --------------------------------------------------------------------------- reading the cubin


@dataclass
class Row:
    """One compile's result: the job's description and the cubin's resources.

    ``registers`` per thread; ``shared`` bytes per program (Triton's launch
    request, which includes the cubin's static shared memory); ``stack`` and
    ``local`` bytes per thread (spills land there); ``spill_instructions`` the
    SASS's ``LDL``/``STL``; ``ldg``/``stg`` global load/store instructions and
    ``ldg128``/``stg128`` those 128-bit wide, ``ldg_bytes``/``stg_bytes`` the
    bytes per thread of all of them (static: each instruction once); ``params``
    the launch's block sizes and ``num_warps``. ``error`` is set (and the numbers
    are -1) where the compile failed.
    """

    op: str
    kind: str
    case: str
    sizes: str
    kernel: str
    config: str
    params: Dict[str, int]
    specialisation: str
    dtype: str
    target: str
    registers: int = -1
    shared: int = -1
    stack: int = -1
    local: int = -1
    spill_instructions: int = -1
    ldg: int = -1
    ldg128: int = -1
    stg: int = -1
    stg128: int = -1
    ldg_bytes: int = -1
    stg_bytes: int = -1
    error: Optional[str] = None

    @property
    def wide_share(self) -> str:
        """``"0% / 100%"``: the share of load / store bytes per thread moved by 128-bit instructions."""
        def pct(n128: int, total: int) -> str:
            return f"{100 * 16 * n128 / total:.0f}%" if total > 0 else "–"

        return f"{pct(self.ldg128, self.ldg_bytes)} / {pct(self.stg128, self.stg_bytes)}"

    @property
    def spills(self) -> bool:
        """True when the kernel touches local memory (stack frame, local bytes or LDL/STL)."""
        return self.stack > 0 or self.local > 0 or self.spill_instructions > 0


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_res_usage(text: str) -> Dict[str, int]:
    """``cuobjdump -res-usage`` output → ``{"registers", "stack", "shared", "local"}`` (summed over functions)."""
    found = _RES_RE.findall(text)
    if not found:
        raise ValueError(f"cuobjdump -res-usage: no 'REG:.. STACK:.. SHARED:.. LOCAL:..' line in {text[:500]!r}")
    regs, stack, shared, local = (max(int(f[i]) for f in found) if i == 0 else sum(int(f[i]) for f in found)
                                  for i in range(4))
    return {"registers": regs, "stack": stack, "shared": shared, "local": local}


_OPCODE_RE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)


_WIDTH_BYTES = {"64": 8, "128": 16, "U16": 2, "S16": 2, "16": 2, "U8": 1, "S8": 1, "8": 1}


def _access_bytes(modifiers: Sequence[str]) -> int:
    """Bytes one thread moves with a load/store of these opcode modifiers (32-bit unless sized)."""
    for m in modifiers:
        if m in _WIDTH_BYTES:
            return _WIDTH_BYTES[m]
    return 4


def count_global_accesses(sass: str) -> Dict[str, int]:
    """Count the SASS's global loads (``LDG*``), stores (``STG*``), their 128-bit forms and local accesses.

    Returns ``{"ldg", "ldg128", "stg", "stg128", "ldg_bytes", "stg_bytes",
    "spill_instructions"}``; an opcode is 128-bit when it carries the ``.128``
    modifier (``LDG.E.128``, ``STG.E.128``); ``*_bytes`` sum the access widths
    (``.64`` 8 bytes, ``.U16`` 2, unsized 4) over the instructions, each once.
    """
    counts = {"ldg": 0, "ldg128": 0, "stg": 0, "stg128": 0, "ldg_bytes": 0, "stg_bytes": 0,
              "spill_instructions": 0}
    for opcode in _OPCODE_RE.findall(sass):
        parts = opcode.split(".")
        if parts[0] in ("LDG", "STG"):
            key = parts[0].lower()
            counts[key] += 1
            counts[key + "128"] += "128" in parts[1:]
            counts[key + "_bytes"] += _access_bytes(parts[1:])
        elif parts[0] in ("LDL", "STL"):
            counts["spill_instructions"] += 1
    return counts


def cuobjdump(flag: str, cubin: bytes) -> str:
    """Run the cuobjdump shipped with triton (``TRITON_CUOBJDUMP_PATH`` overrides) on a cubin."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump
    path = tool.path if tool is not None else None
    if not path:
        raise RuntimeError("cuobjdump: not found in the triton package (set TRITON_CUOBJDUMP_PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([path, flag, f.name], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


# --------------------------------------------------------------------------- output


_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("kernel", "kernel"),
    ("config", "configuration"),
    ("sizes", "sizes"),
    ("specialisation", "int args specialised"),
    ("dtype", "dtype"),
    ("target", "target"),
    ("registers", "regs"),
    ("shared", "shared B"),
    ("stack", "stack B"),
    ("local", "local B"),
    ("spill_instructions", "LDL/STL"),
    ("ldg", "LDG"),
    ("ldg128", "LDG.128"),
    ("stg", "STG"),
    ("stg128", "STG.128"),
    ("wide_share", "128-bit share of ld / st bytes"),
)


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (failed compiles show their error in the last column)."""
    head = [title for _, title in _COLUMNS] + ["error"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [str(getattr(r, key)) for key, _ in _COLUMNS]
        cells[0] = f"`{cells[0]}`"
        cells.append((r.error or "").replace("|", "\\|"))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def failure_message(rows: Sequence[Row]) -> str:
    bad = [r for r in rows if r.error]
    lines = [f"{len(bad)} of {len(rows)} ahead-of-time compiles failed:"]
    for r in bad:
        lines.append(f"  {r.kernel} [{r.config}] {r.dtype} {r.target} at {r.sizes}: {r.error}")
    return "\n".join(lines)
