"""The GPU check: what a lent GPU must show about the memory cap, the predictions and the speed.

One script, at most 8 minutes on one H100, writing bench/results/gpu-<device>-<date>.json:

1. predicted (traced and fitted) against measured peak of one training step for each method
   (lora, dora, head, blocks 2, full: Aurora's own recipe) on AuroraSmallPretrained and
   AuroraPretrained at the Europe grid (148 x 208, 4 levels, bf16, random weights: memory and
   time do not depend on the values), with the step's time; a row over the GPU's memory is
   recorded as out of memory, with its prediction;
2. scoring: the batch the cap allows (`memory.scoring_peak.plan_scoring`), its predicted and
   measured peak and the time of one gradient-free pass, per base (LoRA);
3. a 6-trial sweep of the demo study under a memory cap just below one enqueued recipe's
   predicted peak: that trial ends infeasible without training, the others complete, the
   study's wall time.

    python bench/gpu_check.py                                   # on the GPU, <= 8 minutes
    python bench/gpu_check.py --device cpu --quick --out x.json # the same path on a CPU, a minute

`--quick` runs the demo base at its own grid, two methods, a 2-trial sweep: the suite runs it
(tests/test_gpu_check.py) so that the script cannot rot before a GPU is lent.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import EUROPE_GRID, EUROPE_LEVELS  # noqa: E402
from _results import save  # noqa: E402
from bench_memory import BenchConfig, measure, method_configs, predict, trial_for  # noqa: E402

from aurora_sweep.memory import estimate as memory  # noqa: E402

MIB = 2**20
FULL_METHODS = ("lora", "dora", "head", "blocks", "full")
QUICK_METHODS = ("lora", "head")
#: the cap the scoring batch is planned under, as the shipped Europe study sets it
EUROPE_CAP = 40 * 2**30


def peak_rows(bases, methods, *, grid, levels, device, steps, budget) -> list[dict]:
    """Predicted (traced, fitted) against measured peak and step time, per base and method."""
    precision = "bf16" if device.type == "cuda" else "fp32"
    todo = [c for c in method_configs(precision) if c.method in methods]
    rows, started = [], time.monotonic()
    for base in bases:
        for cfg in todo:
            row = {"base": base, "config": cfg.name, "method": cfg.method}
            if time.monotonic() - started > budget:
                rows.append(row | {"skipped": "out of the time budget"})
                continue
            fitted = predict(cfg, grid=grid, levels=levels, device=device.type, base=base)
            traced = predict(
                cfg, grid=grid, levels=levels, device=device.type, base=base, how="traced"
            )
            row |= {
                "predicted_fitted_mb": fitted.megabytes,
                "predicted_traced_mb": traced.megabytes,
            }
            row |= {"traced_method": traced.method}
            row |= _measured(cfg, grid, levels, device, steps, base)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _measured(cfg: BenchConfig, grid, levels, device, steps: int, base: str) -> dict:
    try:
        m = measure(cfg, grid=grid, levels=levels, device=device, steps=steps, base=base)
    except torch.OutOfMemoryError as e:
        return {"measured": "out of memory", "error": str(e).splitlines()[0][:200]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "measured_mb": m["measured_bytes"] / MIB,
        "reserved_mb": m.get("reserved_bytes", 0) / MIB or None,
        "step_seconds": m["step_seconds"],
        "trainable": m["trainable"],
    }


def scoring_rows(bases, *, grid, levels, device, cap: int) -> list[dict]:
    """Per base, LoRA: the scoring batch `cap` allows, the predicted working set of one
    gradient-free pass at it (`activations`: what the pass allocates over the weights and the
    batch) against the measured one, and the pass's seconds."""
    from _common import build_random_trial_model

    from aurora_sweep.memory.scoring_peak import plan_scoring

    precision = "bf16" if device.type == "cuda" else "fp32"
    rows = []
    for base in bases:
        tc = trial_for(BenchConfig("lora", precision=precision), levels, base)
        batch, estimate = plan_scoring(
            tc, grid=grid, levels=len(levels), cap_bytes=cap, device=device.type, how="traced"
        )
        row = {"base": base, "cap_mb": cap / MIB, "eval_batch": batch}
        row |= {"predicted_peak_mb": estimate.megabytes, "method": estimate.method}
        row["predicted_pass_mb"] = estimate.parts.get("activations", 0) / MIB
        model, _ = build_random_trial_model(tc)
        model.to(device).eval()
        try:
            row |= _scoring_pass(
                model, dataclasses.replace(tc, batch_size=batch), grid, levels, device
            )
        except torch.OutOfMemoryError as e:
            row["measured"] = f"out of memory: {str(e).splitlines()[0][:160]}"
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _scoring_pass(model, tc, grid, levels, device: torch.device) -> dict:
    """One gradient-free pass of `tc.batch_size` samples: its working set and seconds."""
    from aurora_sweep.memory.traced import synthetic_sample

    sample, _, _ = synthetic_sample(tc, grid, len(levels))
    sample = sample.to(device)
    with torch.no_grad():
        model(sample)  # warm-up: kernels, Aurora's window mask
        _sync(device)
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            model(sample)
            _sync(device)
            seconds = time.perf_counter() - t0
            working = torch.cuda.max_memory_allocated(device) - before
        else:
            working = memory.cpu_live_peak_bytes(lambda: model(sample))
            seconds = time.perf_counter() - t0  # with the profiler's cost: an upper bound
    return {"measured_pass_mb": working / MIB, "pass_seconds": seconds}


