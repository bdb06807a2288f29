"""Memory levers of a small GPU: gradient accumulation and a lighter optimiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aurora_sweep.data.samples import Samples, target_stats
from aurora_sweep.data.store import open_store
from aurora_sweep.memory import estimate as memory
from aurora_sweep.memory.meta_model import build_meta_model, count_params
from aurora_sweep.model.files import DEMO_CHECKPOINT
from aurora_sweep.model.loss import LossSpec
from aurora_sweep.train.fit import _Step, build_trial_model
from aurora_sweep.train.optimiser import trial_optimiser
from synthetic import tiny_lora_trial

pytestmark = pytest.mark.filterwarnings("ignore")
CPU = torch.device("cpu")


def _stepped(trial, train, stats, micro_batches):
    """The model after one `_Step` over `micro_batches` (lists of sample indices), with plain
    SGD so that the update is the accumulated gradient itself."""
    peft_model, model, parts = build_trial_model(trial, stats, DEMO_CHECKPOINT)
    _, schedule, trained = trial_optimiser(trial, peft_model, model, parts)
    sgd = torch.optim.SGD(trained, lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(sgd, lambda k: 1.0)
    spec = LossSpec(
        levels=trial.levels, lat=train.cube["latitude"].values, target_scale=stats.scale
    )
    step = _Step(trial, spec, peft_model, sgd, schedule, trained, CPU)
    before = [p.detach().clone() for p in trained]
    peft_model.train()
    loss = step(1, [train.training_batch(idx) for idx in micro_batches])
    return loss, [p.detach() - b for p, b in zip(trained, before)]


def test_four_accumulated_micro_batches_of_one_make_the_step_of_a_batch_of_four(tiny_config):
    train = Samples(open_store(tiny_config.data.store), tiny_config.data, "train")
    stats = target_stats(train.cube, tiny_config.data.train, "tp")
    samples = [3, 11, 20, 31]
    one, one_update = _stepped(tiny_lora_trial(batch_size=4), train, stats, [samples])
    four, four_update = _stepped(
        tiny_lora_trial(batch_size=1, accumulate=4), train, stats, [[s] for s in samples]
    )
    assert four == pytest.approx(one, rel=1e-5)
    moved = [u for u in one_update if u.abs().max() > 0]
    assert moved, "the step changed nothing"
    for a, b in zip(one_update, four_update):
        scale = max(a.abs().max().item(), 1e-12)
        assert (a - b).abs().max().item() <= 1e-4 * scale


def test_adafactor_keeps_the_factored_state_the_estimate_counts(tiny_config):
    train = Samples(open_store(tiny_config.data.store), tiny_config.data, "train")
    stats = target_stats(train.cube, tiny_config.data.train, "tp")
    trial = tiny_lora_trial(optimizer="adafactor", unfrozen_blocks=1)
    peft_model, model, parts = build_trial_model(trial, stats, DEMO_CHECKPOINT)
    optimiser, _, trained = trial_optimiser(trial, peft_model, model, parts)
    assert isinstance(optimiser, torch.optim.Adafactor)
    batch, target = train.training_batch([3, 4])
    peft_model(batch).surf_vars["tp"].float().pow(2).mean().backward()
    optimiser.step()
    state = sum(v.numel() for s in optimiser.state.values() for k, v in s.items() if k != "step")
    assert count_params(peft_model).factored == count_params(build_meta_model(trial)).factored
    assert count_params(peft_model).factored == state
    grid = tuple(train.grid)
    adam = memory.estimate_peak(tiny_lora_trial(unfrozen_blocks=1), grid=grid, levels=3)
    light = memory.estimate_peak(trial, grid=grid, levels=3)
    assert light.parts["optimizer"] == 4 * state < adam.parts["optimizer"]


@pytest.mark.parametrize("rms", [0.0, 0.02], ids=["zero-initialised", "pretrained"])
def test_adafactor_and_adamw_take_steps_of_the_same_size_from_the_same_gradient(rms):
    """One step at lr 1e-3 from the same gradient: a zero-initialised tensor (LoRA's B) and a
    pretrained one (RMS 0.02) move by comparable amounts under both optimisers (torch's default
    Adafactor moves them 1,000× and 50× less)."""
    from aurora_sweep.train.optimiser import new_optimiser

    gradient = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    start = rms * torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    moved = {}
    for kind in ("adamw", "adafactor"):
        weight = torch.nn.Parameter(start.clone())
        optimiser = new_optimiser(kind, [weight], lr=1e-3)
        weight.grad = gradient.clone()
        optimiser.step()
        moved[kind] = (weight.detach() - start).pow(2).mean().sqrt().item()
    assert moved["adamw"] > 0 and moved["adafactor"] > 0
    assert 1 / 3 <= moved["adafactor"] / moved["adamw"] <= 3


def test_a_lora_trial_moves_lora_b_alike_under_adamw_and_adafactor(tiny_config):
    """The trial's own optimiser (its parameter groups and schedule): LoRA's B matrices, zero at
    the start, move within 3× of each other under the two optimisers from the same gradient."""
    train = Samples(open_store(tiny_config.data.store), tiny_config.data, "train")
    stats = target_stats(train.cube, tiny_config.data.train, "tp")
    moved = {}
    for kind in ("adamw", "adafactor"):
        trial = tiny_lora_trial(optimizer=kind, learning_rate=1e-3)
        peft_model, model, parts = build_trial_model(trial, stats, DEMO_CHECKPOINT)
        optimiser, _, _ = trial_optimiser(trial, peft_model, model, parts)
        lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().max() == 0 for p in lora_b)
        torch.manual_seed(0)
        for p in lora_b:
            p.grad = torch.randn_like(p)
        optimiser.step()
        moved[kind] = torch.cat([p.detach().flatten() for p in lora_b]).norm().item()
    assert moved["adamw"] > 0
    assert 1 / 3 <= moved["adafactor"] / moved["adamw"] <= 3


def test_a_trial_trains_with_accumulation_and_adafactor(tiny_config):
    from aurora_sweep.data.trial_data import TrialData
    from aurora_sweep.train.fit import fit

    data = TrialData.prepare(open_store(tiny_config.data.store), tiny_config)
    trial = tiny_lora_trial(batch_size=1, accumulate=2, optimizer="adafactor", steps=2)
    result = fit(trial, data, checkpoint=DEMO_CHECKPOINT, device=CPU, bootstrap=0)
    assert [s for s, _ in result.train_loss] == [1, 2]
    assert all(np.isfinite(v) for _, v in result.train_loss)
    assert np.isfinite(result.metrics[tiny_config.objective.name])


def test_a_tile_never_crosses_the_regions_edge_and_is_whole_patches_of_at_least_12():
    from aurora_sweep.train.tiles import tile_draws, tile_side

    grid = (37, 52)  # a height of 4k + 1, as Aurora takes
    assert tile_side(0, grid) == grid
    assert tile_side(30, grid) == (28, 28)  # whole patches
    assert tile_side(5, grid) == (12, 12) and tile_side(96, grid) == grid
    side = tile_side(16, grid)
    for (i, j), (h, w) in tile_draws(np.random.default_rng(0), grid, side, 500):
        assert 0 <= i and i + h <= grid[0] and 0 <= j and j + w <= grid[1]
        assert 12 <= h <= side[0] + 1 and 12 <= w <= side[1]
        assert w % 4 == 0 and h % 4 in (0, 1)


@pytest.mark.parametrize("tile", [64, 96])
def test_tiles_cover_every_point_of_the_europe_grid_equally_often(tile):
    """The shipped Europe study's grid (148 x 208 points): over many draws, the region's edges
    and corners are trained on as often as its middle (uniform corners gave an edge row 64x
    and a corner 4,096x fewer visits at tile 64)."""
    from aurora_sweep.train.tiles import tile_draws, tile_side

    grid = (148, 208)
    seen = np.zeros(grid)
    for (i, j), (h, w) in tile_draws(np.random.default_rng(0), grid, tile_side(tile, grid), 20000):
        seen[i : i + h, j : j + w] += 1
    assert seen.max() / seen.min() <= 1.25


def test_a_tiles_rows_are_weighed_as_the_scores_weigh_them():
    """cos(latitude) over the region's mean, not renormalised inside the tile."""
    from aurora_sweep.model.loss import LossSpec

    lat = np.linspace(70.0, 30.0, 41)
    region = LossSpec(levels=(500,), lat=lat, target_scale=1.0)
    whole = region.latitude_weights("cpu")[:, 0]
    region_cos = float(np.cos(np.deg2rad(lat)).mean())
    tile = LossSpec(levels=(500,), lat=lat[:12], target_scale=1.0, region_cos=region_cos)
    assert torch.allclose(tile.latitude_weights("cpu")[:, 0], whole[:12])
    assert tile.latitude_weights("cpu").mean() < 0.9  # the north's rows weigh less than 1


def test_a_tile_cuts_every_variable_the_statics_and_the_coordinates_alike(tiny_config):
    from aurora_sweep.train.tiles import crop_sample

    train = Samples(open_store(tiny_config.data.store), tiny_config.data, "train")
    batch, target = train.training_batch([3, 4])
    assert train.grid == (16, 16)  # the tiny study: 16 x 16 points at 1 degree
    tile, truth = crop_sample(batch, target, (4, 2), (12, 12))
    assert all(v.shape[-2:] == (12, 12) for v in tile.surf_vars.values())
    assert all(v.shape[-2:] == (12, 12) for v in tile.atmos_vars.values())
    assert all(v.shape == (12, 12) for v in tile.static_vars.values())
    assert all(v.shape[-2:] == (12, 12) for v in truth.values())
    assert torch.equal(tile.metadata.lat, batch.metadata.lat[4:16])
    assert torch.equal(tile.metadata.lon, batch.metadata.lon[2:14])
    assert torch.equal(tile.surf_vars["tp"], batch.surf_vars["tp"][..., 4:16, 2:14])
    assert torch.equal(tile.static_vars["lsm"], batch.static_vars["lsm"][4:16, 2:14])
    assert torch.equal(truth["z"], target["z"][..., 4:16, 2:14])


def test_a_trial_trains_on_tiles_and_its_estimate_follows_the_tile(tiny_config):
    from aurora_sweep.data.trial_data import TrialData
    from aurora_sweep.train.fit import fit

    data = TrialData.prepare(open_store(tiny_config.data.store), tiny_config)
    trial = tiny_lora_trial(tile=12, steps=2)
    result = fit(trial, data, checkpoint=DEMO_CHECKPOINT, device=CPU, bootstrap=0)
    assert all(np.isfinite(v) for _, v in result.train_loss)
    # validation and scores stay on the whole region
    assert result.forecasts.values.shape[1:] == data.validation.grid
    grid = data.train.grid
    whole = memory.estimate_peak(tiny_lora_trial(), grid=grid, levels=3)
    tiled = memory.estimate_peak(trial, grid=grid, levels=3)
    assert tiled.parts["activations"] < whole.parts["activations"]


@pytest.mark.slow
def test_a_capped_study_finds_feasible_recipes_through_tiles_and_auto_checkpointing(
    tiny_config, monkeypatch
):
    """Every whole-region recipe on all three levels without checkpointing is over the cap: the
    study trains the tiled one, the "auto" one, which checkpoints only what the cap needs, and
    the one on a single level (scored against the base on that level), and `best --pareto`
    lists them."""
    import dataclasses

    import optuna
    from typer.testing import CliRunner

    from aurora_sweep.cli import app
    from aurora_sweep.config.recipe import AUTO_CHECKPOINTING
    from aurora_sweep.data.samples import patch_crop
    from aurora_sweep.sweep.records import TrialRecord
    from aurora_sweep.sweep.run import run_study
    from aurora_sweep.sweep.space import sample_trial
    from aurora_sweep.sweep.storage import open_study

    search = dataclasses.replace(
        tiny_config.search, lora_rank=(2,), lora_targets=("qkv+proj",), unfrozen_blocks=(0,),
        precision=("fp32",), activation_checkpointing=(False, "auto"), tile=(0, 12),
        levels=((500,), (500, 700, 850)),
    )  # fmt: skip
    train = dataclasses.replace(tiny_config.train, steps=2, eval_every=2)
    config = dataclasses.replace(tiny_config, search=search, train=train)
    cube = open_store(config.data.store)
    grid = patch_crop(cube.sizes["latitude"], cube.sizes["longitude"])
    probe = sample_trial(optuna.create_study().ask(), config)
    whole = dataclasses.replace(
        probe, activation_checkpointing=False, tile=0, levels=(500, 700, 850)
    )
    cap = memory.estimate_peak(whole, grid=grid, levels=3, how="traced").total_bytes - 1
    config = dataclasses.replace(config, gpu_memory_cap=cap)
    study = open_study(config, create=True)
    three = "500,700,850"
    for ckpt, tile, levels in [(False, 0, three), (False, 12, three), ("auto", 0, three),
                               (False, 0, "500")]:  # fmt: skip
        study.enqueue_trial({"activation_checkpointing": ckpt, "tile": tile, "levels": levels})
    run_study(config, trials=4)
    trials = open_study(config, create=False).trials
    by = {
        (t.params["activation_checkpointing"], t.params["tile"], t.params["levels"]): t
        for t in trials
    }
    assert by[False, 0, three].state == optuna.trial.TrialState.PRUNED  # over the cap, untrained
    assert TrialRecord.of(by[False, 0, three]).memory_over_cap_mb > 0
    for key in [(False, 12, three), ("auto", 0, three), (False, 0, "500")]:
        assert by[key].state == optuna.trial.TrialState.COMPLETE
        assert TrialRecord.of(by[key]).predicted_peak_mb * memory.MIB <= cap
    # the one-level trial is compared with the base run on that level
    forgets = {k for k in TrialRecord.of(by[False, 0, "500"]).scores if k.startswith("forget_")}
    assert "forget_z500_ratio" in forgets and not any("850" in k for k in forgets)
    assert "forget_z850_ratio" in TrialRecord.of(by[False, 12, three]).scores
    assert "demo/fp32/500hPa" in open_study(config, create=False).user_attrs["base_mse_by_base"]
    planned = TrialRecord.of(by["auto", 0, three]).config
    assert planned["activation_checkpointing"] is True
    # under a cap, each trial scores at the largest batch the cap allows (its peak predicted)
    assert all(TrialRecord.of(t).config["eval_batch"] >= 1 for t in by.values())
    assert tuple(planned["checkpoint_modules"]) == AUTO_CHECKPOINTING[1]  # the blocks suffice

    path = config.path.parent / "capped.toml"
    text = config.path.read_text().replace("[search]", "[resources]\n"
                                           f"gpu_memory_cap = {cap}\n\n[search]")  # fmt: skip
    text = text.replace("activation_checkpointing = [false, true]",
                        'activation_checkpointing = [false, "auto"]\ntile = [0, 12]\n'
                        "levels = [[500], [500, 700, 850]]")  # fmt: skip
    path.write_text(text)
    monkeypatch.chdir(config.workdir)
    result = CliRunner().invoke(app, ["best", "--config", str(path), "--pareto"])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output
    # the front holds the feasible recipes that no other beats in both skill and memory
    assert "ckpt:blocks" in result.output or "tile12" in result.output
    listed = CliRunner().invoke(app, ["best", "--config", str(path)])
    assert listed.exit_code == 0, listed.output
    # every feasible one
    assert "ckpt:blocks" in listed.output and "tile12" in listed.output
    assert "500hPa" in listed.output
