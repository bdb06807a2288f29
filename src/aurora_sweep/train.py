"""One trial: build the model from a `TrialConfig`, fine-tune it, score it.

The loop is written out: sample a batch, forward, Aurora's loss over every variable (`loss`),
backward, gradients clipped, AdamW step, learning rate warmed up then decayed along a cosine.
Every `eval_every` steps the model forecasts a fixed subset of the validation split
(`val_samples` samples): the validation loss (the same loss, and each variable's term) is
logged, and the study's objective on that subset, in its own units, is reported to the pruner,
so a pruned trial's stored value means what a completed trial's does. At the end the model
forecasts the whole validation split and is scored against persistence and climatology
(`evaluation.verify`); the last validation loss is the one of that whole split.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from aurora_sweep.config import Period, StudyConfig
from aurora_sweep.dataset import (
    Samples,
    TpStats,
    climatology,
    complete_train_tp,
    fits_in_memory,
    in_period,
    tp_stats,
)
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.loss import LossSpec, combine, loss_terms
from aurora_sweep.model import (
    INPUT_EMBEDDING,
    TrainableParts,
    apply_method,
    build_base,
    init_new_variable,
    load_base_checkpoint,
    set_longitude_wrap,
    set_precision,
)
from aurora_sweep.recipe import FULL_NEW_VARIABLE_LR, LEADS, TrialConfig
from aurora_sweep.seeps import DRY_MM_BY_LEAD, SeepsClimate, seeps_climate

#: Learning-rate multiplier for the new variable's head.
NEW_VARIABLE_LR_FACTOR = 5.0
#: The learning-rate schedule: a linear warm-up over this share of the steps (at least one),
#: then a cosine decay to `FINAL_LR_FACTOR` of the peak at the last step.
WARMUP_SHARE, FINAL_LR_FACTOR = 0.1, 0.1
#: The start times (UTC) the 12- and 24-hour scores are made from: WeatherBench 2 scores its
#: forecasts from the 00 and 12 UTC initialisations (the 6-hour scores use every start).
LONG_LEAD_INITS = (0, 12)
#: Gradients are clipped to this global norm (over every trained tensor).
MAX_GRAD_NORM = 1.0


@dataclass
class TrialData:
    """What every trial of a study shares: the splits, tp's statistics and the baselines."""

    train: Samples
    validation: Samples  # the evaluation split (validation during the search)
    tp: TpStats
    climatology: np.ndarray  # (month, hour, lat, lon), mm per 6 h
    seeps: SeepsClimate
    objective: str
    #: the untouched base model's MSE per variable on the evaluation split (forgetting ratios),
    #: by precision, then by lead ('6h', '12h', '24h'): a trial is compared with the base run in
    #: its own precision, at each lead it is scored at
    base_mse: dict[str, dict[str, dict[str, float]]] | None = None
    #: the evaluation split's samples and SEEPS climate at each lead scored, by model steps
    #: (1: `validation` and `seeps`); a lead the split is too short for is left out
    leads: dict[int, Samples] = field(default_factory=dict)
    lead_seeps: dict[int, SeepsClimate] = field(default_factory=dict)
    #: the lead the objective is scored at (model steps)
    objective_steps: int = 1
    #: training samples by rollout length, made when a trial first asks
    _train_by_steps: dict[int, Samples] = field(default_factory=dict, repr=False)
    #: the baselines' scores at each lead, computed with the first trial's (`metrics.tp_scores`)
    baseline_scores: dict[int, dict] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.leads = self.leads or {1: self.validation}
        self.lead_seeps = self.lead_seeps or {1: self.seeps}

    def train_for(self, steps: int) -> Samples:
        """The train split's samples for a rollout of `steps` model steps."""
        if steps not in self._train_by_steps:
            samples = self.train.at_lead(steps)
            if samples is None:
                raise AuroraSweepError(
                    f"the train split holds no {LEADS[steps]} sample ({steps} consecutive 6-hour "
                    "steps after two input times): use shorter [search] rollout_steps"
                )
            self._train_by_steps[steps] = samples
        return self._train_by_steps[steps]

    @classmethod
    def prepare(cls, cube, config: StudyConfig, *, eval_split: str = "validation") -> TrialData:
        # in memory when it fits (read once, shared by both splits), else read from the store
        in_memory = fits_in_memory(cube.nbytes)
        if in_memory:
            cube = cube.load()
        train = Samples(cube, config.data, "train", in_memory=in_memory)
        period = config.data.train
        # the train split's tp, read once for its statistics and both climatologies
        tp = train.cube[["tp"]].sel(time=in_period(train.cube["time"].values, period)).load()
        validation = Samples(cube, config.data, eval_split, in_memory=in_memory)
        # the longer leads from the 00 and 12 UTC starts, as WeatherBench 2 scores them
        leads = {k: validation.at_lead(k, init_hours=LONG_LEAD_INITS) for k in LEADS if k > 1}
        leads = {1: validation, **leads}
        leads = {k: v for k, v in leads.items() if v is not None}
        if config.lead_steps not in leads:
            raise AuroraSweepError(
                f"the {eval_split} split holds no {LEADS[config.lead_steps]} sample to score the "
                "objective at: use a shorter [study] lead, or a split with runs of consecutive days"
            )
        lead_seeps = {k: train_seeps_climate(tp, period, steps=k) for k in leads}
        return cls(
            train=train,
            validation=validation,
            tp=tp_stats(tp, period),
            climatology=climatology(tp, period),
            seeps=lead_seeps[1],
            objective=config.objective,
            leads=leads,
            lead_seeps=lead_seeps,
            objective_steps=config.lead_steps,
        )

    @property
    def scored(self) -> Samples:
        """The evaluation samples at the objective's lead."""
        return self.leads[self.objective_steps]


