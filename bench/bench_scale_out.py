"""Many workers on one study: PostgreSQL storage and an MLflow tracking server under load.

Starts a throwaway PostgreSQL cluster and an `mlflow server` backed by it (as the tests do), then
K `run`-like processes at once on one fresh study. Each drives the real trial loop of
`scheduler.Sweep` (claiming, sampling with TPE, Optuna storage, MLflow runs, params, metric
histories, pruning reports, a 2 MB adapter and two figures uploaded through the server) with a
stub in place of the trial worker that sleeps a fixed time instead of training. So each trial's
wall time minus the stub's is what storage and tracking cost it.

Checks: the study ends with exactly the total, no configuration proposed twice, no process hung.

    python bench/bench_scale_out.py                  # 8 workers, 48 trials of 2 s
    python bench/bench_scale_out.py --workers 4 --trials 24 --stub-seconds 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CONFIG = """
[study]
name = "bench"
heartbeat_seconds = 10

[data]
source = "demo"
region = { north = 62.0, south = 47.0, west = 4.0, east = 19.0 }
levels = [500, 700, 850]
grid = 1.0
period = ["2022-01-01", "2024-12-31"]
train = ["2022-01-01", "2022-12-31"]
validation = ["2023-01-01", "2023-12-31"]
test = ["2024-01-01", "2024-12-31"]

[model]
base = "demo"

[train]
steps = 4
eval_every = 2

