"""Measure saved-for-backward bytes on the CPU and fit memory.py's activation coefficients.

Activation memory is what autograd saves in the forward pass; it is the same on a CPU and a GPU,
so it can be measured exactly here with `saved_tensor_bytes` (distinct storages, weights
excluded) for a grid of small configs of the demo model and of AuroraSmallPretrained (random
weights), without checkpointing. The coefficients of `memory.ACTIVATION_COEFFS` are the
non-negative least-squares fit (relative error) of the estimator's features to these bytes.
Prints the measurements, the fitted constants (paste them into memory.py) and each config's
error, and writes bench/results/calibration-<date>.json.

    .venv/bin/python bench/calibrate_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

sys.path.insert(0, str(Path(__file__).parent))
from _common import build_random_trial_model, trial_config  # noqa: E402

from aurora_sweep.memory import estimate as memory  # noqa: E402
from aurora_sweep.memory import meta_model as meta
from aurora_sweep.memory import traced as trace

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (250, 500, 700, 850)
INNER = ("block", "window", "trainable")
OUTER = memory.OUTER_FEATURES
COLUMNS = [f"{k}_{p}" for p in ("fp32", "bf16") for k in INNER] + list(OUTER)


#: (method, LoRA targets, unfrozen blocks, tp's input trained) measured in every cell
RECIPES = (
    ("lora", "qkv", 0, True),
    ("lora", "qkv+proj+fc1+fc2", 0, True),
    ("lora", "qkv+proj", 2, True),
    ("lora", "qkv+proj", 0, False),
    ("head", "qkv+proj", 0, True),
    ("head", "qkv+proj", 0, False),
    ("blocks", "qkv+proj", 2, False),
    ("full", "qkv+proj", 0, True),
)


def calibration_configs(quick: bool) -> list[dict]:
    """Configs measured for the fit: both bases, small crops, both precisions, every method,
    tp's input trained and output-only."""
    out = []
    for base, grids in (
        ("demo", [(32, 64), (64, 128)]),
        ("small-pretrained", [(32, 64), (64, 64)]),
    ):
        for grid in grids[:1] if quick else grids:
            for levels in (2, 4):
                for precision in ("fp32", "bf16"):
                    for method, targets, unfrozen, train_input in RECIPES:
                        batch = 2 if (base == "demo" and levels == 4 and targets == "qkv") else 1
                        out.append(
                            dict(
                                base=base, grid=grid, levels=levels, precision=precision,
                                method=method, lora_targets=targets, unfrozen_blocks=unfrozen,
                                target_input_lr=1.0 if train_input else 0.0, batch_size=batch,
                            )
                        )  # fmt: skip
    return out


def _trial(cfg: dict, **changes):
    keys = ("base", "method", "lora_targets", "unfrozen_blocks", "target_input_lr")
    return trial_config(**{k: cfg[k] for k in keys}, **changes)


def measure(cfg: dict) -> int:
    """Saved-for-backward bytes of one forward pass of `cfg` (no checkpointing)."""
    trial = _trial(
        cfg,
        precision=cfg["precision"],
        batch_size=cfg["batch_size"],
        levels=LEVELS[: cfg["levels"]],
    )
    peft_model, _ = build_random_trial_model(trial)
    batch = trace.synthetic_batch(
        batch_size=trial.batch_size, grid=tuple(cfg["grid"]), levels=trial.levels
    )
    with memory.saved_tensor_bytes(peft_model) as saved:
        peft_model(batch)
    # Aurora's modules hold reference cycles (hooks): free each model now, not at the next
    # full collection, or a grid of AuroraSmallPretrained builds fills the machine's memory
    del peft_model
    gc.collect()
    return saved["bytes"]


def feature_row(cfg: dict) -> tuple[np.ndarray, float]:
    """The fit's design row for `cfg` and the known bytes (autocast copies of the weights)."""
    trial = _trial(cfg)
    arch = meta.architecture(meta.build_meta_model(trial), grid=tuple(cfg["grid"]))
    f = memory.activation_features(arch, grid=tuple(cfg["grid"]), levels=cfg["levels"])
    row = np.zeros(len(COLUMNS))
    for k in INNER:
        row[COLUMNS.index(f"{k}_{cfg['precision']}")] = f[k]
    for k in OUTER:
        row[COLUMNS.index(k)] = f[k]
    known = 0.0 if cfg["precision"] == "fp32" else float(memory.autocast_weight_bytes(arch))
    return row * cfg["batch_size"], known


def fit(rows: np.ndarray, known: np.ndarray, measured: np.ndarray) -> dict[str, dict[str, float]]:
    """Non-negative coefficients minimising the relative error of the predicted bytes."""
    w = 1.0 / measured
    coef, _ = nnls(rows * w[:, None], (measured - known) * w)
    out: dict[str, dict[str, float]] = {"fp32": {}, "bf16": {}}
    for name, c in zip(COLUMNS, coef):
        key, _, prec = name.rpartition("_") if name not in OUTER else (name, "", "")
        for p in [prec] if prec else ["fp32"]:
            out[p][key] = round(float(c), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer grids (about a minute)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    configs = calibration_configs(args.quick)
    rows, known, measured = [], [], []
    for cfg in configs:
        t0 = time.perf_counter()
        cfg["measured_bytes"] = measure(cfg)
        row, k = feature_row(cfg)
        rows.append(row)
        known.append(k)
        measured.append(cfg["measured_bytes"])
        print(
            f"{cfg}  {cfg['measured_bytes'] / 2**20:8.2f} MiB  ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    rows_a, known_a, measured_a = np.array(rows), np.array(known), np.array(measured, dtype=float)
    coeffs = fit(rows_a, known_a, measured_a)
    flat = [
        coeffs["fp32"][n] if n in OUTER else coeffs[n.rpartition("_")[2]][n.rpartition("_")[0]]
        for n in COLUMNS
    ]
    predicted = known_a + rows_a @ np.array(flat)
    for cfg, p in zip(configs, predicted):
        cfg["predicted_bytes"] = int(p)
        cfg["relative_error"] = round(float(p / cfg["measured_bytes"] - 1), 4)
    print("\nACTIVATION_COEFFS =", json.dumps(coeffs, indent=4))
    errors = np.abs([c["relative_error"] for c in configs])
    print(f"relative error: median {np.median(errors):.1%}, max {errors.max():.1%}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"calibration-{dt.date.today()}.json"
    path.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "torch": torch.__version__,
                "coefficients": coeffs,
                "configs": configs,
            },
            indent=1,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