def pushforward(model, batch, steps: int):
    """The input of the last step of a `steps`-step rollout from `batch`: the first `steps` - 1
    steps run without gradients, each forecast fed back as the next input (Aurora's rollout).

    This is the scheme Aurora's maintainers describe for their rollout fine-tuning (a replay of
    the model's own forecasts, gradients through the last step only): the model learns to
    forecast from the states it will itself produce at longer leads, at the memory of one
    training step. Gradients through every step would multiply the activations kept by the
    number of steps, which is what the small GPUs we serve cannot afford.
    """
    if steps == 1:
        return batch
    from aurora import rollout
    from aurora.rollout import _advance_batch  # how `rollout` feeds a forecast back

    from aurora_sweep.model import unwrap

    aurora = unwrap(model)
    with torch.no_grad():
        for pred in rollout(aurora, batch, steps=steps - 1):
            batch = _advance_batch(batch, aurora.apply_rollout_input_clipping(pred))
    # Aurora clamps tp's output from its second rollout step on: the loss must see the raw one
    return dataclasses.replace(batch, metadata=dataclasses.replace(batch.metadata, rollout_step=0))


def learning_rate_factor(step: int, steps: int) -> float:
    """The share of the peak learning rate at `step` (1-based) of `steps`: a linear warm-up over
    the first `WARMUP_SHARE` of the steps, then a cosine decay to `FINAL_LR_FACTOR` at the last.

    A constant rate lets fast starters win the pruner's early comparisons; Aurora's fine-tuning
    guide samples a constant rate, so warm-up and decay are our choice (a common one).
    """
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step <= warmup:
        return step / warmup
    if steps <= warmup:
        return 1.0
    progress = (step - warmup) / (steps - warmup)
    return FINAL_LR_FACTOR + (1 - FINAL_LR_FACTOR) * 0.5 * (1 + np.cos(np.pi * progress))


def loss_spec(trial: TrialConfig, data: TrialData) -> LossSpec:
    """The trial's loss settings on the grid it trains on."""
    return LossSpec(
        levels=trial.levels, lat=data.train.cube["latitude"].values, tp_scale=data.tp.scale,
        target_weight=trial.target_weight, tp_loss=trial.loss,
    )  # fmt: skip


def train_seeps_climate(cube, train: Period, steps: int = 1) -> SeepsClimate:
    """SEEPS's dry probability and light/heavy threshold by month and hour of day, from the
    train split's totals over `steps` 6-hour windows (with that lead's dry threshold)."""
    values, times = complete_train_tp(cube, train)
    if steps > 1:  # totals over `steps` consecutive 6-hour windows, at the last one's time
        ends = np.arange(steps - 1, len(times))
        span = times.values[ends] - times.values[ends - steps + 1]
        ends = ends[span == np.timedelta64(6 * (steps - 1), "h")]
        values = np.stack([values[ends - k] for k in range(steps)]).sum(axis=0)
        times = times[ends]
    dry = DRY_MM_BY_LEAD[6 * steps]
    return seeps_climate(values, times.month.values, times.hour.values, dry_threshold=dry)