[search]
lora_rank = [2, 4, 8, 16]
lora_targets = ["qkv+proj", "qkv+proj+fc1+fc2"]
unfrozen_blocks = [0, 1]
batch_size = [1, 2, 4]
precision = ["fp32", "bf16"]
learning_rate = [1e-5, 1e-2]
activation_checkpointing = [false, true]
"""


class StubWorker:
    """Stands where `worker.TrialWorker` does: sleeps instead of training, writes a fake adapter
    and figures of realistic size, reports two intermediate values, returns plausible scores."""

    def __init__(self, seconds: float) -> None:
        from aurora_sweep.sweep.outcomes import Ready

        self.seconds = seconds
        self.info = Ready(0, 0, device="stub", checkpoint="", base_mse={}, aurora15={})

    def run(self, trial: dict, adapter_dir: Path, report):
        from aurora_sweep.sweep.outcomes import Complete

        adapter_dir.mkdir(parents=True)
        (adapter_dir / "adapter_model.safetensors").write_bytes(os.urandom(2 * 2**20))
        (adapter_dir / "adapter_config.json").write_text(json.dumps(trial))
        figures = adapter_dir.parent / "figures"
        figures.mkdir()
        for name in ("loss_curves.png", "cases.png"):
            (figures / name).write_bytes(os.urandom(100 * 2**10))
        value = 0.2 + 0.1 * (trial["learning_rate"] % 1e-3) / 1e-3
        for step in (2, 4):
            time.sleep(self.seconds / 2)
            report(step, value)  # never pruned: the MedianPruner waits for 6 trials, then may
        metrics = {"tp_seeps": value, "tp_seeps_q05": value - 0.01, "tp_seeps_q95": value + 0.01,
                   "tp_skill_persistence": 0.1, "tp_skill_climatology": 0.5, "tp_rmse": 1.0}  # fmt: skip
        return Complete(
            metrics=metrics, train_loss=[(s, 1.0 / s) for s in range(1, 5)],
            val_loss=[(2, 0.5), (4, 0.4)], intermediate=[(2, value), (4, value)],
            peak_memory_mb=100.0, seconds=self.seconds,
        )  # fmt: skip

    def interrupt(self) -> None:
        pass

    def close(self, *, at_once: bool = False) -> None:
        pass


def child(args: argparse.Namespace) -> None:
    """One worker process: open the study (racing the others), run trials until the total."""
    import warnings

    warnings.filterwarnings("ignore")
    from rich.console import Console

    import aurora_sweep.memory.estimate as memory
    from aurora_sweep.config.study import with_overrides
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.sweep.scheduler import Sweep
    from aurora_sweep.sweep.storage import open_study, reap_dead_trials, retry_interrupted
    from aurora_sweep.sweep.tracking import client_for, experiment_id, study_run

    # the memory estimate is not storage or tracking: a constant, so it costs nothing here
    memory.estimate_peak = lambda *a, **k: memory.MemoryEstimate(total_bytes=0, parts={})
    config = load_config(args.config, workdir=Path(args.config).parent)
    config = with_overrides(config, storage=args.storage, tracking_uri=args.tracking_uri)
    ready = time.perf_counter()
    client = client_for(config)
    study = open_study(config)
    reap_dead_trials(study, client)
    retry_interrupted(study)
    experiment = experiment_id(client, config.name, artifacts=None)
    with study_run(client, experiment, study=config.name, name="bench", tags={}) as parent:
        sweep = Sweep(
            config=config, study=study, client=client, experiment=experiment, parent=parent,
            console=Console(stderr=True, quiet=True), grid=(16, 16), total=args.trials,
        )  # fmt: skip
        started = time.perf_counter()
        if os.environ.get("BENCH_PROFILE"):  # in this thread, so that cProfile sees it
            sweep.running = 1
            sweep.work(StubWorker(args.stub_seconds), 0)
        else:
            sweep.run([StubWorker(args.stub_seconds)])
    print(json.dumps({"pid": os.getpid(), "setup_s": started - ready,
                      "loop_s": time.perf_counter() - started}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--stub-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if os.environ.get("BENCH_PROFILE"):  # where a worker's time goes: cProfile to this file
            import cProfile

            cProfile.runctx("child(args)", globals(), locals(), os.environ["BENCH_PROFILE"])
        else:
            child(args)
        return

    from servers import PostgresCluster, free_port, postgres_bindir

    bindir = postgres_bindir()
    if bindir is None:
        sys.exit("PostgreSQL is not installed: apt-get install postgresql")
    cluster = PostgresCluster(bindir)
    server = cluster.start()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    mlflow = None
    try:
        optuna_db, mlflow_db = server.create_database("optuna"), server.create_database("mlflow")
        port = free_port()
        tracking = f"http://127.0.0.1:{port}"
        mlflow = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             server.url(mlflow_db), "--artifacts-destination", str(work / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
            stdout=open(work / "mlflow.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{tracking}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or mlflow.poll() is not None:
                    sys.exit((work / "mlflow.log").read_text()[-2000:])
                time.sleep(0.5)
        config = work / "bench.toml"
        config.write_text(CONFIG)
        storage = server.url(optuna_db)
        command = [sys.executable, __file__, "--child", "--config", str(config), "--storage",
                   storage, "--tracking-uri", tracking, "--trials", str(args.trials),
                   "--stub-seconds", str(args.stub_seconds)]  # fmt: skip
        began = time.perf_counter()
        children = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(args.workers)
        ]
        reports, hung = [], 0
        for c in children:
            try:
                out, err = c.communicate(timeout=1800)
            except subprocess.TimeoutExpired:
                c.kill()
                hung += 1
                continue
            if c.returncode != 0:
                sys.exit(f"a worker failed ({c.returncode}):\n{err[-3000:]}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
        wall = time.perf_counter() - began

        import optuna

        study = optuna.load_study(study_name="bench", storage=storage)
        finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        configs = [tuple(sorted(t.params.items())) for t in study.trials]
        per_trial = [
            (t.datetime_complete - t.datetime_start).total_seconds() - args.stub_seconds
            for t in finished
        ]
        per_process = [sum(1 for t in finished if t.user_attrs.get("pid") == r["pid"])
                       for r in reports]  # fmt: skip
        result = {
            "benchmark": "bench_scale_out",
            "command": " ".join(["python", "bench/bench_scale_out.py", *sys.argv[1:]]),
            "date": dt.date.today().isoformat(),
            "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, no GPU",
            "storage": "PostgreSQL " + server.connect().execute("SHOW server_version").fetchone()[0],
            "tracking": "mlflow server " + __import__("mlflow").__version__ + " (2 workers) on PostgreSQL, proxied artifacts",
            "workers": args.workers,
            "trials_wanted": args.trials,
            "trials_finished": len(finished),
            "trials_in_study": len(study.trials),
            "states": {s: sum(t.state.name == s for t in study.trials) for s in {t.state.name for t in study.trials}},
            "duplicate_configs": len(configs) - len(set(configs)),
            "hung_processes": hung,
            "trials_per_process": per_process,
            "stub_seconds": args.stub_seconds,
            "overhead_per_trial_s": {
                "median": statistics.median(per_trial),
                "mean": statistics.fmean(per_trial),
                "p90": statistics.quantiles(per_trial, n=10)[-1],
                "max": max(per_trial),
            },
            "process_setup_s_median": statistics.median(r["setup_s"] for r in reports),
            "wall_s": wall,
        }  # fmt: skip
        print(json.dumps(result, indent=2))
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"scale-out-{args.workers}workers-{result['date']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {path}")
    finally:
        if mlflow is not None:
            os.killpg(mlflow.pid, 15)
            mlflow.wait(timeout=30)
        cluster.stop()


if __name__ == "__main__":
    main()
