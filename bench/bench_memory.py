"""Step time and peak memory of trial configs of a base model, predicted vs measured.

A study trusts `memory.estimate_peak` to keep trials inside the GPU cap; this checks it. For one
config per fine-tuning method (lora, rslora and dora at rank 8 on qkv+proj; head; blocks with the
last 2 blocks; full, Aurora's reference recipe: every parameter trained with AdamW, bf16 backbone
autocast, activation checkpointing) and a grid of LoRA configs (rank and targets, unfrozen
blocks, batch size, precision, checkpointing), it builds the real AuroraSmallPretrained
architecture with random weights (memory does not depend on the values) as a trial does
(`model.apply_method`), runs a few training steps on a Europe-sized 0.25° input (149 x 209 points
cropped to 148 x 208, levels 250/500/700/850) and records step time, samples/s, trainable
parameters, measured and predicted peak memory.

Measured peak: on CUDA `max_memory_allocated` / `max_memory_reserved` after
`reset_peak_memory_stats`. On a CPU there is no allocator peak: it is what is alive when a step
starts (weights, AdamW state, the batch) plus the peak growth of live
tensor memory during one step, from the torch profiler's allocation events (activations,
recomputation under checkpointing, gradients, temporaries). Also reported: the bytes saved for
backward in one forward (exact and the same on a GPU; with checkpointing only the checkpoint
inputs) and the process's resident-set growth (noisy: the CPU allocator keeps freed memory).

    .venv/bin/python bench/bench_memory.py --device cpu --reduced    # a few minutes on 2 cores
    .venv/bin/python bench/bench_memory.py --device cuda              # the full grid on a GPU
    .venv/bin/python bench/bench_memory.py --reduced --methods-only --methods lora,head  # quick
    .venv/bin/python bench/bench_memory.py --device cpu --levers --steps 1   # tiles, accumulation
    .venv/bin/python bench/bench_memory.py --device cpu --checkpoint-sets --steps 2  # "auto"
    .venv/bin/python bench/bench_memory.py --device cpu --reduced --methods-only \
        --base pretrained --methods lora,rslora,dora,head,blocks   # AuroraPretrained, 1.3 B
    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python bench/bench_memory.py --device cpu --reduced \
        --methods-only --base v1.5 --methods lora,rslora,dora,head,blocks   # Aurora 1.5, 1.3 B

(Aurora 1.5's six passes a step need the threshold on a 24 GB machine: without it glibc keeps the
freed memory of the earlier rows and the DoRA row's process runs out.)

Writes bench/results/<device>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    EUROPE_GRID,
    EUROPE_LEVELS,
    build_random_trial_model,
    cpu_live_peak_bytes,
    trial_config,
)  # noqa: E402

from aurora_sweep.config.bases import BASES  # noqa: E402
from aurora_sweep.config.recipe import (  # noqa: E402
    AUTO_CHECKPOINTING,
    LORA_METHODS,
    METHODS,
    TrialConfig,  # noqa: E402
)
from aurora_sweep.memory import estimate as memory  # noqa: E402
from aurora_sweep.memory.traced import synthetic_sample  # noqa: E402
from aurora_sweep.model.loss import combine, loss_terms  # noqa: E402
from aurora_sweep.train.runtime import PeakMemory  # noqa: E402
from aurora_sweep.train.tiles import tile_side  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmarked config: a fine-tuning method and its trial settings."""

    name: str
    method: str = "lora"
    rank: int = 8
    targets: str = "qkv+proj"
    unfrozen: int = 0
    batch: int = 1
    precision: str = "bf16"
    checkpointing: bool = False
    tile: int = 0  # points a side each step trains on (0: the whole grid)
    accumulate: int = 1  # micro-batches of `batch` per optimiser step
    modules: tuple[str, ...] = ()  # the module classes checkpointed (): Aurora's whole set
    levels: tuple[int, ...] = ()  # the pressure levels trained on (): the bench's


def method_configs(precision: str) -> list[BenchConfig]:
    """One config per method; `full` is Aurora's recipe whole (bf16, checkpointing), the others
    run at `precision` without checkpointing. No LoRA rank or targets where the method has none
    (as a study samples them)."""
    lora = [
        BenchConfig(f"{m} r8 qkv+proj {precision}", method=m, precision=precision)
        for m in LORA_METHODS
    ]
    return lora + [
        BenchConfig(f"head {precision}", method="head", rank=0, targets="", precision=precision),
        BenchConfig(
            f"blocks 2 {precision}",
            method="blocks",
            rank=0,
            targets="",
            unfrozen=2,
            precision=precision,
        ),
        BenchConfig(
            "full (reference): AdamW, bf16, ckpt",
            method="full",
            rank=0,
            targets="",
            precision="bf16",
            checkpointing=True,
        ),
    ]


