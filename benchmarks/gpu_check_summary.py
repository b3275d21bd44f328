"""Summary of a GPU check run (benchmarks/gpu_check.sh): OUTDIR/summary.json and OUTDIR/summary.md.

Reads what the script left in OUTDIR: ``steps.txt`` (step, exit status, seconds), ``gpu.txt``
(``nvidia-smi -L``), ``tests.xml`` (junit XML of the CUDA tests) and ``bench.json``
(pytest-benchmark). Missing pieces are reported as missing, not guessed.

Usage: ``python benchmarks/gpu_check_summary.py OUTDIR``
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List


def _steps(out: Path) -> List[Dict[str, Any]]:
    path = out / "steps.txt"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, rc, seconds = line.split()
        rows.append({"step": name, "rc": int(rc), "seconds": int(seconds)})
    return rows


def _tests(out: Path) -> Dict[str, Any]:
    path = out / "tests.xml"
    if not path.exists():
        return {"missing": True}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed": failed}


def _bench(out: Path) -> List[Dict[str, Any]]:
    path = out / "bench.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [{"name": b["name"], "group": b.get("group"), "mean_us": b["stats"]["mean"] * 1e6,
             "min_us": b["stats"]["min"] * 1e6, "rounds": b["stats"]["rounds"],
             "metric": b.get("extra_info", {}).get("metric", "")} for b in data.get("benchmarks", [])]


def summarise(out: Path) -> Dict[str, Any]:
    """The summary as a dict (also written to ``out/summary.json`` and ``out/summary.md``)."""
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else ""
    summary = {"gpu": gpu, "steps": _steps(out), "tests": _tests(out), "benchmarks": _bench(out)}
    summary["ok"] = bool(summary["steps"]) and all(s["rc"] == 0 for s in summary["steps"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    return summary


def markdown(summary: Dict[str, Any]) -> str:
    lines = ["# GPU check", "", f"GPU: {summary['gpu'] or 'unknown'}", "", "| step | exit | seconds |", "|---|---:|---:|"]
    lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in summary["steps"]]
    t = summary["tests"]
    lines += ["", "## CUDA tests", ""]
    if t.get("missing"):
        lines.append("no junit XML (the tests did not run)")
    else:
        lines.append(f"{t['tests']} tests: {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        lines += [f"- FAILED {name}" for name in t["failed"]]
    lines += ["", "## Benchmarks (CUDA)", "", "| benchmark | mean (µs) | min (µs) | rounds | metric |",
              "|---|---:|---:|---:|---|"]
    lines += [f"| {b['name']} | {b['mean_us']:.1f} | {b['min_us']:.1f} | {b['rounds']} | {b['metric']} |"
              for b in summary["benchmarks"]]
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_check_summary.py OUTDIR", file=sys.stderr)
        return 2
    summary = summarise(Path(argv[0]))
    print(f"gpu_check: summary in {argv[0]}/summary.md ({'ok' if summary['ok'] else 'FAILED'})")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
