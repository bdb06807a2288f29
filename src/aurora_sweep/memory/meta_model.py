"""A trial's model on the meta device: shapes without storage, for the memory estimate.

`build_meta_model` builds the trial's exact model (base, tp, method, freezing) with no memory;
`count_params` counts its parameters by what they cost; `architecture` reads what activation
memory depends on (each Swin block's tokens, window padding, width and trained linears at the
trial's grid, and where the gradient's path starts). `memory` turns these into bytes.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode

from aurora_sweep.config.recipe import TrialConfig

if TYPE_CHECKING:
    from aurora import Aurora

#: Swin linears a trial may train, with the width of their input in units of the block width,
#: and whether that input is the window-padded token set (attention) or the plain one (MLP).
LINEAR_INPUTS = {"qkv": (1, True), "proj": (1, True), "fc1": (1, False), "fc2": (4, False)}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a trial's model, by what memory they cost."""

    total: int
    trainable: int
    backbone: int
    #: Adafactor's state of the trainable ones: a row and a column of second moments per matrix
    #: (prod(shape[:-1]) + prod(shape[:-2]) * shape[-1] values), the whole tensor for a vector
    factored: int = 0


@dataclass(frozen=True)
class BlockShape:
    """One Swin block at a given input: tokens, window-padded tokens, width, trained linears."""

    tokens: int
    padded_tokens: int
    width: int
    trainable: tuple[str, ...]
    lora_rank: int
    params: int
    dora_width: int = 0  # output features of the block's DoRA-wrapped linears
    on_path: bool = True  # the gradient passes through it (it saves for backward)


@dataclass(frozen=True)
class Architecture:
    """What activation memory depends on, read from a (meta-device) trial model."""

    params: ParamCounts
    embed_dim: int
    patch_size: int
    latent_levels: int
    blocks: tuple[BlockShape, ...]
    checkpoint_units: tuple[tuple[int, ...], ...]  # block indices per backbone layer
    input_trains: bool = True  # tp's input embedding trains: the gradient runs into the encoder
    encoder_trains: bool = False  # the encoder's own weights train (`full`)
    decoder_trains: bool = False  # the decoder's weights train (`head`, `full`)


class _RangesOnCPU(TorchFunctionMode):
    """Aurora's constructor calls `.item()` on a `linspace`; keep such ranges off the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if func in (torch.linspace, torch.arange, torch.logspace):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


@contextmanager
def meta_device() -> Iterator[None]:
    """Construct modules on the meta device (shapes only), Aurora included."""
    with torch.device("meta"), _RangesOnCPU():
        yield


def build_meta_model(trial: TrialConfig) -> Aurora:
    """The trial's model (base + tp + LoRA + freezing) on the meta device: shapes, no storage."""
    from aurora_sweep.model.build import apply_method, build_base

    method = dict(
        method=trial.method,
        rank=trial.lora_rank,
        targets=trial.lora_targets,
        unfrozen_blocks=trial.unfrozen_blocks,
        train_input=trial.target_input_lr > 0,
    )
    try:
        model = copy.deepcopy(meta_base(trial.base, trial.arch))
        with meta_device():
            apply_method(model, **method)
    except (RuntimeError, NotImplementedError, ValueError):
        # a module that cannot be built on meta (DoRA reads its weights' norms): build it for
        # real (slower, same counts)
        model = build_base(trial.base, stats=(0.0, 1.0), arch=trial.arch)
        apply_method(model, **method)
    return model


@functools.lru_cache(maxsize=8)
def meta_base(base: str, arch: tuple = ()) -> Aurora:
    """The base model with a target (the default's: its name changes no size) on the meta
    device, built once: its weight initialisation runs
    through torch's meta decompositions and took 0.6 s of each trial's estimate; a copy takes
    a few milliseconds."""
    from aurora_sweep.model.build import build_base

    with meta_device():
        return build_base(base, stats=(0.0, 1.0), arch=arch)