def europe_trial(peaks: list[dict], scoring: list[dict]) -> list[dict]:
    """Per base, a completed LoRA trial of sweep/europe-tp.toml at batch 1 without rollouts, from
    the times measured above: 500 optimiser steps, 4 pruner checks on 64 samples and the
    validation year scored (3,660 model steps of one sample, as `bench/verify_share.py` counts),
    at the scoring batch the cap allows; and verification's share of it."""
    out = []
    for row in scoring:
        lora = next((p for p in peaks if p["base"] == row["base"] and p["method"] == "lora"), None)
        if lora is None or "step_seconds" not in lora or "pass_seconds" not in row:
            continue
        per_sample = row["pass_seconds"] / row["eval_batch"]
        train, checks, verify = 500 * lora["step_seconds"], 256 * per_sample, 3660 * per_sample
        out.append(
            {
                "base": row["base"],
                "train_s": train,
                "checks_s": checks,
                "verify_s": verify,
                "verify_share": verify / (train + checks + verify),
            }  # fmt: skip
        )
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def sweep_check(config_path: Path | None, *, trials: int, steps: int) -> dict:
    """A study of `trials` trials of the demo (or `config_path`'s) study under a cap just below
    one enqueued recipe's predicted peak: that one infeasible and never trained, the rest run."""
    import optuna

    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.data.cube import open_cube
    from aurora_sweep.data.samples import patch_crop
    from aurora_sweep.memory.estimate import estimate_peak
    from aurora_sweep.sweep.records import TrialRecord
    from aurora_sweep.sweep.run import run_study
    from aurora_sweep.sweep.space import sample_trial
    from aurora_sweep.sweep.storage import open_study

    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    config = load_config(config_path, workdir=workdir)
    train = dataclasses.replace(config.train, steps=steps, eval_every=max(1, steps // 2))
    config = dataclasses.replace(config, name="gpu-check", train=train, finalists=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = open_cube(config)
    grid = patch_crop(cube.sizes["latitude"], cube.sizes["longitude"])
    # the largest batch of a recipe the sampler proposes, whole region, no checkpointing: the
    # cap is set 1 byte below its predicted peak
    probe = optuna.create_study().ask()
    sample_trial(probe, config)
    params = probe.params | {"batch_size": max(config.search.batch_size)}
    params |= {"activation_checkpointing": False}
    if "tile" in params:
        params["tile"] = 0
    planned = sample_trial(optuna.trial.FixedTrial(params), config)
    over = estimate_peak(planned, grid=grid, levels=len(planned.levels), how="traced")
    cap = over.total_bytes - 1
    open_study(config, create=True).enqueue_trial(params)
    config = dataclasses.replace(config, gpu_memory_cap=cap)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_study(config, trials=trials)
    wall = time.perf_counter() - started
    ended = open_study(config, create=False).trials
    states = [t.state.name for t in ended]
    first = ended[0]
    return {
        "trials": trials,
        "steps": steps,
        "cap_mb": cap / MIB,
        "wall_seconds": wall,
        "states": states,
        "enqueued_over_cap": {
            "predicted_mb": TrialRecord.of(first).predicted_peak_mb,
            "infeasible": TrialRecord.of(first).infeasible,
            "trained": bool(TrialRecord.of(first).scores),
        },
        "completed_within_cap": [
            t.number
            for t in ended
            if t.state == optuna.trial.TrialState.COMPLETE
            and TrialRecord.of(t).memory_over_cap_mb <= 0
        ],
    }


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version()}
    info |= {"torch": torch.__version__, "cpus": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_mb": props.total_memory / MIB}
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--quick", action="store_true", help="the demo base, 2 methods, 2 trials")
    parser.add_argument("--config", type=Path, default=None, help="the sweep's study file")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file to write")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu --quick")
    started = time.perf_counter()
    if args.quick:
        bases, methods, grid, levels = ("demo",), QUICK_METHODS, (32, 48), (500, 850)
        steps, trials, sweep_steps, budget = 1, 2, 2, 60.0
    else:
        bases, methods = ("small-pretrained", "pretrained"), FULL_METHODS
        grid, levels = (EUROPE_GRID[0] - 1, EUROPE_GRID[1]), EUROPE_LEVELS
        steps, trials, sweep_steps, budget = 3, 6, 32, 300.0
    result = {
        "command": " ".join(["python", "bench/gpu_check.py", *(argv or sys.argv[1:])]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(device),
        "grid": list(grid),
        "levels": list(levels),
    }
    common = dict(grid=grid, levels=levels, device=device)
    result["peaks"] = peak_rows(bases, methods, steps=steps, budget=budget, **common)
    cap = EUROPE_CAP if device.type == "cuda" else 256 * MIB
    result["scoring"] = scoring_rows(bases, cap=cap, **common)
    result["europe_trial_seconds"] = europe_trial(result["peaks"], result["scoring"])
    result["sweep"] = sweep_check(args.config, trials=trials, steps=sweep_steps)
    result["seconds"] = time.perf_counter() - started
    slug = re.sub(r"[^a-z0-9]+", "-", result["machine"].get("gpu", "cpu").lower()).strip("-")
    print(f"the check took {result['seconds']:.0f} s")
    save(result, f"gpu-{slug}", args.out)
    return result


if __name__ == "__main__":
    main()