def lora_grid(reduced: bool) -> list[BenchConfig]:
    """LoRA configs besides the method rows: rank, targets, unfrozen blocks, batch, precision,
    checkpointing (the `lora` method row is not repeated)."""
    if reduced:
        return [
            BenchConfig("r8 qkv+proj bf16"),
            BenchConfig(
                "r16 all linears fp32", rank=16, targets="qkv+proj+fc1+fc2", precision="fp32"
            ),
            BenchConfig("r8 qkv+proj +2 blocks fp32", unfrozen=2, precision="fp32"),
            BenchConfig("r8 qkv+proj fp32 ckpt", precision="fp32", checkpointing=True),
        ]
    grid = []
    for precision in ("fp32", "bf16"):
        for ckpt in (False, True):
            for batch in (1, 2):
                if (precision, ckpt, batch) == ("bf16", False, 1):
                    continue  # the lora method row
                grid.append(
                    BenchConfig(
                        f"r8 qkv+proj b{batch} {precision}{' ckpt' if ckpt else ''}",
                        batch=batch,
                        precision=precision,
                        checkpointing=ckpt,
                    )
                )
    grid += [
        BenchConfig("r4 qkv bf16", rank=4, targets="qkv"),
        BenchConfig("r32 all linears bf16", rank=32, targets="qkv+proj+fc1+fc2"),
        BenchConfig("r8 qkv+proj +4 blocks bf16", unfrozen=4),
        BenchConfig("r8 qkv+proj +4 blocks bf16 ckpt", unfrozen=4, checkpointing=True),
    ]
    return grid


def lever_configs() -> list[BenchConfig]:
    """The small-GPU levers against their alternatives, LoRA r8 on qkv+proj in fp32 (bf16 is
    emulated on a CPU): the whole region against tiles of 96 and 64 points; one batch of 4
    against 4 accumulated micro-batches of 1 (both checkpointed, so that a batch of 4 fits);
    all the bench's levels against one and two of them."""
    lora = dict(precision="fp32")
    return [
        BenchConfig("whole region", **lora),
        BenchConfig("tile 96", tile=96, **lora),
        BenchConfig("tile 64", tile=64, **lora),
        BenchConfig("levels 500, 850", levels=(500, 850), **lora),
        BenchConfig("level 500", levels=(500,), **lora),
        BenchConfig("batch 4 ckpt", batch=4, checkpointing=True, **lora),
        BenchConfig("batch 1 x accumulate 4 ckpt", accumulate=4, checkpointing=True, **lora),
    ]


def checkpointing_configs() -> list[BenchConfig]:
    """What "auto" checkpointing chooses from (`recipe.AUTO_CHECKPOINTING`, least recomputation
    first), LoRA r8 on qkv+proj, fp32, batch 1: peak against step time."""
    names = ["no checkpointing", "ckpt: blocks", "ckpt: blocks + encoder/decoder",
             "ckpt: Aurora's whole set"]  # fmt: skip
    return [
        BenchConfig(name, precision="fp32", checkpointing=bool(modules), modules=modules)
        for name, modules in zip(names, AUTO_CHECKPOINTING, strict=True)
    ]


def configs(
    reduced: bool, methods: tuple[str, ...] = METHODS, grid: bool = True
) -> list[BenchConfig]:
    """The method rows (fp32 on the reduced CPU grid, bf16 on the full one), then the LoRA grid
    (when `grid` and lora is among `methods`)."""
    out = [c for c in method_configs("fp32" if reduced else "bf16") if c.method in methods]
    if grid and "lora" in methods:
        out += lora_grid(reduced)
    return out


def trial_for(
    cfg: BenchConfig, levels: tuple[int, ...], base: str = "small-pretrained"
) -> TrialConfig:
    return trial_config(
        base=base, method=cfg.method, lora_rank=cfg.rank, lora_targets=cfg.targets,
        unfrozen_blocks=cfg.unfrozen, batch_size=cfg.batch, precision=cfg.precision,
        activation_checkpointing=cfg.checkpointing, levels=levels, tile=cfg.tile,
        accumulate=cfg.accumulate, checkpoint_modules=cfg.modules,
    )  # fmt: skip


