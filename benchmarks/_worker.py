"""Run one benchmark row in a fresh Python process (its own peak RSS, no warm caches from other rows).

A benchmark script calls itself as ``python SCRIPT --worker '<json spec>'``; the worker prints its result
as JSON on the last stdout line.
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