@dataclass
class TrialResult:
    """What one fine-tune produced."""

    train_loss: list[tuple[int, float]]
    val_loss: list[tuple[int, float]]
    #: each variable's term of the validation loss, by step (`val_loss_<var>` in MLflow)
    val_terms: dict[str, list[tuple[int, float]]]
    intermediate: list[tuple[int, float]]  # the objective on the pruner's subset, by step
    metrics: dict[str, float]
    peak_memory_mb: float
    peak_reserved_mb: float | None
    seconds: float
    #: the share of the training loop's wall time spent waiting for a batch
    loader_wait_fraction: float
    model: Any = field(repr=False)
    parts: TrainableParts = field(repr=False)
    forecasts: Any = field(default=None, repr=False)  # evaluation.Forecasts of the eval split


class PeakMemory:
    """Peak memory of a trial: CUDA peak allocated, or on a CPU the peak resident set size.

    On Linux the kernel keeps the process's peak RSS (VmHWM), and writing 5 to
    /proc/self/clear_refs resets it: the trial's peak is read once at the end, exactly, with no
    thread. Elsewhere (or where that file cannot be written) a thread samples the RSS every
    20 ms; its wake-ups take the GIL from the training loop (8 % of a demo trial's time).
    """

    CLEAR_REFS = Path("/proc/self/clear_refs")
    STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.reserved: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel_peak = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        proc = psutil.Process()
        self.peak = proc.memory_info().rss
        self._kernel_peak = self._reset_kernel_peak()
        if not self._kernel_peak:

            def sample() -> None:
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
            return
        self._stop.set()
        if self._thread:
            self._thread.join()
        kernel = self._read_kernel_peak() if self._kernel_peak else None
        self.peak = max(self.peak, kernel or 0, psutil.Process().memory_info().rss)

    def _reset_kernel_peak(self) -> bool:
        try:
            self.CLEAR_REFS.write_text("5")
        except OSError:  # not Linux, or a kernel or sandbox that refuses it
            return False
        return self._read_kernel_peak() is not None

    def _read_kernel_peak(self) -> int | None:
        try:
            for line in self.STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            return None
        return None

    @property
    def megabytes(self) -> float:
        return self.peak / 2**20


