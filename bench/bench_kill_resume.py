"""A sweep killed outright, then resumed: what the study and MLflow hold afterwards.

Runs the embedded demo's `aurora-sweep run --trials N` in a fresh directory, kills its whole
process group with SIGKILL (a scheduler's hard limit) in the middle of the trial after the K-th,
runs the same command again, and reports the trials by state, the MLflow runs by status, and
both wall times.

    python bench/bench_kill_resume.py                 # --trials 12, killed in the 4th trial
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--kill-after", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import optuna
    from mlflow.tracking import MlflowClient

    from aurora_sweep.config.study_file import load_config

    work = Path(tempfile.mkdtemp(prefix="bench-kill-"))
    demo = load_config(None, workdir=work)
    storage = f"sqlite:///{work / (demo.name + '.optuna.db')}"
    command = [
        str(Path(sys.executable).parent / "aurora-sweep"),
        "run",
        "--trials",
        str(args.trials),
    ]

    def ready_to_kill() -> bool:
        """K trials finished and the next one training (its MLflow run open)."""
        try:
            study = optuna.load_study(study_name=demo.name, storage=storage)
        except KeyError:
            return False
        finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
        training = any(
            t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs for t in study.trials
        )
        return finished >= args.kill_after and training

    began = time.perf_counter()
    first = subprocess.Popen(
        command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    while not ready_to_kill():
        if first.poll() is not None:
            sys.exit("the first run ended before it could be killed")
        time.sleep(0.5)
    time.sleep(1.0)  # mid-trial
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = time.perf_counter() - began
    study = optuna.load_study(study_name=demo.name, storage=storage)
    left_running = [t.number for t in study.trials if t.state.name == "RUNNING"]

    began = time.perf_counter()
    second = subprocess.run(command, cwd=work, capture_output=True, text=True)
    resumed = time.perf_counter() - began
    if second.returncode != 0:
        sys.exit(second.stderr[-3000:])

    study = optuna.load_study(study_name=demo.name, storage=storage)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(demo.name)
    statuses: dict[str, int] = {}
    for run in client.search_runs([experiment.experiment_id]):
        statuses[run.info.status] = statuses.get(run.info.status, 0) + 1
    result = {
        "benchmark": "bench_kill_resume",
        "command": " ".join(["python", "bench/bench_kill_resume.py", *sys.argv[1:]]),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.node()}: {os.cpu_count()} cores, no GPU",
        "trials": args.trials,
        "killed_after_finished": args.kill_after,
        "killed_at_s": round(killed_at, 1),
        "running_after_kill": left_running,
        "resume_s": round(resumed, 1),
        "finished_after_resume": states.get("COMPLETE", 0) + states.get("PRUNED", 0),
        "trial_states": states,
        "retries": {
            t.number: t.user_attrs["retry_of"] for t in study.trials if "retry_of" in t.user_attrs
        },  # fmt: skip
        "mlflow_run_statuses": statuses,
        "resume_output": second.stderr.strip().splitlines()[:3],
    }
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kill-resume-cpu-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
