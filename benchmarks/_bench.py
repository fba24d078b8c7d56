"""Shared by the benchmark scripts: one row per fresh Python process, and the JSON report.

A benchmark script calls itself as ``python SCRIPT --worker '<json spec>'`` (its own peak RSS, no warm
caches from other rows); the worker prints its result as JSON on the last stdout line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_row(script: str, spec: dict, label: dict, cwd: Path) -> dict:
    """The worker's JSON result, or ``{**label, "error": "exit N: last line"}`` when it failed."""
    completed = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=cwd
    )
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**label, "error": f"exit {completed.returncode}: {tail[0][:200]}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def write_report(report: dict, out: str | Path) -> Path:
    """Write the benchmark's JSON report (creating its folder) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out
