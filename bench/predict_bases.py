"""The predicted peak GPU memory of every base x fine-tuning method over Europe, and the smallest
common GPU each fits.

What a study predicts before a trial runs (`memory.estimate_peak`, device "cuda": weights,
gradients, AdamW state, activations, the cuBLAS workspace and the caching allocator's slack), for
one training step over Europe at 0.25 deg (148 x 208 points after Aurora's crop, 4 levels), batch 1,
bf16 autocast and activation checkpointing, each method as a study samples it (LoRA variants at
rank 8 on qkv+proj; blocks: the last 2; full: Aurora's own recipe). No GPU is needed: the models
are built on the meta device. Two predictions per row: traced (the step run on fake tensors,
`aurora_sweep.memory.traced`, what a capped study uses) and fitted (the coefficients). The CUDA context
itself (a few hundred MB, outside PyTorch's allocator) is in neither: the GPU must hold it too.

    .venv/bin/python bench/predict_bases.py     # a few minutes (the traces)

Writes bench/results/predicted-bases-<date>.json and .md.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EUROPE_LEVELS, trial_config  # noqa: E402

from aurora_sweep.config.bases import BASES  # noqa: E402
from aurora_sweep.memory import estimate as memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRID = (148, 208)
#: Common GPU memory sizes, GiB: what the "smallest GPU" column picks from.
GPUS_GIB = (8, 12, 16, 24, 40, 48, 80, 141)
METHODS = {
    "lora r8": dict(method="lora"),
    "rslora r8": dict(method="rslora"),
    "dora r8": dict(method="dora"),
    "head": dict(method="head", lora_rank=0, lora_targets=""),
    "blocks 2": dict(method="blocks", lora_rank=0, lora_targets="", unfrozen_blocks=2),
    "full": dict(method="full", lora_rank=0, lora_targets=""),
}


def main() -> None:
    warnings.simplefilter("ignore")
    rows = []
    for base in (b for b in BASES if b != "demo"):
        for name, kw in METHODS.items():
            trial = trial_config(
                base=base, precision="bf16", activation_checkpointing=True, batch_size=1,
                levels=EUROPE_LEVELS, target_input_lr=0.0 if kw["method"] == "head" else 0.1,
                **kw,
            )  # fmt: skip
            kw = dict(grid=GRID, levels=len(EUROPE_LEVELS), device="cuda")
            est = memory.estimate_peak(trial, **kw)
            started = time.perf_counter()
            traced = memory.estimate_peak(trial, how="traced", **kw)
            seconds = time.perf_counter() - started
            gib, fitted_gib = traced.total_bytes / 2**30, est.total_bytes / 2**30
            fits = next((g for g in GPUS_GIB if gib <= g), None)
            rows.append({"base": base, "method": name, "predicted_gib": round(gib, 2),
                         "estimate": traced.method, "note": traced.note,
                         "trace_seconds": round(seconds, 1),
                         "fitted_gib": round(fitted_gib, 2),
                         "parts_mib": {k: round(v / 2**20) for k, v in traced.parts.items()},
                         "fitted_parts_mib": {k: round(v / 2**20) for k, v in est.parts.items()},
                         "smallest_gpu_gib": fits})  # fmt: skip
            print(f"{base:17s} {name:10s} traced {gib:7.2f} GiB ({seconds:.0f} s)  fitted "
                  f"{fitted_gib:7.2f} GiB  fits {fits} GiB {traced.note}", flush=True)  # fmt: skip
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "grid": list(GRID),
        "levels": list(EUROPE_LEVELS),
        "batch_size": 1,
        "precision": "bf16",
        "activation_checkpointing": True,
        "microsoft-aurora": version("microsoft-aurora"),
        "torch": version("torch"),
    }
    out = ROOT / "bench" / "results"
    stem = f"predicted-bases-{dt.date.today()}"
    (out / f"{stem}.json").write_text(json.dumps(meta | {"rows": rows}, indent=1))
    lines = [
        "| base | method | traced peak (GiB) | fitted (GiB) | fitted vs traced "
        "| smallest GPU it fits |",
        "| --- | --- | ---: | ---: | ---: | --- |",
        *(
            f"| {r['base']} | {r['method']} | {r['predicted_gib']:.2f}"
            f"{'' if r['estimate'] == 'traced' else ' (fitted: the trace failed)'} | "
            f"{r['fitted_gib']:.2f} | {r['fitted_gib'] / r['predicted_gib'] - 1:+.1%} | "
            f"{str(r['smallest_gpu_gib']) + ' GB' if r['smallest_gpu_gib'] else 'none listed'} |"
            for r in rows
        ),
    ]
    header = (
        f"# Predicted peak GPU memory by base and method ({dt.date.today()})\n\n`{meta['command']}`"
        f" - Europe {GRID[0]}x{GRID[1]}, levels {list(EUROPE_LEVELS)}, batch 1, bf16, activation "
        "checkpointing; memory.estimate_peak traced on fake tensors and fitted (no GPU "
        "measured). Both add a 64 MiB cuBLAS workspace and 10 % allocator slack.\n\n"
    )
    (out / f"{stem}.md").write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
