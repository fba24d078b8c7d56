"""Wall time and peak RSS per step of one `run.py` pipeline run, from a fresh ZenML/MLflow store.

    python benchmarks/pipeline_steps.py -- --data ../shared/data/allen_m1_10x_donor1_141markers.h5ad \
        --label-col subclass_approx

    python benchmarks/pipeline_steps.py --busy 1 --out benchmarks/results/pipeline_steps_busy.json

Everything after ``--`` is passed to ``run.py`` unchanged (default config unless you add ``--set``).
``--busy N`` keeps N CPU-bound processes (a Python busy loop each) running beside the run, as a laptop
doing other work; ``--root DIR`` runs another checkout's ``run.py`` (e.g. a fresh clone). The report
records the SHA-256 of the run's ``evaluation/summary.json``: two runs that wrote the same figures have
the same hash.
The run gets its own ZenML config, MLflow store and NEUROFM_HOME in a temporary folder, so no step is
cached. The resident memory of the run's whole process tree is sampled every 0.5 s; each sample is
attributed to the step(s) running at that moment by the step start/end times ZenML recorded. Prints a
table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its children (0 for those that vanished meanwhile)."""
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def step_windows(env: dict[str, str], root: Path) -> list[dict]:
    """Name, start and end (epoch seconds) of every step of the newest pipeline run in this store."""
    code = (
        "import json\n"
        "from zenml.client import Client\n"
        "run = Client().list_pipeline_runs(sort_by='desc:created', size=1).items[0]\n"
        "rows = [{'step': n, 'start': s.start_time.timestamp() if s.start_time else None,\n"
        "         'end': s.end_time.timestamp() if s.end_time else None, 'status': str(s.status)}\n"
        "        for n, s in run.steps.items()]\n"
        "print(json.dumps({'run': run.name, 'status': str(run.status), 'steps': rows}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    return __import__("json").loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/pipeline_steps.json")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--busy", type=int, default=0, help="CPU-bound processes running beside the run")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose run.py runs")
    parser.add_argument("run_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    run_args = [a for a in args.run_args if a != "--"]

    root = args.root.resolve()
    home = Path(tempfile.mkdtemp(prefix="neurofm-steps-"))
    if not any(arg == "--out" or arg.startswith("--out=") for arg in run_args):
        run_args += ["--out", str(home / "outputs")]
    env = {
        **os.environ,
        "ZENML_CONFIG_PATH": str(home / "zenml"),
        "NEUROFM_HOME": str(home / "neurofm"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    log_path = home / "run.log"
    started = time.time()
    samples: list[tuple[float, int]] = []
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "run.py", *run_args], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            samples.append((time.time(), tree_rss(watched)))
            time.sleep(args.interval)
    wall = time.time() - started
    for competitor in busy:
        competitor.kill()
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-3:]
        sys.exit(f"run.py exited {proc.returncode} (log {log_path}): {' | '.join(tail)}")

    run = step_windows(env, root)
    out_dir = Path(run_args[run_args.index("--out") + 1]) if "--out" in run_args else None
    summary = out_dir / "evaluation" / "summary.json" if out_dir else None
    summary_sha256 = (
        hashlib.sha256(summary.read_bytes()).hexdigest() if summary and summary.is_file() else None
    )
    rows = []
    for step in sorted(run["steps"], key=lambda s: s["start"] or 0):
        if step["start"] is None or step["end"] is None:
            continue
        inside = [rss for t, rss in samples if step["start"] <= t <= step["end"]]
        rows.append(
            {
                "step": step["step"],
                "wall_s": round(step["end"] - step["start"], 1),
                "peak_rss_gib": round(max(inside) / 2**30, 2) if inside else None,
                "status": step["status"],
            }
        )
    peak = max(rss for _, rss in samples) / 2**30 if samples else None
    print(f"\n{'step':32s} {'wall s':>9s} {'peak RSS GiB':>13s}")
    for row in rows:
        rss = "-" if row["peak_rss_gib"] is None else f"{row['peak_rss_gib']:.2f}"
        print(f"{row['step']:32s} {row['wall_s']:9.1f} {rss:>13s}")
    print(f"{'whole run (run.py process tree)':32s} {wall:9.1f} {peak:13.2f}")
    print(f"busy processes beside it: {args.busy}; summary.json sha256: {summary_sha256}")
    write_report(
        {
            "command": "python run.py " + " ".join(run_args),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "cpu_count": os.cpu_count(),
            "load_avg_end": os.getloadavg(),
            "busy_processes": args.busy,
            "root": str(root),
            "summary_sha256": summary_sha256,
            "run": run["run"],
            "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak, 2) if peak else None,
            "steps": rows,
            "log": str(log_path),
        },
        ROOT / args.out,
    )


if __name__ == "__main__":
    main()
