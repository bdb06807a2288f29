"""Are two memory levers compared for their trade-off and not a defect? Adafactor's step size
against AdamW's, and how evenly tiles cover the region.

- One optimiser step at lr 1e-3 from the same gradient on a 64x64 tensor, zero-initialised (as
  LoRA's B and the new variable's head start) and pretrained-like (RMS 0.02): the RMS change under
  the trial's Adafactor (`train.optimiser.new_optimiser`) and under torch's default Adafactor,
  each over AdamW's.
- Tiles on the shipped Europe study's grid (148 x 208 points) at 64 and 96 points, 20,000
  draws (`train.tiles.tile_draws`): the most-covered point's count over the least-covered's.

    .venv/bin/python bench/levers_fairness.py

Prints the figures and saves JSON to bench/results/levers-fairness-<date>.json.
"""

from __future__ import annotations

import datetime as dt
import platform

import numpy as np
import torch
from _results import save

from aurora_sweep.train.optimiser import new_optimiser
from aurora_sweep.train.tiles import tile_draws, tile_side

EUROPE = (148, 208)


def step_size(optimiser, start: torch.Tensor, gradient: torch.Tensor) -> float:
    """The RMS change of a tensor at `start` after one step of `optimiser(params)`."""
    weight = torch.nn.Parameter(start.clone())
    opt = optimiser([weight])
    weight.grad = gradient.clone()
    opt.step()
    return float((weight.detach() - start).pow(2).mean().sqrt())


def main() -> None:
    gradient = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    out: dict = {
        "command": "bench/levers_fairness.py",
        "machine": f"{platform.node()} {platform.machine()}",
        "torch": torch.__version__,
        "date": dt.date.today().isoformat(),
        "steps": {},
        "tile_coverage_max_over_min": {},
    }
    for label, rms in (("zero-initialised", 0.0), ("pretrained RMS 0.02", 0.02)):
        start = rms * torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
        adamw = step_size(lambda p: new_optimiser("adamw", p, lr=1e-3), start, gradient)
        ours = step_size(lambda p: new_optimiser("adafactor", p, lr=1e-3), start, gradient)
        torchs = step_size(lambda p: torch.optim.Adafactor(p, lr=1e-3), start, gradient)
        out["steps"][label] = {
            "adafactor_over_adamw": ours / adamw,
            "torch_default": torchs / adamw,
        }
        print(f"{label}: Adafactor/AdamW {ours / adamw:.3f} (torch's default {torchs / adamw:.4f})")
    for tile in (64, 96):
        seen = np.zeros(EUROPE)
        draws = tile_draws(np.random.default_rng(0), EUROPE, tile_side(tile, EUROPE), 20000)
        for (i, j), (h, w) in draws:
            seen[i : i + h, j : j + w] += 1
        out["tile_coverage_max_over_min"][str(tile)] = float(seen.max() / seen.min())
        print(f"tile {tile}: coverage max/min {seen.max() / seen.min():.3f} over 20,000 draws")
    save(out, "levers-fairness")


if __name__ == "__main__":
    main()