def predict(
    cfg: BenchConfig,
    *,
    grid: tuple[int, int],
    levels: tuple[int, ...],
    device: str,
    base: str = "small-pretrained",
    how: str = "fitted",
) -> memory.MemoryEstimate:
    """What a study would predict for this config (`memory.estimate_peak`)."""
    return memory.estimate_peak(
        trial_for(cfg, levels, base), grid=grid, levels=len(levels), device=device, how=how
    )


def measure(
    cfg: BenchConfig,
    *,
    grid: tuple[int, int],
    levels: tuple[int, ...],
    device: torch.device,
    steps: int,
    base: str = "small-pretrained",
) -> dict:
    peft_model, _ = build_random_trial_model(trial_for(cfg, levels, base))
    peft_model.to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-5)
    grid = tile_side(cfg.tile, grid)  # a tiled step sees its tile only
    # a trial's step: Aurora's loss over every variable (`trace` traces the same step)
    batch, target, spec = synthetic_sample(trial_for(cfg, levels, base), grid, len(levels))
    batch = batch.to(device)
    target = {k: v.to(device) for k, v in target.items()}
    n_params = sum(p.numel() for p in peft_model.parameters())
    n_train = sum(p.numel() for p in params)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        for _ in range(cfg.accumulate):  # micro-batches' gradients add up, as in a trial
            loss = combine(spec, loss_terms(spec, peft_model(batch), target)) / cfg.accumulate
            loss.backward()
        optimiser.step()

    out: dict = {"params": n_params, "trainable": n_train}
    if device.type == "cpu":
        # what is alive at the peak: weights, grads, AdamW state, inputs, saved activations
        with memory.saved_tensor_bytes(peft_model) as saved:
            pred = peft_model(batch)
        del pred
        out["saved_activation_bytes"] = saved["bytes"]
        rss0 = psutil.Process().memory_info().rss
    step()  # warm-up; allocates AdamW state
    if device.type == "cpu":
        # the profiler sees no free of what was allocated before it started: the last step's
        # gradients go before it starts, so that the step's own are counted once
        optimiser.zero_grad(set_to_none=True)
        # weights, AdamW state and the batch are alive when a step starts
        at_start = (
            4 * n_params
            + 8 * n_train
            + memory.input_bytes(grid=grid, levels=len(levels), batch_size=cfg.batch)
        )
        out["step_live_peak_bytes"] = cpu_live_peak_bytes(step)
        out["measured_bytes"] = at_start + out["step_live_peak_bytes"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with PeakMemory(device) as peak:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        out["measured_bytes"] = torch.cuda.max_memory_allocated(device)
        out["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    else:
        out["rss_peak_delta_bytes"] = peak.peak - rss0
    out["step_seconds"] = sorted(times)[len(times) // 2]
    out["samples_per_second"] = cfg.batch * cfg.accumulate / out["step_seconds"]
    return out


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{psutil.cpu_count(logical=True)}core"


def markdown(rows: list[dict], header: str) -> str:
    cpu = "saved_activation_bytes" in rows[0]
    cols = ["config", "method", "trainable", "step s", "samples/s", "measured MiB"]
    cols += ["fitted MiB", "fitted error", "traced MiB", "traced error"]
    cols += ["saved act. MiB", "RSS delta MiB"] if cpu else ["reserved MiB"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            r["name"], r["method"], f"{r['trainable'] / 1e6:.2f} M",
            f"{r['step_seconds']:.2f}", f"{r['samples_per_second']:.2f}",
            f"{r['measured_bytes'] / MIB:.0f}",
            f"{r['predicted_bytes'] / MIB:.0f}", f"{r['relative_error']:+.1%}",
            f"{r['traced_bytes'] / MIB:.0f}"
            + ("" if r["traced_method"] == "traced" else " (trace failed: fitted)"),
            f"{r['traced_error']:+.1%}",
        ]  # fmt: skip
        if cpu:
            cells += [
                f"{r['saved_activation_bytes'] / MIB:.1f}",
                f"{r['rss_peak_delta_bytes'] / MIB:.0f}",
            ]
        else:
            cells += [f"{r['reserved_bytes'] / MIB:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}: use {','.join(METHODS)}"
        )
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--reduced",
        action="store_true",
        help="32x64 crop, 2 levels, 6 method rows + 4 LoRA configs, 2 timed steps",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per config")
    parser.add_argument(
        "--methods",
        type=parse_methods,
        default=METHODS,
        help=f"comma-separated methods to benchmark (default: {','.join(METHODS)})",
    )
    parser.add_argument(
        "--methods-only",
        action="store_true",
        help="one row per method only, not the grid of LoRA ranks, targets, batch sizes, ...",
    )
    parser.add_argument(
        "--base",
        choices=[b for b in BASES if b != "demo"],
        default="small-pretrained",
        help="the base model's architecture, full size, random weights (bases.py)",
    )
    parser.add_argument(
        "--levers",
        action="store_true",
        help="tiles of 96 and 64 against the whole region, batch 4 against 4 x accumulated 1",
    )
    parser.add_argument(
        "--checkpoint-sets",
        action="store_true",
        help='what "auto" checkpointing chooses from: peak and step time of each set',
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu --reduced")
    grid, levels = (
        ((32, 64), EUROPE_LEVELS[:2])
        if args.reduced
        else ((EUROPE_GRID[0] - 1, EUROPE_GRID[1]), EUROPE_LEVELS)
    )
    steps = args.steps or (2 if args.reduced else 5)

    rows = []
    if args.levers:
        todo = lever_configs()
    elif args.checkpoint_sets:
        todo = checkpointing_configs()
    else:
        todo = configs(args.reduced, args.methods, not args.methods_only)
    for cfg in todo:
        on = cfg.levels or levels
        est = predict(cfg, grid=grid, levels=on, device=device.type, base=args.base)
        traced = predict(
            cfg, grid=grid, levels=on, device=device.type, base=args.base, how="traced"
        )
        # each config in a process of its own: a 1.3 B model's 5 GB must not outlive its row
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            m = pool.submit(
                measure, cfg, grid=grid, levels=on, device=device, steps=steps, base=args.base
            ).result()
        row = (
            dataclasses.asdict(cfg)
            | m
            | {
                "predicted_bytes": est.total_bytes,
                "predicted_parts": est.parts,
                # the estimate counts trainable parameters on its own (meta) build
                "predicted_trainable": est.parts["gradients"] // memory.FP32,
                "traced_bytes": traced.total_bytes,
                "traced_method": traced.method,
                "traced_parts": traced.parts,
            }
        )
        row["relative_error"] = est.total_bytes / m["measured_bytes"] - 1
        row["traced_error"] = traced.total_bytes / m["measured_bytes"] - 1
        rows.append(row)
        print(
            f"{cfg.name:40s} {m['trainable'] / 1e6:7.2f} M trained  {m['step_seconds']:6.2f} s  predicted {est.megabytes:8.0f} MiB  measured {m['measured_bytes'] / MIB:8.0f} MiB  ({row['relative_error']:+.1%})  traced {traced.megabytes:8.0f} MiB ({row['traced_error']:+.1%})",
            flush=True,
        )
        if row["predicted_trainable"] != m["trainable"]:
            print(
                f"  the estimate counts {row['predicted_trainable']} trainable parameters, "
                f"the model trains {m['trainable']}",
                flush=True,
            )

    slug = device_slug(device)
    tag = ("" if args.base == "small-pretrained" else f"-{args.base}") + (
        "-levers" if args.levers else "-checkpointing" if args.checkpoint_sets else ""
    )
    stem = f"{slug}{tag}-{dt.date.today()}{'-reduced' if args.reduced else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "device": slug,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "microsoft-aurora": version("microsoft-aurora"),
        "peft": version("peft"),
        "grid": list(grid),
        "levels": list(levels),
        "timed_steps": steps,
        "methods": list(args.methods),
        "base": args.base,
        "aurora_class": BASES[args.base].aurora_class,
        "threads": torch.get_num_threads(),
    }
    (args.out / f"{stem}.json").write_text(json.dumps(meta | {"configs": rows}, indent=1))
    header = (
        f"# Peak memory of {BASES[args.base].aurora_class} trial configs ({slug}, "
        f"{dt.date.today()})\n\n"
        f"`{meta['command']}` - grid {grid[0]}x{grid[1]}, levels {list(levels)}, torch {meta['torch']}, "
        f"aurora {meta['microsoft-aurora']}; median of {steps} timed steps after one warm-up."
    )
    if device.type == "cpu":
        header += (
            "\n\nOn a CPU, measured = weights + AdamW state + inputs + the peak growth of live "
            "tensor memory during one step (torch profiler allocation events, from a step whose "
            "gradients start freed), "
            "the step a trial takes (Aurora's loss over every variable). Fitted: "
            '`memory.estimate_peak(how="fitted")`; traced: the same step run on fake tensors '
            '(`how="traced"`, `aurora_sweep.memory.traced`). '
            "Saved act.: bytes saved for backward in one forward (with checkpointing only the "
            "checkpoint inputs). RSS delta: the process's resident-set growth over the timed steps "
            "(the CPU allocator keeps and reuses freed memory)."
        )
    (args.out / f"{stem}.md").write_text(markdown(rows, header))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
