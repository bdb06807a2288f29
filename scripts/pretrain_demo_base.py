"""Pretrain the demo base model: a tiny Aurora trained on the demo data before 2022, without tp.

This is the miniature of what Microsoft did for AuroraSmallPretrained (pretraining on ERA5 up to
about 2021): the fine-tunes then adapt a model that already forecasts the atmosphere to a period
it never saw and a variable it does not have. A randomly initialised Aurora would not do: its
adaptive layer norms start with zero modulation, so LoRA would receive exactly zero gradient.

Aurora embeds the absolute time of each sample. Pretrained on one year, the base learns that
year's weather by date: its 6-hour 2t forecasts for 2024 were then 7 K too warm in January (0.4 K
with the same fields dated 2021), and every forgetting ratio of a fine-tune measured how far the
fine-tune undid that, year by year, not what it kept. Several years (2015-2021 by default) leave it
the atmosphere's dynamics to learn instead.

    python scripts/pretrain_demo_base.py [--steps 4000] [--first-year 2015]

writes src/aurora_sweep/demo/aurora-demo-base.ckpt (a state dict in Aurora's checkpoint format,
stored in bfloat16 to keep the package small) and prints its sha256.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
from pathlib import Path

import numpy as np
import torch

from aurora_sweep.config.study import DataConfig, Period, Region
from aurora_sweep.data.demo import DemoWorld, demo_cube
from aurora_sweep.data.samples import Samples
from aurora_sweep.data.store import ATMOS_VARS, SURF_VARS
from aurora_sweep.model.build import build_base
from aurora_sweep.model.files import DEMO_CHECKPOINT, file_sha256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--first-year", type=int, default=2015)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=DEMO_CHECKPOINT)
    args = parser.parse_args()

    torch.manual_seed(0)
    world = DemoWorld(first_year=args.first_year, last_year=2021)
    cube = demo_cube(world)
    pre = Period(dt.date(args.first_year, 1, 1), dt.date(2021, 12, 31))
    data = DataConfig(
        source="demo", store=Path("unused"), region=Region(62, 31, 4, 51), levels=world.levels,
        grid=world.grid, period=pre, train=pre, validation=pre, test=pre,
    )  # fmt: skip
    samples = Samples(cube, data, "train")
    model = build_base("demo", with_target=False)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(samples)} pretraining samples from {args.first_year}-2021")  # fmt: skip
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, args.lr, total_steps=args.steps)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(samples), args.batch_size, replace=False)
        batch, _ = samples.batch(idx)
        batch = dataclasses.replace(
            batch, surf_vars={k: v for k, v in batch.surf_vars.items() if k in SURF_VARS}
        )
        win = samples._window(idx)
        target = dataclasses.replace(
            batch,
            surf_vars={k: torch.from_numpy(win[k].values.reshape(len(idx), 3, *win[k].shape[1:])[:, 2:]) for k in SURF_VARS},
            atmos_vars={k: torch.from_numpy(win[k].values.reshape(len(idx), 3, *win[k].shape[1:])[:, 2:]) for k in ATMOS_VARS},
        )  # fmt: skip
        pred = model(batch)
        p, t = pred.normalise(surf_stats={}), target.normalise(surf_stats={})
        errs = [((p.surf_vars[k] - t.surf_vars[k]) ** 2).mean() for k in SURF_VARS]
        errs += [((p.atmos_vars[k] - t.atmos_vars[k]) ** 2).mean() for k in ATMOS_VARS]
        loss = torch.stack(errs).mean()
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, args.out)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB), sha256 {file_sha256(args.out)}"
    )


if __name__ == "__main__":
    main()
