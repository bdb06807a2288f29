import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from aurora_sweep.config.recipe import TrialConfig
from aurora_sweep.data.samples import Samples, target_stats
from aurora_sweep.data.store import open_store
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.model.build import (
    apply_lora,
    backbone_blocks,
    build_base,
    load_base_checkpoint,
    new_variable_keys,
    set_trainable,
)
from aurora_sweep.model.files import DEMO_CHECKPOINT
from aurora_sweep.train.fit import build_trial_model
from synthetic import train_steps

warnings.filterwarnings("ignore", message="The normalisation statics")
STATS = (1.0, 2.0)


def test_demo_checkpoint_loads_with_only_the_tp_keys_missing():
    model = build_base("demo", stats=STATS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_base_checkpoint(model, DEMO_CHECKPOINT)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert new_variable_keys(model) == {
        "encoder.surf_token_embeds.weights.tp",
        "decoder.surf_heads.tp.weight",
        "decoder.surf_heads.tp.bias",
    }
    assert not changed & new_variable_keys(model)
    assert len(changed) > 100


def test_a_checkpoint_missing_another_key_is_refused(tmp_path):
    d = torch.load(DEMO_CHECKPOINT, weights_only=True)
    del d["backbone.encoder_layers.0.blocks.0.attn.qkv.weight"]
    torch.save(d, tmp_path / "broken.ckpt")
    with pytest.raises(AuroraSweepError, match="missing"):
        load_base_checkpoint(build_base("demo", stats=STATS), tmp_path / "broken.ckpt")


def test_a_checkpoint_with_extra_keys_is_refused(tmp_path):
    d = torch.load(DEMO_CHECKPOINT, weights_only=True)
    d["decoder.surf_heads.sst.weight"] = torch.zeros(3)
    torch.save(d, tmp_path / "extra.ckpt")
    with pytest.raises(AuroraSweepError, match="unexpected"):
        load_base_checkpoint(build_base("demo", stats=STATS), tmp_path / "extra.ckpt")


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    small = build_base("demo", with_target=False)
    d = {
        k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim else v
        for k, v in small.state_dict().items()
    }
    torch.save(d, tmp_path / "wide.ckpt")
    with pytest.raises(AuroraSweepError, match="does not fit"):
        load_base_checkpoint(build_base("demo", stats=STATS), tmp_path / "wide.ckpt")


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(AuroraSweepError, match="not a readable"):
        load_base_checkpoint(build_base("demo", stats=STATS), tmp_path / "junk.ckpt")


def test_lora_goes_only_into_the_backbone_linears_it_names():
    model = build_base("demo", stats=STATS)
    peft_model = apply_lora(model, rank=4, targets="qkv+fc2")
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert wrapped and all(".backbone." in n for n in wrapped)
    assert {n.rsplit(".", 1)[1] for n in wrapped} == {"qkv", "fc2"}
    assert len(wrapped) == 2 * len(backbone_blocks(model))


def test_unfreezing_takes_the_last_blocks_in_forward_order():
    model = build_base("demo", stats=STATS)
    apply_lora(model, rank=2, targets="qkv")
    parts = set_trainable(model, unfrozen_blocks=2)
    last_two = [name for name, _ in backbone_blocks(model)[-2:]]
    assert {
        p.split(".blocks.")[0] + ".blocks." + p.split(".blocks.")[1].split(".")[0]
        for p in parts.blocks
    } == set(last_two)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(parts.lora) | set(parts.new_variable) | set(parts.blocks)


def test_too_many_unfrozen_blocks_is_a_clear_error():
    model = build_base("demo", stats=STATS)
    with pytest.raises(AuroraSweepError, match="only"):
        set_trainable(model, unfrozen_blocks=99)


def test_fp16_on_a_cpu_is_refused_with_advice():
    from aurora_sweep.model.build import set_precision

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(AuroraSweepError, match="bf16"):
        set_precision(build_base("demo", stats=STATS), "fp16")


@pytest.mark.parametrize("unfrozen", [0, 1])
def test_training_changes_lora_and_tp_weights_and_leaves_every_frozen_weight_bit_for_bit(
    tiny_config, unfrozen
):
    """peft's own test, on Aurora: after a few optimiser steps only the trainable weights moved."""
    cube = open_store(tiny_config.data.store)
    train = Samples(cube, tiny_config.data, "train")
    trial = TrialConfig(
        lora_rank=4, lora_targets="qkv+proj", unfrozen_blocks=unfrozen, batch_size=2, precision="fp32",
        learning_rate=1e-2, activation_checkpointing=False, base="demo", levels=(500, 700, 850), steps=3,
        eval_every=3, val_samples=4, weight_decay=0.0, seed=0,
    )  # fmt: skip
    peft_model, model, parts = build_trial_model(
        trial, target_stats(train.cube, tiny_config.data.train, "tp"), DEMO_CHECKPOINT
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = train_steps(peft_model, train, steps=3, offset=10)
    trainable = set(parts.lora) | set(parts.new_variable) | set(parts.blocks)
    for name, p in model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(p, before[name]), f"frozen weight {name} changed"
    for name in parts.new_variable:
        assert not torch.equal(model.get_parameter(name), before[name]), f"{name} did not train"
    lora_b = [n for n in parts.lora if "lora_B" in n]
    assert sum(not torch.equal(model.get_parameter(n), before[n]) for n in lora_b) == len(lora_b)
    if unfrozen:
        assert all(
            not torch.equal(model.get_parameter(n), before[n])
            for n in parts.blocks
            if n.endswith("weight")
        )
    assert np.isfinite(loss.item())


def _offline(monkeypatch, cache: Path) -> None:
    """An empty Hugging Face cache, and a hub at a closed loopback port (no test leaves the
    machine)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def test_offline_small_pretrained_without_a_cached_file_says_how_to_get_it(monkeypatch, tmp_path):
    import time

    import huggingface_hub

    from aurora_sweep.config.bases import BASES
    from aurora_sweep.model.files import resolve_checkpoint

    SMALL_NAME = BASES["small-pretrained"].checkpoint_name
    _offline(monkeypatch, tmp_path / "hub")

    def download(*args, **kwargs):
        raise AssertionError("no download is tried when the hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    started = time.monotonic()
    with pytest.raises(AuroraSweepError, match="--checkpoint") as info:
        resolve_checkpoint("small-pretrained", None)
    assert time.monotonic() - started < 5  # at once, not after the hub client's retries
    assert SMALL_NAME in str(info.value) and "huggingface-cli download" in str(info.value)
    assert "cannot be reached" in str(info.value)


def test_a_cached_checkpoint_is_used_without_asking_the_hub(monkeypatch, tmp_path):
    """A file in the Hugging Face cache's layout (snapshots/<revision>/<name>) is found there."""
    from aurora_sweep.config.bases import BASES
    from aurora_sweep.model.files import HF_REPO, resolve_checkpoint

    spec = BASES["small-pretrained"]
    _offline(monkeypatch, tmp_path / "hub")
    folder = tmp_path / "hub" / f"models--{HF_REPO.replace('/', '--')}"
    snapshot = folder / "snapshots" / spec.revision
    snapshot.mkdir(parents=True)
    (snapshot / spec.checkpoint_name).write_bytes(b"weights")
    assert resolve_checkpoint("small-pretrained", None) == snapshot / spec.checkpoint_name


def test_a_local_checkpoint_path_that_does_not_exist_is_refused(tmp_path):
    from aurora_sweep.model.files import resolve_checkpoint

    with pytest.raises(AuroraSweepError, match="no checkpoint file"):
        resolve_checkpoint("small-pretrained", tmp_path / "aurora.ckpt")


def test_small_pretrained_loads_a_checkpoint_in_aurora_format_with_tp_added(tmp_path):
    """The real model's loading path, with a checkpoint file made here (no download)."""
    source = build_base("small-pretrained", with_target=False)
    torch.save({f"net.{k}": v for k, v in source.state_dict().items()}, tmp_path / "small.ckpt")
    model = build_base("small-pretrained", stats=STATS)
    load_base_checkpoint(model, tmp_path / "small.ckpt")
    name = "backbone.encoder_layers.0.blocks.0.attn.qkv.weight"
    assert torch.equal(model.get_parameter(name), source.get_parameter(name))
    assert sum(p.numel() for p in source.parameters()) == pytest.approx(112.8e6, rel=0.01)


def test_tp_forecasts_are_never_negative_even_from_a_head_that_says_so(tiny_config):
    from aurora_sweep.model.build import clamped, init_new_variable

    cube = open_store(tiny_config.data.store)
    samples = Samples(cube, tiny_config.data, "validation")
    model = build_base("demo", stats=(0.0, 2.0))
    load_base_checkpoint(model, DEMO_CHECKPOINT)
    init_new_variable(model, start=-3.0)  # every raw tp output is -6 mm
    with torch.no_grad():
        raw = model(samples.batch([0, 1])[0]).surf_vars["tp"]
        with clamped(model):  # as every score and forecast runs it
            tp = model(samples.batch([0, 1])[0]).surf_vars["tp"]
    assert torch.allclose(raw, torch.full_like(raw, -6.0))  # training sees the raw output
    assert (tp == 0).all() and not model.clamp_at_first_step
    init_new_variable(model, start=0.5)
    with torch.no_grad(), clamped(model):
        tp = model(samples.batch([0, 1])[0]).surf_vars["tp"]
    assert torch.allclose(tp, torch.full_like(tp, 1.0))  # 0.5 * scale 2 mm, unclamped


def test_the_trained_model_is_unclamped_and_scoring_and_loaded_adapters_clamp(
    tiny_config, monkeypatch
):
    from aurora_sweep.verify import scoring as evaluation
    from synthetic import tiny_lora_trial

    cube = open_store(tiny_config.data.store)
    samples = Samples(cube, tiny_config.data, "validation")
    peft_model, model, _ = build_trial_model(
        tiny_lora_trial(), target_stats(samples.cube, tiny_config.data.train, "tp"), DEMO_CHECKPOINT
    )
    assert not model.clamp_at_first_step
    seen = []
    original = model.forward
    monkeypatch.setattr(
        model,
        "forward",
        lambda *a, **k: seen.append(model.clamp_at_first_step) or original(*a, **k),
    )
    evaluation.forecast(peft_model, samples, np.arange(2), batch_size=2, device="cpu", state=False)
    assert seen == [True] and not model.clamp_at_first_step


def test_a_regional_model_keeps_its_east_and_west_edges_apart():
    """A shifted-window block: the easternmost tokens reach the westernmost only when wrapped."""
    from aurora.model.swin3d import Swin3DTransformerBlock

    from aurora_sweep.model.build import set_longitude_wrap

    torch.manual_seed(0)
    block = Swin3DTransformerBlock(
        dim=8, num_heads=2, time_dim=8, window_size=(1, 2, 4), shift_size=(0, 1, 2)
    )
    for p in block.parameters():  # Aurora starts its modulation at zero: give it some
        torch.nn.init.normal_(p, std=0.2)
    res = (1, 4, 16)
    x = torch.randn(1, 16 * 4, 8)
    c = torch.randn(1, 8)
    east = x.clone().view(1, 4, 16, 8)
    east[:, :, -1] += 5.0  # change the easternmost column only
    east = east.view(1, -1, 8)

    def west_change() -> float:
        with torch.no_grad():
            a = block(x, c, res, 1).view(1, 4, 16, 8)
            b = block(east, c, res, 1).view(1, 4, 16, 8)
        return (a[:, :, 0] - b[:, :, 0]).abs().max().item()

    assert west_change() > 1e-3  # Aurora's default joins the edges
    holder = torch.nn.Sequential(block)
    set_longitude_wrap(holder, False)
    assert west_change() == 0.0


def test_every_lora_variant_scales_by_the_same_alpha():
    from aurora_sweep.model.build import LORA_ALPHA

    scaling = {}
    for variant in ("lora", "rslora"):
        for rank in (4, 16):
            model = build_base("demo", stats=STATS)
            peft_model = apply_lora(model, rank=rank, targets="qkv", variant=variant)
            layer = next(m for n, m in peft_model.named_modules() if n.endswith("qkv"))
            scaling[variant, rank] = layer.scaling["default"]
    assert scaling["lora", 4] == LORA_ALPHA / 4 and scaling["lora", 16] == LORA_ALPHA / 16
    assert scaling["rslora", 4] == pytest.approx(LORA_ALPHA / 2)
    assert scaling["rslora", 16] == pytest.approx(LORA_ALPHA / 4)


@pytest.mark.parametrize("method", ["lora", "dora", "head", "blocks", "full"])
def test_every_trainable_tensor_gets_a_gradient_from_the_loss(tiny_config, method):
    """What a method marks trainable (and the memory estimate counts) is exactly what the loss
    reaches: with every variable in the loss, `head` trains the whole decoder."""
    from aurora_sweep.model.loss import combine, loss_terms
    from aurora_sweep.train.fit import loss_spec
    from synthetic import tiny_lora_trial

    cube = open_store(tiny_config.data.store)
    train = Samples(cube, tiny_config.data, "train")
    lora = method in ("lora", "dora")
    trial = tiny_lora_trial(
        method=method, lora_rank=4 if lora else 0, unfrozen_blocks=2 if method == "blocks" else 0
    )
    stats = target_stats(train.cube, tiny_config.data.train, "tp")
    peft_model, model, parts = build_trial_model(trial, stats, DEMO_CHECKPOINT)

    class Data:  # what loss_spec reads
        pass

    Data.train, Data.stats = train, stats
    batch, target = train.training_batch([0, 1])
    spec = loss_spec(trial, Data)
    combine(spec, loss_terms(spec, peft_model(batch), target)).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    starved = [n for n in trainable if model.get_parameter(n).grad is None]
    assert not starved, f"{method}: trainable but no gradient: {starved[:5]}"
    if method == "head":
        decoder = {n for n, _ in model.named_parameters() if n.startswith("decoder.")}
        assert decoder <= set(trainable)


def test_an_output_only_target_leaves_its_input_embedding_at_zero(tiny_config):
    from synthetic import tiny_lora_trial

    cube = open_store(tiny_config.data.store)
    train = Samples(cube, tiny_config.data, "train")
    stats = target_stats(train.cube, tiny_config.data.train, "tp")
    _, model, parts = build_trial_model(
        tiny_lora_trial(target_input_lr=0.0), stats, DEMO_CHECKPOINT
    )
    embedding = model.get_parameter("encoder.surf_token_embeds.weights.tp")
    assert not embedding.requires_grad and not embedding.any()
    assert "encoder.surf_token_embeds.weights.tp" in parts.new_variable  # saved with the adapter


@pytest.mark.parametrize(
    ("method", "unfrozen"),
    [("rslora", 0), ("dora", 1), ("head", 0), ("blocks", 2), ("full", 0)],
)
def test_every_method_trains_what_it_says_and_nothing_else(tiny_config, method, unfrozen):
    """Each recipe, after a few optimiser steps: its trained weights moved, every other weight
    is bit-for-bit the pretrained one."""
    cube = open_store(tiny_config.data.store)
    train = Samples(cube, tiny_config.data, "train")
    lora = method in ("rslora", "dora")
    trial = TrialConfig(
        lora_rank=4 if lora else 0, lora_targets="qkv+proj" if lora else "", unfrozen_blocks=unfrozen,
        batch_size=2, precision="fp32", learning_rate=1e-2, activation_checkpointing=False,
        base="demo", levels=(500, 700, 850), steps=3, eval_every=3, val_samples=4,
        weight_decay=0.0, seed=0, method=method,
    )  # fmt: skip
    peft_model, model, parts = build_trial_model(
        trial, target_stats(train.cube, tiny_config.data.train, "tp"), DEMO_CHECKPOINT
    )
    assert bool(parts.lora) == lora
    if method == "head":
        assert parts.modules and all(n.startswith("decoder.") for n in parts.modules)
    if method == "blocks":
        assert parts.blocks and not parts.modules
    if method == "full":
        assert all(p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = train_steps(peft_model, train, steps=3, offset=10)
    trainable = set(parts.lora) | set(parts.new_variable) | set(parts.blocks) | set(parts.modules)
    for name, p in model.named_parameters():
        if name not in trainable:
            assert torch.equal(p, before[name]), f"frozen weight {name} changed"
    moved = [n for n in trainable if not torch.equal(model.get_parameter(n), before[n])]
    assert set(parts.new_variable) <= set(moved)
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in moved)
    if method in ("blocks", "full"):  # whole blocks train (this loss is tp's alone: the
        # decoder's atmospheric heads get no gradient from it, under any method)
        whole = {n for n in trainable if n.startswith("backbone.")}
        assert whole and len(whole & set(moved)) > len(whole) / 2
    assert np.isfinite(loss.item())


@pytest.mark.parametrize("method,unfrozen", [("dora", 1), ("lora", 0)])
def test_scoring_merges_the_adapter_and_gives_back_the_same_forecast_and_weights(
    tiny_config, method, unfrozen
):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from aurora_sweep.model.build import merged_adapter
    from aurora_sweep.verify import scoring as evaluation
    from synthetic import tiny_lora_trial

    cube = open_store(tiny_config.data.store)
    train = Samples(cube, tiny_config.data, "train")
    samples = Samples(cube, tiny_config.data, "validation")
    trial = tiny_lora_trial(method=method, unfrozen_blocks=unfrozen)
    peft_model, model, parts = build_trial_model(
        trial, target_stats(train.cube, tiny_config.data.train, "tp"), DEMO_CHECKPOINT
    )
    train_steps(peft_model, train, steps=2, offset=10)  # adapters away from their start
    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = np.arange(3)
    plain = evaluation.forecast(peft_model, samples, idx, batch_size=3, device="cpu")
    with merged_adapter(peft_model):
        assert layers and all(m.merged for m in layers)
        merged = evaluation.forecast(peft_model, samples, idx, batch_size=3, device="cpu")
    assert not any(m.merged for m in layers)
    np.testing.assert_allclose(merged.values, plain.values, rtol=1e-4, atol=1e-4)
    for v in plain.mse:
        assert merged.mse[v] == pytest.approx(plain.mse[v], rel=1e-4)
    adapter = set(parts.lora)
    for name, p in model.named_parameters():
        if name in adapter:  # the adapter's own weights: untouched
            assert torch.equal(p, before[name]), name
        else:  # the weights it adapts: back to within rounding
            torch.testing.assert_close(p, before[name], rtol=1e-5, atol=1e-6)


def test_a_model_without_adapters_scores_as_it_is(tiny_config):
    from aurora_sweep.model.build import merged_adapter

    model = build_base("demo", stats=STATS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with merged_adapter(model):
        pass
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_study_whose_aurora15_is_not_cached_is_refused_before_anything_is_made(
    tiny_config, monkeypatch, tmp_path
):
    """Aurora 1.5 as a baseline, its checkpoint in no cache and the hub out of reach: one line,
    at once, and no study database, no MLflow database, no trial."""
    import dataclasses
    import time

    from aurora_sweep.sweep.run import run_study

    _offline(monkeypatch, tmp_path / "hub")
    config = dataclasses.replace(
        tiny_config, baselines=("persistence", "climatology", "aurora-1.5")
    )
    started = time.monotonic()
    with pytest.raises(AuroraSweepError, match="not in the Hugging Face cache") as info:
        run_study(config, trials=1)
    assert time.monotonic() - started < 10
    assert "\n" not in str(info.value)
    assert not (config.workdir / "tiny.optuna.db").exists()
    assert not (config.workdir / "mlflow.db").exists()
