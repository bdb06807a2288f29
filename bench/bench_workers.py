"""Trials per hour with K workers on one machine: the demo study, `--workers K` against 1.

Builds the demo's data store once, then runs `aurora-sweep run --trials N --workers K` for each K
in a fresh directory (sharing that store), one after the other, and times each whole command.
On a CPU the workers split the cores; on a GPU machine each worker takes a GPU.

    python bench/bench_workers.py                     # 30 trials, workers 1 and 2
    python bench/bench_workers.py --trials 12 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.data.cube import open_cube

    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    prep = work / "prep"
    prep.mkdir()
    demo = load_config(None, workdir=prep)
    open_cube(demo)  # the demo's store, built once for every run
    aurora_sweep = Path(sys.executable).parent / "aurora-sweep"
    rows = []
    for k in args.workers:
        directory = work / f"workers-{k}"
        directory.mkdir()
        (directory / "data").symlink_to(prep / "data")
        command = [str(aurora_sweep), "run", "--trials", str(args.trials), "--workers", str(k)]
        began = time.perf_counter()
        done = subprocess.run(command, cwd=directory, capture_output=True, text=True)
        wall = time.perf_counter() - began
        print(f"--workers {k}: {wall:.1f} s", flush=True)
        if done.returncode != 0:
            sys.exit(f"--workers {k} failed:\n{done.stderr[-3000:]}")
        import optuna

        study = optuna.load_study(
            study_name=demo.name, storage=f"sqlite:///{directory / (demo.name + '.optuna.db')}"
        )
        states = {}
        for t in study.trials:
            states[t.state.name] = states.get(t.state.name, 0) + 1
        best = re.search(r"best: trial (\d+), (\S+) ([0-9.]+)", done.stderr)
        rows.append({
            "workers": k, "wall_s": round(wall, 1),
            "trials_per_hour": round(3600 * args.trials / wall, 1), "states": states,
            "best": best.group(0) if best else None,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["trials_per_hour"]
    for row in rows:
        row["speedup_vs_first"] = round(row["trials_per_hour"] / base, 2)
    result = {
        "benchmark": "bench_workers",
        "command": " ".join(["python", "bench/bench_workers.py", *sys.argv[1:]]),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, no GPU",
        "study": "the embedded demo (sweep/demo.toml)",
        "trials": args.trials,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"workers-cpu-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
