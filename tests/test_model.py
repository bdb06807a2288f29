import warnings

import numpy as np
import pytest
import torch

from aurora_sweep.dataset import Samples, tp_stats
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.model import (
    DEMO_CHECKPOINT,
    apply_lora,
    backbone_blocks,
    build_base,
    load_base_checkpoint,
    new_variable_keys,
    set_trainable,
)
from aurora_sweep.store import open_store
from aurora_sweep.train import TrialConfig, build_trial_model
from synthetic import train_steps

warnings.filterwarnings("ignore", message="The normalisation statics")
STATS = (1.0, 2.0)


def test_demo_checkpoint_loads_with_only_the_tp_keys_missing():
    model = build_base("demo", tp_stats=STATS)
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
        load_base_checkpoint(build_base("demo", tp_stats=STATS), tmp_path / "broken.ckpt")


def test_a_checkpoint_with_extra_keys_is_refused(tmp_path):
    d = torch.load(DEMO_CHECKPOINT, weights_only=True)
    d["decoder.surf_heads.sst.weight"] = torch.zeros(3)
    torch.save(d, tmp_path / "extra.ckpt")
    with pytest.raises(AuroraSweepError, match="unexpected"):
        load_base_checkpoint(build_base("demo", tp_stats=STATS), tmp_path / "extra.ckpt")


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    small = build_base("demo", with_tp=False)
    d = {
        k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim else v
        for k, v in small.state_dict().items()
    }
    torch.save(d, tmp_path / "wide.ckpt")
    with pytest.raises(AuroraSweepError, match="does not fit"):
        load_base_checkpoint(build_base("demo", tp_stats=STATS), tmp_path / "wide.ckpt")


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(AuroraSweepError, match="not a readable"):
        load_base_checkpoint(build_base("demo", tp_stats=STATS), tmp_path / "junk.ckpt")


def test_lora_goes_only_into_the_backbone_linears_it_names():
    model = build_base("demo", tp_stats=STATS)
    peft_model = apply_lora(model, rank=4, targets="qkv+fc2")
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert wrapped and all(".backbone." in n for n in wrapped)
    assert {n.rsplit(".", 1)[1] for n in wrapped} == {"qkv", "fc2"}
    assert len(wrapped) == 2 * len(backbone_blocks(model))


def test_unfreezing_takes_the_last_blocks_in_forward_order():
    model = build_base("demo", tp_stats=STATS)
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
    model = build_base("demo", tp_stats=STATS)
    with pytest.raises(AuroraSweepError, match="only"):
        set_trainable(model, unfrozen_blocks=99)


def test_fp16_on_a_cpu_is_refused_with_advice():
    from aurora_sweep.model import set_precision

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(AuroraSweepError, match="bf16"):
        set_precision(build_base("demo", tp_stats=STATS), "fp16")


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
        trial, tp_stats(train.cube, tiny_config.data.train), DEMO_CHECKPOINT
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


def test_offline_small_pretrained_without_a_cached_file_says_how_to_get_it(monkeypatch):
    import huggingface_hub

    from aurora_sweep.model import SMALL_NAME, resolve_checkpoint

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(AuroraSweepError, match="--checkpoint") as info:
        resolve_checkpoint("small-pretrained", None)
    assert SMALL_NAME in str(info.value) and "huggingface-cli download" in str(info.value)


def test_a_local_checkpoint_path_that_does_not_exist_is_refused(tmp_path):
    from aurora_sweep.model import resolve_checkpoint

    with pytest.raises(AuroraSweepError, match="no checkpoint file"):
        resolve_checkpoint("small-pretrained", tmp_path / "aurora.ckpt")


def test_small_pretrained_loads_a_checkpoint_in_aurora_format_with_tp_added(tmp_path):
    """The real model's loading path, with a checkpoint file made here (no download)."""
    source = build_base("small-pretrained", with_tp=False)
    torch.save({f"net.{k}": v for k, v in source.state_dict().items()}, tmp_path / "small.ckpt")
    model = build_base("small-pretrained", tp_stats=STATS)
    load_base_checkpoint(model, tmp_path / "small.ckpt")
    name = "backbone.encoder_layers.0.blocks.0.attn.qkv.weight"
    assert torch.equal(model.get_parameter(name), source.get_parameter(name))
    assert sum(p.numel() for p in source.parameters()) == pytest.approx(112.8e6, rel=0.01)


def test_tp_forecasts_are_never_negative_even_from_a_head_that_says_so(tiny_config):
    from aurora_sweep.model import init_new_variable

    cube = open_store(tiny_config.data.store)
    samples = Samples(cube, tiny_config.data, "validation")
    model = build_base("demo", tp_stats=(0.0, 2.0))
    load_base_checkpoint(model, DEMO_CHECKPOINT)
    init_new_variable(model, start=-3.0)  # every raw tp output is -6 mm
    with torch.no_grad():
        tp = model(samples.batch([0, 1])[0]).surf_vars["tp"]
    assert (tp == 0).all()
    init_new_variable(model, start=0.5)
    with torch.no_grad():
        tp = model(samples.batch([0, 1])[0]).surf_vars["tp"]
    assert torch.allclose(tp, torch.full_like(tp, 1.0))  # 0.5 * scale 2 mm, unclamped


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
        trial, tp_stats(train.cube, tiny_config.data.train), DEMO_CHECKPOINT
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
    if method in ("blocks", "full"):  # whole blocks train (the loss is tp's alone: the
        # decoder's atmospheric heads get no gradient from it, under any method)
        whole = {n for n in trainable if n.startswith("backbone.")}
        assert whole and len(whole & set(moved)) > len(whole) / 2
    assert np.isfinite(loss.item())