def count_params(model: torch.nn.Module) -> ParamCounts:
    params = list(model.named_parameters())
    return ParamCounts(
        total=sum(p.numel() for _, p in params),
        trainable=sum(p.numel() for _, p in params if p.requires_grad),
        backbone=sum(p.numel() for n, p in params if n.startswith("backbone.")),
        factored=sum(_factored(p.shape) for _, p in params if p.requires_grad),
    )


def _factored(shape: torch.Size) -> int:
    if len(shape) < 2:
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


def _padded(res: tuple[int, int, int], window: tuple[int, int, int]) -> int:
    from aurora.model.util import maybe_adjust_windows

    ws, _ = maybe_adjust_windows(window, window, res)
    return math.prod(r + (-r) % w for r, w in zip(res, ws))


def architecture(model: Aurora, *, grid: tuple[int, int]) -> Architecture:
    """Block shapes of `model` for an input of `grid` (lat, lon) points, after Aurora's crop,
    and where the gradient's path starts (see the module docstring)."""
    from aurora_sweep.model.build import WRAPPED, backbone_blocks, input_embedding, target_keys

    patch = model.patch_size
    h, w = grid[0] // patch, grid[1] // patch
    backbone = model.backbone
    enc_res, _ = backbone.get_encoder_specs((model.encoder.latent_levels, h, w))
    n = len(backbone.encoder_layers)
    layer_res = enc_res + [enc_res[n - 1 - i] for i in range(len(backbone.decoder_layers))]
    new_keys = {k.replace(WRAPPED, "") for k in target_keys(model)}
    trains = {name.replace(WRAPPED, ""): p.requires_grad for name, p in model.named_parameters()}
    input_trains = trains[input_embedding(model)]
    own = [(k, t) for k, t in trains.items() if k not in new_keys]
    encoder_trains = any(t for k, t in own if k.startswith("encoder."))
    decoder_trains = any(t for k, t in own if k.startswith("decoder."))
    on_path = input_trains or encoder_trains
    blocks, units = [], []
    named = dict(backbone_blocks(model))
    for part, layers in (
        ("encoder_layers", backbone.encoder_layers),
        ("decoder_layers", backbone.decoder_layers),
    ):
        for i, layer in enumerate(layers):
            res = layer_res[i] if part == "encoder_layers" else layer_res[n + i]
            unit = []
            for j in range(len(layer.blocks)):
                block = named[f"backbone.{part}.{i}.blocks.{j}"]
                # the path starts at the first block with a trained weight
                on_path = on_path or any(p.requires_grad for p in block.parameters())
                unit.append(len(blocks))
                blocks.append(_block_shape(block, res, on_path))
            units.append(tuple(unit))
    return Architecture(
        params=count_params(model),
        embed_dim=backbone.embed_dim,
        patch_size=patch,
        latent_levels=model.encoder.latent_levels,
        blocks=tuple(blocks),
        checkpoint_units=tuple(units),
        input_trains=input_trains,
        encoder_trains=encoder_trains,
        decoder_trains=decoder_trains,
    )


def _block_shape(block: torch.nn.Module, res: tuple[int, int, int], on_path: bool) -> BlockShape:
    """One Swin block's shape at the token grid `res`: its trained linears, LoRA rank and DoRA
    width read from the modules peft wrapped."""
    trainable, rank, dora = [], 0, 0
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in LINEAR_INPUTS and any(p.requires_grad for p in module.parameters()):
            trainable.append(leaf)
            lora_a = getattr(module, "lora_A", None)
            if lora_a:
                rank += next(iter(lora_a.values())).out_features
            if getattr(module, "lora_magnitude_vector", None):
                dora += module.out_features
    return BlockShape(
        tokens=math.prod(res),
        padded_tokens=_padded(res, tuple(block.window_size)),
        width=block.dim,
        trainable=tuple(trainable),
        lora_rank=rank,
        params=sum(p.numel() for p in block.parameters()),
        dora_width=dora,
        on_path=on_path,
    )
