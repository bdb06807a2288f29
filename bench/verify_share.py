"""Where a trial of the shipped Europe study spends its time, on a CPU proxy: training against
the pruner's checks against verification.

The proxy keeps the Europe study's model and its counts and reduces the rest: AuroraSmallPretrained
(random weights: the time does not depend on the values) at a 32 x 64 crop instead of 148 x 208,
4 levels, fp32 instead of bf16 (a CPU emulates bf16), on this machine's cores. It measures the
seconds of one training step (batch 1 and 2), of one gradient-free step at the training batch
(a rollout's first steps) and of one scoring pass at the scoring batch, per sample, then adds
them up over what one completed trial of sweep/europe-tp.toml runs: 500 optimiser steps,
rollouts of 1, 2 or 4 steps, 4 pruner checks on 64 samples, and the validation year 2024
scored at 6, 12 and 24 h (1,464 six-hour starts, 732 of them rolled out to 24 h: 3,660 model
steps of one sample, `verify.scoring.model_steps_scored`). The scoring's arithmetic (scores,
intervals) is not in the proxy.

    .venv/bin/python bench/verify_share.py            # a few minutes on 2 cores

Writes bench/results/verify-share-<date>.json.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import EUROPE_LEVELS, build_random_trial_model, trial_config  # noqa: E402
from _results import save  # noqa: E402
from bench_memory import BenchConfig, measure  # noqa: E402

GRID = (32, 64)
STEPS, CHECKS, CHECK_SAMPLES = 500, 4, 64
SCORED_STEPS = 732 * 4 + 732 * 1  # 24 h starts rolled out 4 steps; the other 6 h starts, 1
BATCHES, ROLLOUTS = (1, 2), (1, 2, 4)


def forward_seconds(batch: int, repeats: int = 3) -> float:
    """Median seconds of one gradient-free forward pass of `batch` samples."""
    from aurora_sweep.memory.traced import synthetic_sample

    tc = trial_config(base="small-pretrained", batch_size=batch, levels=EUROPE_LEVELS)
    model, _ = build_random_trial_model(tc)
    model.eval()
    sample, _, _ = synthetic_sample(tc, GRID, len(EUROPE_LEVELS))
    times = []
    with torch.no_grad():
        model(sample)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(sample)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    cpu = torch.device("cpu")
    step = {
        b: measure(
            BenchConfig(f"lora b{b}", batch=b, precision="fp32"),
            grid=GRID,
            levels=EUROPE_LEVELS,
            device=cpu,
            steps=3,
            base="small-pretrained",
        )["step_seconds"]
        for b in BATCHES
    }
    pushforward = {b: forward_seconds(b) for b in BATCHES}
    score_batch = 32  # the CPU's scoring batch (`verify.scoring.eval_batch_size`)
    per_scored = forward_seconds(score_batch) / score_batch
    rows = []
    for b in BATCHES:
        for r in ROLLOUTS:
            train = STEPS * (step[b] + (r - 1) * pushforward[b])
            checks = CHECKS * CHECK_SAMPLES * per_scored
            verify = SCORED_STEPS * per_scored
            total = train + checks + verify
            rows.append(
                {
                    "batch": b,
                    "rollout": r,
                    "train_s": train,
                    "checks_s": checks,
                    "verify_s": verify,
                    "verify_share": verify / total,
                }  # fmt: skip
            )
            print(json.dumps(rows[-1]))
    mean = sum(r["verify_share"] for r in rows) / len(rows)
    result = {
        "command": "python bench/verify_share.py",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "proxy": {
            "base": "small-pretrained",
            "grid": GRID,
            "levels": EUROPE_LEVELS,
            "precision": "fp32",
        },  # fmt: skip
        "seconds": {
            "train_step": step,
            "pushforward_step": pushforward,
            "scored_sample_step": per_scored,
            "scoring_batch": score_batch,
        },  # fmt: skip
        "trials": rows,
        "mean_verify_share": mean,
    }
    print(f"verification: {mean:.1%} of a completed trial's seconds on average")
    save(result, "verify-share")


if __name__ == "__main__":
    main()
