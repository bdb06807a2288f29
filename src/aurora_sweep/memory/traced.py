"""A trial's peak memory from one training step run on fake tensors: exact, at any size.

`traced_peak` builds the trial's exact model (base, method, freezing, precision, checkpointing)
and runs one of its training steps (rollout, micro-batch, tile, Aurora's loss, backward,
clipping, the optimiser) under PyTorch's `FakeTensorMode`: every tensor has a shape, a dtype and
a device but no storage, so a step of any base on any grid takes seconds and no memory. A
dispatch mode counts the bytes of every storage alive, rounded as the CUDA caching allocator
rounds them, from its allocation until Python frees it, and keeps the peak. What is alive when
a step starts is there too: the weights, the optimiser's state (made by a step on zero
gradients), the batch, and for the last of several accumulated micro-batches the gradients.

Fake tensors live on the CPU device: the autograd engine runs backward there (on a fake CUDA
device it asks the driver for a stream). The CPU step saves what a CUDA step saves: attention
runs PyTorch's flash kernel for the CPU, which like CUDA's flash and memory-efficient kernels
keeps the output and a log-sum-exp for backward, not the attention matrix; autocast's CPU op
lists cast the same linears and matrix products to bf16 as CUDA's. For "cuda" the optimiser
runs its `foreach` implementation, CUDA's default, whose temporaries span every trained tensor
at once. What no trace sees (the CUDA context, cuBLAS workspaces, the allocator's
fragmentation) stays an allowance in `memory`.

Aurora reads a few values during a step (range checks of its position encodings and metadata,
the lead time of the output's timestamp): a fake tensor has none, so the trace answers such
reads with 1 (True), which passes every check and changes no shape.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
import threading
import weakref
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from aurora_sweep.config.bases import reads_v15_inputs
from aurora_sweep.config.recipe import TrialConfig
from aurora_sweep.config.targets import DEFAULT
from aurora_sweep.data.store import ATMOS_VARS, AURORA_STATIC, surface_vars

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from aurora import Batch

#: The CUDA caching allocator hands out blocks in multiples of 512 bytes.
CUDA_BLOCK_BYTES = 512
_LOCK = threading.Lock()


class TraceFailed(RuntimeError):
    """The step could not run on fake tensors (an operation without a fake kernel)."""


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages (each once, views included) and their peak,
    by tag: what exists when a tag is set belongs to it until freed."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.block = block
        self.live = 0
        self.peak = 0
        self.by_tag: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}
        self.tag = "weights"
        self._seen: set[int] = set()

    def reset_peak(self) -> None:
        self.peak = self.live
        self.at_peak = dict(self.by_tag)

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._seen:
            return
        size = st.nbytes()
        if self.block > 1:
            size = math.ceil(size / self.block) * self.block
        self._seen.add(key)
        tag = self.tag
        self.live += size
        self.by_tag[tag] = self.by_tag.get(tag, 0) + size
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = dict(self.by_tag)
        weakref.finalize(st, self._free, key, size, tag)

    def _free(self, key: int, size: int, tag: str) -> None:
        self._seen.discard(key)
        self.live -= size
        self.by_tag[tag] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is torch.ops.aten._local_scalar_dense.default:
            (t,) = args
            return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@contextmanager
def _clear_mask_cache() -> Iterator[None]:
    """Aurora caches its shifted-window masks by shape and device: a mask made on fake tensors
    must not outlive the trace (a real step on the CPU would find it)."""
    from aurora.model.swin3d import compute_3d_shifted_window_mask

    compute_3d_shifted_window_mask.cache_clear()
    try:
        yield
    finally:
        compute_3d_shifted_window_mask.cache_clear()


def _fake_parameters(model: torch.nn.Module) -> None:
    """Replace every parameter and buffer of `model` (on the meta device) by a CPU tensor of the
    same shape and dtype (fake under `FakeTensorMode`, zeros outside it); tied ones stay tied."""
    done: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu").zero_()
            if isinstance(t, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
            done[id(t)] = new
        return done[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = fake(p)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b)


@dataclasses.dataclass(frozen=True)
class TracedPeak:
    """The peak of a traced step in bytes, and what was alive at that moment."""

    total_bytes: int
    parts: dict[str, int]


def traced_peak(
    trial: TrialConfig, *, grid: tuple[int, int], levels: int, device: str = "cuda"
) -> TracedPeak:
    """The peak of live tensor bytes over one training step of `trial` on a `grid` (the tile
    when the trial trains on tiles) with `levels` pressure levels, traced on fake tensors.

    `device` "cuda" rounds storages as the caching allocator does and runs the optimiser as
    CUDA does (module docstring); "cpu" traces the CPU's own step. Raises
    `TraceFailed` where the step cannot run on fake tensors.
    """
    return _traced(_structure(trial), grid, levels, device)


def _structure(trial: TrialConfig) -> TrialConfig:
    """The fields a step's memory does not depend on, set to one value: trials that differ only
    in them share a trace."""
    return dataclasses.replace(
        trial,
        learning_rate=1e-4,
        steps=1,
        eval_every=1,
        val_samples=0,
        weight_decay=0.0,
        seed=0,
        target_weight=1.0,
        wrap_longitude=True,
        levels=(),  # their number is the key's
        target_input_lr=1.0 if trial.target_input_lr > 0 else 0.0,
        activation_checkpointing=bool(trial.checkpointed),
        checkpoint_modules=trial.checkpointed,
    )


@functools.lru_cache(maxsize=256)
def _traced(trial: TrialConfig, grid: tuple[int, int], levels: int, device: str) -> TracedPeak:
    from torch.utils.checkpoint import CheckpointError

    with _LOCK:  # Aurora's mask cache is the process's; one trace at a time
        try:
            return _trace(trial, grid, levels, device, reuse=True)
        except CheckpointError:
            # fake tensors reused across calls can make a checkpointed unit's recomputation
            # save fewer tensors than its forward did; without the reuse it does not
            return _trace(trial, grid, levels, device, reuse=False)


def _trace(
    trial: TrialConfig,
    grid: tuple[int, int],
    levels: int,
    device: str,
    *,
    reuse: bool,
    run: Callable[..., None] | None = None,
) -> TracedPeak:
    """The peak of live bytes while `run` (default `_run_step`: a training step) runs `trial`'s
    model, built on the meta device, on fake tensors; the caller holds `_LOCK`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.checkpoint import CheckpointError

    from aurora_sweep.memory.meta_model import build_meta_model

    cuda = device.startswith("cuda")
    model = build_meta_model(trial)  # on the meta device; LoRA's layers sit in the model
    counter = _LiveBytes(CUDA_BLOCK_BYTES if cuda else 1)
    try:
        with ExitStack() as stack:
            stack.enter_context(_clear_mask_cache())
            fake = stack.enter_context(FakeTensorMode())
            fake.cache_enabled = reuse
            stack.enter_context(counter)
            (run or _run_step)(model, trial, grid=grid, levels=levels, cuda=cuda, counter=counter)
    except CheckpointError:
        if reuse:
            raise
        raise TraceFailed(
            "activation checkpointing's recomputation differs on fake tensors"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure of the trace falls back to the fit
        raise TraceFailed(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    return TracedPeak(total_bytes=counter.peak, parts=dict(counter.at_peak))


def _run_step(
    model: torch.nn.Module,
    trial: TrialConfig,
    *,
    grid: tuple[int, int],
    levels: int,
    cuda: bool,
    counter: _LiveBytes,
) -> None:
    """One training step as `train._Step` runs it, with what is alive when it starts: the
    optimiser's state (`trained_state`) and, for the last of several micro-batches, the
    gradients of the ones before."""
    from aurora_sweep.model.loss import combine, loss_terms
    from aurora_sweep.train.fit import MAX_GRAD_NORM, pushforward

    params, optimiser = trained_state(model, trial, cuda=cuda, counter=counter)
    if trial.checkpointed:
        model.configure_activation_checkpointing(trial.checkpointed)
    counter.tag = "inputs"
    batch, target, spec = synthetic_sample(trial, grid, levels)
    counter.tag = "gradients"
    if trial.accumulate > 1:
        for p in params:
            p.grad = torch.zeros_like(p)
    counter.tag = "activations"  # with their gradients, temporaries and recomputation
    counter.reset_peak()
    start = pushforward(model, batch, trial.rollout_steps)
    loss = combine(spec, loss_terms(spec, model(start), target)) / trial.accumulate
    loss.backward()
    del loss, start
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=cuda or None)
    optimiser.step()


def trained_state(model: torch.nn.Module, trial: TrialConfig, *, cuda: bool, counter: _LiveBytes):
    """What a trial keeps between steps, on fake tensors: its weights in its precision and its
    optimiser's state, made by a step on zero gradients (tagged "weights", "optimizer"). Returns
    (the trained parameters, the optimiser)."""
    from aurora_sweep.model.build import set_precision
    from aurora_sweep.train.optimiser import new_optimiser

    _fake_parameters(model)
    set_precision(model, "bf16" if trial.precision == "fp16" else trial.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = new_optimiser(
        trial.optimizer, params, lr=1e-4, **({"foreach": True} if cuda else {})
    )
    counter.tag = "optimizer"
    for p in params:
        p.grad = torch.zeros_like(p)
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return params, optimiser


def synthetic_sample(trial: TrialConfig, grid: tuple[int, int], levels: int):
    """A batch of the trial's shapes, its truth and the trial's loss settings (the values do
    not matter): (batch, target, `loss.LossSpec`)."""
    import numpy as np

    from aurora_sweep.model.loss import LossSpec

    level_values = tuple(range(100, 100 + 50 * levels, 50))
    v15 = reads_v15_inputs(trial.base)
    batch = synthetic_batch(
        batch_size=trial.batch_size, grid=grid, levels=level_values, v15=v15, arch=trial.arch
    )
    b, (h, w) = trial.batch_size, grid
    target = {k: torch.zeros(b, h, w) for k in (*surface_vars(v15), DEFAULT)}
    target |= {k: torch.zeros(b, levels, h, w) for k in ATMOS_VARS}
    spec = LossSpec(
        levels=(500,) * levels,
        lat=np.linspace(70, 30, h),
        target_scale=1.0,
        target_loss=trial.loss,
        surface=surface_vars(v15),
    )
    return batch, target, spec


def synthetic_batch(
    *,
    batch_size: int,
    grid: tuple[int, int],
    levels: tuple[int, ...],
    v15: bool = False,
    arch: tuple = (),
) -> Batch:
    """A random batch of the given shape, for measuring memory (values do not matter): a target
    (the default's name: the memory is that of any) among the surface variables, Aurora's static
    fields; with `v15`, Aurora 1.5's inputs and static fields (those `arch` gives it, or its
    own)."""
    from aurora import Batch, Metadata

    gen = torch.Generator().manual_seed(0)
    h, w = grid

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if v15:
        from aurora_sweep.model.aurora15 import static_names

        statics = static_names(arch)
    else:
        statics = tuple(AURORA_STATIC.values())
    return Batch(
        surf_vars={k: noise(batch_size, 2, h, w) for k in (*surface_vars(v15), DEFAULT)},
        static_vars={k: noise(h, w) for k in statics},
        atmos_vars={k: noise(batch_size, 2, len(levels), h, w) for k in ATMOS_VARS},
        metadata=Metadata(
            lat=torch.linspace(70.0, 70.0 - 0.25 * (h - 1), h, dtype=torch.float64),
            lon=torch.arange(w, dtype=torch.float64) * 0.25,
            time=(dt.datetime(2022, 1, 1, 6),) * batch_size,
            atmos_levels=tuple(levels),
        ),
    )
