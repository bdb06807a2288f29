"""Build the model a trial trains: base Aurora + the target + peft LoRA + freezing + precision.

One function per step, in the order a trial applies them:

1. `build_base` constructs the architecture with the study's target (`targets.TARGETS`: tp,
   runoff, soil moisture, ...) as an extra surface variable under its name and its
   normalisation passed through `surf_stats` (never by editing Aurora's module globals);
2. `load_base_checkpoint` loads the pretrained weights with `strict=False`, accepting only the
   missing keys that the new variable explains;
3. `apply_method` makes it trainable as the trial's method says: `apply_lora` injects peft
   LoRA (or rsLoRA, DoRA) into the Swin backbone's linears, and `set_trainable` freezes
   everything but LoRA, the new variable's embedding and head, and the last N backbone blocks;
4. `set_precision` chooses the precision; activation checkpointing is Aurora's own
   `configure_activation_checkpointing`, on the modules `memory.plan_checkpointing` picks;
5. `set_longitude_wrap` keeps a regional box's east and west edges apart in the shifted windows
   (Aurora's default joins them, which only a global grid wants).

A trained model's target is not clamped at 0 on its first step (the loss must see the raw output:
a wet point whose raw forecast is negative would get no gradient); `clamped` switches Aurora's
clamp on for scoring and forecasts, and `load_finetuned` returns an adapter with it on.

The bases (`bases.BASES`: the demo, AuroraSmallPretrained, AuroraPretrained) differ only in
their class, constructor arguments and where the checkpoint file comes from. Aurora 1.5 predicts
precipitation itself: its trials adapt that output (`target_var`, `hourly.SixHourAurora15`)
instead of a new variable (for tp its sum over a step, for pr its mean), so nothing is added to
it and nothing of it starts from zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aurora
import torch
from aurora import Aurora

from aurora_sweep.config.bases import BASES
from aurora_sweep.config.recipe import LORA_METHODS, METHODS
from aurora_sweep.config.targets import BOUND, DEFAULT, TARGETS
from aurora_sweep.errors import AuroraSweepError

BASE_SURF_VARS = ("2t", "10u", "10v", "msl")
#: The prefix activation checkpointing puts in the names of the modules it wraps.
WRAPPED = "_checkpoint_wrapped_module."
#: LoRA's alpha, the same for every variant and rank (as in the LoRA and rsLoRA papers, which
#: hold alpha fixed): peft scales LoRA by alpha/r and rsLoRA by alpha/sqrt(r), so with alpha
#: tied to the rank (the old 2r) rsLoRA took 2-5.7x larger steps than LoRA at the same learning
#: rate and the comparison measured step size. 16 is 2r at the default rank 8: plain LoRA at r8
#: is unchanged.
LORA_ALPHA = 16.0


@dataclass(frozen=True)
class TrainableParts:
    """Names of the parameters a trial trains, by kind (names as in the Aurora module)."""

    lora: tuple[str, ...]
    new_variable: tuple[str, ...]
    blocks: tuple[str, ...]
    #: whole modules trained by `head` (the decoder) and `full` (everything else)
    modules: tuple[str, ...] = ()

    @property
    def saved_outside_adapter(self) -> tuple[str, ...]:
        return self.new_variable + self.blocks + self.modules


def build_base(
    base: str,
    *,
    target: str = DEFAULT,
    with_target: bool = True,
    stats: tuple[float, float] | None = None,
    clamp: bool = False,
    arch: tuple[tuple[str, object], ...] = (),
) -> Aurora:
    """Construct the base architecture (weights not loaded yet): its class from `bases.BASES`,
    with `target` (a name of `targets.TARGETS`) as an extra surface variable normalised by
    `stats` = (location, scale), and the constructor overrides `arch` (`bases`). The model's
    `target_name` says what it predicts (None with `with_target=False`).

    `clamp`: clamp the target at 0 on the first forecast step too (for forecasts; a model that
    trains must not, see `clamped`). Later rollout steps and the target's inputs are always
    clamped.
    """
    if base not in BASES:
        raise AuroraSweepError(f"unknown base model {base!r}: use one of {', '.join(BASES)}")
    spec = BASES[base]
    if spec.own_precipitation:
        return _build_own_precipitation(base, target, clamp=clamp, arch=arch)
    surf_vars = BASE_SURF_VARS + ((target,) if with_target else ())
    surf_stats = {target: stats} if with_target and stats is not None else None
    if with_target and stats is None:
        raise ValueError(f"a model with {target} needs stats=(location, scale)")
    # Aurora's own clamp of positive variables, at 0 in normalised units: where the target's
    # location is its lower bound (`targets.Target.location`, `dataset.TargetStats`)
    bounded = with_target and TARGETS[target].location == BOUND
    positive = dict(positive_surf_vars=(target,), clamp_at_first_step=clamp) if bounded else {}
    kwargs = dict(surf_vars=surf_vars, surf_stats=surf_stats, use_lora=False, **positive)
    if spec.aurora_class == "Aurora":  # the demo: Aurora's own class at the demo's size
        kwargs["timestep"] = timedelta(hours=6)
    kwargs |= spec.arch | dict(arch)
    try:
        model = getattr(aurora, spec.aurora_class)(**kwargs)
        model.target_name = target if with_target else None
        return model
    except (TypeError, ValueError, AssertionError) as e:
        raise AuroraSweepError(
            f"cannot build the {base} base with [model.arch.{base}] {dict(arch)} ({e}): give "
            "arguments of its Aurora class, e.g. embed_dim = 128"
        ) from None


def _build_own_precipitation(base: str, target: str, *, clamp: bool, arch: tuple) -> Aurora:
    """A base that predicts precipitation itself (Aurora 1.5), as a 6-hour step whose `target` is
    the sum (tp) or mean (pr) of its hourly output (`hourly.SixHourAurora15`): with its own
    variables and clipping, its hours clamped at 0 as an added target is (by the model itself:
    Aurora's `positive_surf_vars` would drop the output-only variables from its output), and no
    autocast until `set_precision` says so (its own default is fp16 everywhere; a trial's precision
    is the backbone's, as for every base)."""
    from aurora_sweep.model.aurora15 import SixHourAurora15

    if not TARGETS[target].from_hourly_precipitation:
        raise AuroraSweepError(
            f"the {base} base forecasts its own precipitation: predict tp or pr with it, "
            f"not {target}"
        )
    spec = BASES[base]
    kwargs = (
        dict(
            clamp_at_first_step=clamp,
            autocast=False,
            use_lora=False,
        )
        | spec.arch
        | dict(arch)
    )
    try:
        return SixHourAurora15(target=target, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise AuroraSweepError(
            f"cannot build the {base} base with [model.arch.{base}] {dict(arch)} ({e}): give "
            "arguments of its Aurora class, e.g. embed_dim = 128"
        ) from None


def target_var(model: Aurora) -> str:
    """The surface variable whose head a trial trains: the target, added to the base, or the
    base's own hourly precipitation (Aurora 1.5's `scaled_tp_1h`)."""
    return getattr(model, "head", None) or model.target_name


def added_target(model: Aurora) -> str | None:
    """The target variable added to the base (None: the base predicts it itself, or the model
    is the base alone)."""
    name = getattr(model, "target_name", None)
    return name if name in getattr(model, "surf_vars", ()) else None


def input_embedding(model: Aurora) -> str:
    """The name of the target variable's input patch embedding (in the encoder)."""
    return f"encoder.surf_token_embeds.weights.{target_var(model)}"


def target_keys(model: Aurora) -> set[str]:
    """Parameter names of the target variable's own embedding and head."""
    name = target_var(model)
    return {k for k, _ in model.named_parameters() if k.endswith(f".{name}") or f".{name}." in k}


@contextmanager
def clamped(model) -> Iterator[None]:
    """The target clamped at 0 on the first step while scoring or forecasting (Aurora's
    `clamp_at_first_step`, which its docstring keeps for inference), restored afterwards."""
    aurora = unwrap(model)
    before = aurora.clamp_at_first_step
    aurora.clamp_at_first_step = True
    try:
        yield
    finally:
        aurora.clamp_at_first_step = before


@contextmanager
def merged_adapter(model) -> Iterator[None]:
    """A peft model's adapters merged into the weights they adapt while scoring, unmerged after.

    Scoring needs no separate adapter path: a merged forward pass is the base model's. For DoRA,
    whose every forward pass rebuilds each adapted weight to take its norm, merging made a demo
    trial's verification 1.3 s (20 %) faster; for LoRA 4 %. Unmerging subtracts what merging
    added, so the adapted weights come back to within float rounding (about 1e-7 relative); the
    adapter's own weights are not touched. Other models (head, blocks, full) pass through.
    """
    if not hasattr(model, "merge_adapter") or not _adapted_layers(model):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def _adapted_layers(model) -> bool:
    """Whether `model` holds unmerged peft adapter layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and not m.merged for m in model.modules())


def _no_wrap(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, "warped": False}


def set_longitude_wrap(model: Aurora, wrap: bool) -> None:
    """Whether the backbone's shifted windows join the grid's east and west edges.

    Aurora's `Swin3DTransformerBlock` takes `warped` (default True: the left and right sides of
    the image are connected) and its layers never pass it, which is right for a global grid
    only: on a regional box, tokens at its east edge would share windows with tokens at its west
    edge. With `wrap=False` every block gets `warped=False` through a forward pre-hook (it
    survives activation checkpointing, which calls the block itself).
    """
    from aurora.model.swin3d import Swin3DTransformerBlock

    if wrap:
        return
    for m in model.modules():
        if isinstance(m, Swin3DTransformerBlock) and not getattr(m, "_aurora_sweep_no_wrap", 0):
            m.register_forward_pre_hook(_no_wrap, with_kwargs=True)
            m._aurora_sweep_no_wrap = True


def new_variable_keys(model: Aurora) -> set[str]:
    """Parameter names that exist only because the target was added (none in a base with its
    own precipitation)."""
    return target_keys(model) if added_target(model) else set()


def load_base_checkpoint(model: Aurora, path: Path) -> None:
    """Load pretrained weights; only the new variable's keys may be missing.

    Follows `Aurora.load_checkpoint_local` (the checkpoint adapters, history-size check) but
    checks the `strict=False` result instead of ignoring it.
    """
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AuroraSweepError(f"{path} is not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(d, dict):
        raise AuroraSweepError(f"{path} does not hold a state dict of Aurora weights")
    d = model._adapt_checkpoint(d)
    if "encoder.surf_token_embeds.weights.2t" not in d:
        raise AuroraSweepError(f"{path} does not hold Aurora weights (no 2t patch embedding)")
    history = d["encoder.surf_token_embeds.weights.2t"].shape[2]
    if model.max_history_size > history:
        model.adapt_checkpoint_max_history_size(d)
    try:
        result = model.load_state_dict(d, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise AuroraSweepError(
            f"{path} does not fit this architecture: {str(e).splitlines()[1].strip()}"
        ) from None
    allowed = new_variable_keys(model)
    missing = set(result.missing_keys) - allowed
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {sorted(missing)[:3]}{'...' if len(missing) > 3 else ''}")
        if result.unexpected_keys:
            parts.append(f"unexpected {sorted(result.unexpected_keys)[:3]}")
        raise AuroraSweepError(f"{path} does not match the base model: {'; '.join(parts)}")


def init_new_variable(model: Aurora, *, start: float = 0.0) -> None:
    """Start the target's patch embedding and head at zero, the head's bias at `start`.

    The pretrained model then behaves exactly as before (the target adds nothing to the latent
    state) and
    predicts `start` (normalised units: the train-split mean over the scale) everywhere; training
    moves it from there, instead of from random weights that would first have to be unlearned.
    """
    name = added_target(model)
    if name is None:  # a base's own precipitation head stays as pretrained
        return
    with torch.no_grad():
        for key in new_variable_keys(model):
            model.get_parameter(key).zero_()
        model.decoder.surf_heads[name].bias.fill_(start)


def lora_target_regex(targets: str) -> str:
    """peft `target_modules` regex for '+'-joined Swin linear names, backbone only."""
    names = "|".join(targets.split("+"))
    return rf"backbone\..*\.({names})"


def apply_lora(
    model: Aurora, *, rank: int, targets: str, alpha: float | None = None, variant: str = "lora"
):
    """Wrap `model` in a peft LoRA model (all base weights frozen).

    `variant`: "lora", "rslora" (scaling alpha/sqrt(rank) instead of alpha/rank) or "dora"
    (weight-decomposed: a trained magnitude per output feature besides the low-rank update).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else LORA_ALPHA,
        target_modules=lora_target_regex(targets),
        lora_dropout=0.0,
        bias="none",
        use_rslora=variant == "rslora",
        use_dora=variant == "dora",
    )
    return get_peft_model(model, config)


def apply_method(
    model: Aurora,
    *,
    method: str,
    rank: int,
    targets: str,
    unfrozen_blocks: int,
    train_input: bool = True,
) -> tuple[torch.nn.Module, TrainableParts]:
    """Make `model` trainable as `method` says: the model to train (a peft wrapper for the LoRA
    methods, `model` itself otherwise) and the names of what trains (`train_input`: the target's
    input patch embedding too; without it the target is output-only)."""
    if method not in METHODS:
        raise AuroraSweepError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    trained = model
    if method in LORA_METHODS:
        trained = apply_lora(model, rank=rank, targets=targets, variant=method)
    parts = set_trainable(
        model, unfrozen_blocks=unfrozen_blocks, method=method, train_input=train_input
    )
    return trained, parts


def backbone_blocks(model: Aurora) -> list[tuple[str, torch.nn.Module]]:
    """Swin blocks in forward order (encoder stages, then decoder stages), with their names."""
    blocks = []
    for part in ("encoder_layers", "decoder_layers"):
        for i, layer in enumerate(getattr(model.backbone, part)):
            for j, block in enumerate(layer.blocks):
                blocks.append((f"backbone.{part}.{i}.blocks.{j}", block))
    return blocks


def set_trainable(
    model: Aurora, *, unfrozen_blocks: int, method: str = "lora", train_input: bool = True
) -> TrainableParts:
    """Freeze all but LoRA, the target's embedding and head, and the last `unfrozen_blocks`
    blocks; with `method` "head", the decoder instead of blocks; with "full", nothing frozen.

    With every variable in the loss the whole decoder is on the loss's path, so `head` trains
    what gets a gradient. `train_input=False` leaves the target's input embedding at zero (still
    listed in `new_variable`, which is saved): the target is then output-only, as in Aurora 1.5,
    and the backbone sees exactly the inputs it was pretrained on. For Aurora 1.5 `new_variable`
    is its own hourly precipitation's embedding and head, the embedding never trained (its input
    is always zero: output-only).
    """
    if method in ("head", "full"):
        unfrozen_blocks = 0
    blocks = backbone_blocks(model)
    if unfrozen_blocks > len(blocks):
        raise AuroraSweepError(
            f"unfrozen_blocks = {unfrozen_blocks} but the backbone has only {len(blocks)} blocks"
        )
    unfrozen = {name for name, _ in blocks[len(blocks) - unfrozen_blocks :]}
    new_keys = target_keys(model)
    embedding = input_embedding(model)
    train_input = train_input and target_var(model) not in model.output_only_surf_vars
    lora, new_var, block_params, modules = [], [], [], []
    for name, p in model.named_parameters():
        plain = name.replace(WRAPPED, "")
        if "lora_" in name:
            p.requires_grad_(True)
            lora.append(name)
        elif name in new_keys:
            p.requires_grad_(train_input or plain != embedding)
            new_var.append(name)
        elif any(name.startswith(b + ".") for b in unfrozen):
            p.requires_grad_(True)
            block_params.append(name)
        elif method == "full" or (method == "head" and plain.startswith("decoder.")):
            p.requires_grad_(True)
            modules.append(name)
        else:
            p.requires_grad_(False)
    return TrainableParts(tuple(lora), tuple(new_var), tuple(block_params), tuple(modules))


def set_precision(model: Aurora, precision: str) -> None:
    """fp32, or bf16/fp16 autocast of the backbone (Aurora's own mechanism)."""
    if precision == "fp32":
        model.autocast_backbone = False
        return
    if precision == "fp16" and not torch.cuda.is_available():
        raise AuroraSweepError("fp16 training needs a CUDA GPU; use fp32 or bf16 on a CPU")
    model.autocast_backbone = True
    model.autocast_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16":
        from aurora.model.perceiver import PerceiverAttention
        from aurora.model.swin3d import WindowAttention

        for m in model.modules():
            if isinstance(m, (WindowAttention, PerceiverAttention)):
                m.use_fp16_safe_attention = True


def unwrap(model) -> Aurora:
    """The Aurora module inside a peft wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model