class Prefetcher:
    """Makes `read(indices)` for each entry of `plan`, in order, a few ahead of the consumer in a
    thread: reading from the store (file reads and copies, which release the GIL) overlaps the
    training step. An error in the reader is raised by `next`."""

    def __init__(self, read: Callable[[Any], Any], plan: list, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(read, plan), name="prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, read: Callable[[Any], Any], plan: list) -> None:
        for item in plan:
            try:
                value = (True, read(item))
            except BaseException as e:  # noqa: BLE001 - raised in the consumer
                value = (False, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(value, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or not value[0]:
                return

    def next(self) -> Any:
        ok, value = self._queue.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_trial_model(trial: TrialConfig, tp: TpStats, checkpoint: Path):
    """Base model with tp, pretrained weights, LoRA, freezing and precision, as `trial` says."""
    torch.manual_seed(trial.seed)
    model = build_base(trial.base, tp_stats=(tp.location, tp.scale))
    load_base_checkpoint(model, checkpoint)
    init_new_variable(model, start=(tp.mean - tp.location) / tp.scale)
    peft_model, parts = apply_method(
        model, method=trial.method, rank=trial.lora_rank, targets=trial.lora_targets,
        unfrozen_blocks=trial.unfrozen_blocks, train_input=trial.target_input_lr > 0,
    )  # fmt: skip
    set_precision(model, trial.precision)
    set_longitude_wrap(model, trial.wrap_longitude)
    return peft_model, model, parts


def input_lr(trial: TrialConfig) -> float:
    """The learning rate of tp's input embedding: `target_input_lr` times the trial's rate."""
    return trial.learning_rate * trial.target_input_lr


def new_variable_lr(trial: TrialConfig) -> float:
    """tp's embedding and head start from zero and must learn the most: a larger step."""
    if trial.method == "full":
        return FULL_NEW_VARIABLE_LR
    return trial.learning_rate * NEW_VARIABLE_LR_FACTOR


def eval_indices(n: int, limit: int) -> np.ndarray:
    """Evenly spaced sample indices: the same subset every time for the same n and limit."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def fit(
    trial: TrialConfig,
    data: TrialData,
    *,
    checkpoint: Path,
    report: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    device: torch.device | None = None,
    bootstrap: int = 1000,
) -> TrialResult:
    """Fine-tune one trial. `report(step, objective)` may raise `optuna.TrialPruned`."""
    from aurora_sweep.evaluation import eval_batch_size, forecast, subset_objective, verify

    device = device or default_device()
    started = time.perf_counter()
    spec = loss_spec(trial, data)
    with PeakMemory(device) as memory:
        peft_model, model, parts = build_trial_model(trial, data.tp, checkpoint)
        if trial.activation_checkpointing:
            model.configure_activation_checkpointing()
        peft_model.to(device)
        # tp's head starts from zero and must learn the most: a larger step for it; its input
        # embedding writes into Aurora's latent state: a step of its own (none: output-only)
        embedding = model.get_parameter(INPUT_EMBEDDING)
        head = [model.get_parameter(k) for k in parts.new_variable]
        head = [p for p in head if p is not embedding]
        new_ids = {id(p) for p in (*head, embedding)}
        rest = [p for p in peft_model.parameters() if p.requires_grad and id(p) not in new_ids]
        groups = [{"params": rest}, {"params": head, "lr": new_variable_lr(trial)}]
        if embedding.requires_grad:
            groups.append({"params": [embedding], "lr": input_lr(trial)})
        optimiser = torch.optim.AdamW(
            groups, lr=trial.learning_rate, weight_decay=trial.weight_decay
        )
        # LambdaLR calls the factor once at construction (step 0), then after each step
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda k: learning_rate_factor(k + 1, trial.steps)
        )
        trained = [p for group in groups for p in group["params"]]
        scaler = torch.amp.GradScaler("cuda") if trial.precision == "fp16" else None
        rng = np.random.default_rng(trial.seed)
        # the pruner's subset: fixed, so every trial's intermediate values are comparable (the
        # validation loss on the 6-hour samples, the objective at the study's lead)
        val_idx = eval_indices(len(data.validation), trial.val_samples)
        scored_idx = eval_indices(len(data.scored), trial.val_samples)
        train = data.train_for(trial.rollout_steps)
        eval_batch = eval_batch_size(trial.batch_size, device)
        train_loss: list[tuple[int, float]] = []
        val_loss: list[tuple[int, float]] = []
        val_terms: dict[str, list[tuple[int, float]]] = {k: [] for k in spec.variables}
        intermediate: list[tuple[int, float]] = []

        def log_validation(step: int, result) -> None:
            val_loss.append((step, float(combine(spec, result.loss_terms))))
            for k, v in result.loss_terms.items():
                val_terms[k].append((step, v))

        peft_model.train()
        # the batches in the order the seed gives, read ahead by a thread while the model trains
        plan = [
            rng.choice(len(train), size=min(trial.batch_size, len(train)), replace=False)
            for _ in range(trial.steps)
        ]
        with Prefetcher(train.training_batch, plan) as batches:
            waited, loop_started = 0.0, time.perf_counter()
            for step in range(1, trial.steps + 1):
                asked = time.perf_counter()
                batch, target = batches.next()
                waited += time.perf_counter() - asked
                # the raw output: tp is not clamped at 0 while training (model.clamped)
                pred = peft_model(pushforward(peft_model, batch.to(device), trial.rollout_steps))
                loss = combine(spec, loss_terms(spec, pred, target))
                optimiser.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimiser)
                    torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)
                    scaler.step(optimiser)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(trained, MAX_GRAD_NORM)
                    optimiser.step()
                schedule.step()
                value = float(loss.detach())
                if not np.isfinite(value):
                    raise FloatingPointError(f"training loss became {value} at step {step}")
                train_loss.append((step, value))
                if on_step:
                    on_step(step, value)
                # the last step is scored on the whole split below: the pruner cannot act on it
                if step % trial.eval_every == 0 and step < trial.steps:
                    result = forecast(
                        peft_model, data.validation, val_idx, batch_size=eval_batch, device=device,
                        state=False, loss=spec,
                    )  # fmt: skip
                    log_validation(step, result)
                    if data.objective_steps != 1:  # the objective's lead: a rollout
                        result = forecast(
                            peft_model, data.scored, scored_idx, batch_size=eval_batch,
                            device=device, state=False,
                        )  # fmt: skip
                    objective = subset_objective(result.tp, data, scored_idx)
                    intermediate.append((step, objective))
                    if report:
                        report(step, objective)
        loop_seconds = time.perf_counter() - loop_started
        metrics, forecasts = verify(
            peft_model, data, batch_size=eval_batch, device=device, bootstrap=bootstrap,
            precision=trial.precision, loss=spec,
        )  # fmt: skip
        log_validation(trial.steps, forecasts)
    return TrialResult(
        train_loss=train_loss,
        val_loss=val_loss,
        val_terms=val_terms,
        intermediate=intermediate,
        metrics=metrics,
        peak_memory_mb=memory.megabytes,
        peak_reserved_mb=memory.reserved / 2**20 if memory.reserved is not None else None,
        seconds=time.perf_counter() - started,
        loader_wait_fraction=waited / loop_seconds if loop_seconds > 0 else 0.0,
        model=peft_model,
        parts=parts,
        forecasts=forecasts,
    )
