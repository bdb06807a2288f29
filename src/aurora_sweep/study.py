"""The search: an Optuna study whose trials are fine-tunes, each tracked as an MLflow run.

`run_study` opens (or resumes) the study in its storage, runs trials until the study holds the
requested total, and records each one as a child run under one parent run per invocation. A
trial that fails is recorded and the study goes on. The objective is the study's `objective`
(SEEPS or RMSE of tp) on the whole validation split; the pruner sees the same score on a fixed
subset. The test split is never touched here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import math
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from aurora_sweep.config import LEADS, LORA_METHODS, StudyConfig, lead_suffix
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.evaluation import worst_forgetting
from aurora_sweep.processes import alive, this_process
from aurora_sweep.records import TrialRecord, write_scores
from aurora_sweep.train import FULL_LR, FULL_NEW_VARIABLE_LR, TrialConfig

#: The trials `--trials` counts: a failed or interrupted trial does not use up the total.
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
AURORA_PRETRAINING_END = dt.date(2022, 1, 1)
#: The study's user attribute with the base model's MSE per variable, by precision.
BASE_MSE = "base_mse_by_precision"
UI = "http://127.0.0.1:5000"


def sample_trial(trial: optuna.Trial, config: StudyConfig) -> TrialConfig:
    """Draw one trial's configuration from the study's search space.

    The space is conditional: the method comes first, and a parameter the method does not use
    is not sampled for it (no LoRA rank for `head`, `blocks` or `full`). `full` is Aurora's own
    recipe, whole: bf16 backbone autocast, activation checkpointing, its learning rates.
    """
    s = config.search
    reference = trial.user_attrs.get("reference")
    if reference == "full":  # Aurora's own recipe, as it is, whatever the space holds
        return reference_trial(config)
    method = trial.suggest_categorical("method", list(s.method))
    lora = method in LORA_METHODS
    rank = trial.suggest_categorical("lora_rank", list(s.lora_rank)) if lora else 0
    targets = trial.suggest_categorical("lora_targets", list(s.lora_targets)) if lora else ""
    if lora:
        unfrozen = trial.suggest_categorical("unfrozen_blocks", list(s.unfrozen_blocks))
    elif method == "blocks":
        unfrozen = trial.suggest_categorical("blocks", list(s.blocks))
    else:
        unfrozen = 0
    batch_size = trial.suggest_categorical("batch_size", list(s.batch_size))
    target_weight = trial.suggest_categorical("target_weight", list(s.target_weight))
    loss = trial.suggest_categorical("loss", list(s.loss))
    input_lr = trial.suggest_categorical("target_input_lr", list(s.target_input_lr))
    rollout = trial.suggest_categorical("rollout_steps", list(s.rollout_steps))
    if method == "full":
        precision, checkpointing, lr = _full_precision(config), True, FULL_LR
    else:
        precision = trial.suggest_categorical("precision", list(s.precision))
        checkpointing = trial.suggest_categorical(
            "activation_checkpointing", list(s.activation_checkpointing)
        )
        lr = (
            trial.suggest_float("learning_rate", *s.learning_rate, log=True)
            if s.learning_rate
            else config.train.learning_rate
        )
    return _trial_config(
        config, method=method, lora_rank=rank, lora_targets=targets, unfrozen_blocks=unfrozen,
        batch_size=batch_size, precision=precision, learning_rate=lr,
        activation_checkpointing=checkpointing, target_weight=target_weight, loss=loss,
        target_input_lr=input_lr, rollout_steps=rollout,
    )  # fmt: skip


def _trial_config(config: StudyConfig, **recipe: Any) -> TrialConfig:
    """A trial's config: the sampled `recipe` and what the study fixes for every trial."""
    return TrialConfig(
        **recipe,
        base=config.model.base,
        levels=config.data.levels,
        steps=config.train.steps,
        eval_every=config.train.eval_every,
        val_samples=config.train.val_samples,
        weight_decay=config.train.weight_decay,
        seed=config.train.seed,
        wrap_longitude=config.data.wrap_longitude,
    )


def _reference_loss(config: StudyConfig) -> dict[str, Any]:
    """The new variable's loss in the reference recipes: Aurora's (absolute error) at weight 1
    when the space has them, else the space's first choices."""
    s = config.search
    return {
        "target_weight": 1.0 if 1.0 in s.target_weight else s.target_weight[0],
        "loss": "mae" if "mae" in s.loss else s.loss[0],
    }


def _full_precision(config: StudyConfig) -> str:
    """bf16, as Aurora's recipe has it, when the study allows it (on a CPU, bf16 is emulated and
    the demo searches fp32 only)."""
    return "bf16" if "bf16" in config.search.precision else config.search.precision[0]


def reference_trial(config: StudyConfig) -> TrialConfig:
    """Aurora's fine-tuning recipe: every weight trained, bf16 backbone autocast, activation
    checkpointing, 3e-4 (1e-3 for tp's embedding and head), the smallest batch of the study."""
    return _trial_config(
        config, method="full", lora_rank=0, lora_targets="", unfrozen_blocks=0,
        batch_size=min(config.search.batch_size), precision=_full_precision(config),
        learning_rate=FULL_LR, activation_checkpointing=True, **_reference_loss(config),
        target_input_lr=FULL_NEW_VARIABLE_LR / FULL_LR,  # the guide's 1e-3 for the embedding
        rollout_steps=min(config.search.rollout_steps),
    )  # fmt: skip


def enqueue_references(study: optuna.Study, config: StudyConfig) -> list[str]:
    """A new study starts with the reference recipes, so that it can say how far its best trial
    beats them: Aurora's full fine-tune and, when the space has LoRA, plain LoRA at defaults."""
    if not config.reference or study.get_trials(deepcopy=False):
        return []
    study.enqueue_trial({}, user_attrs={"reference": "full"})
    added = ["full"]
    s = config.search
    if "lora" in s.method:
        nearest = min(s.lora_rank, key=lambda r: abs(r - 8))
        params = {
            "method": "lora", "lora_rank": nearest,
            "lora_targets": "qkv+proj" if "qkv+proj" in s.lora_targets else s.lora_targets[0],
            "unfrozen_blocks": min(s.unfrozen_blocks), "batch_size": min(s.batch_size),
            "precision": s.precision[0], "activation_checkpointing": s.activation_checkpointing[0],
            **_reference_loss(config), "target_input_lr": s.target_input_lr[0],
            "rollout_steps": min(s.rollout_steps),
        }  # fmt: skip
        if s.learning_rate:  # the study's learning rate, brought inside the searched range
            low, high = s.learning_rate
            params["learning_rate"] = min(max(config.train.learning_rate, low), high)
        study.enqueue_trial(params, user_attrs={"reference": "lora"})
        added.append("lora")
    return added


def check_search(config: StudyConfig) -> None:
    """Refuse, before anything is recorded, a search the base model cannot run."""
    from aurora_sweep.config import check_region_size
    from aurora_sweep.memory import meta_device
    from aurora_sweep.model import backbone_blocks, build_base

    check_region_size(config.data.region, config.data.grid)
    s = config.search
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with meta_device():
            depth = len(backbone_blocks(build_base(config.model.base, tp_stats=(0.0, 1.0))))
    asks = []
    if set(s.method) & set(LORA_METHODS):
        asks.append(("unfrozen_blocks", max(s.unfrozen_blocks)))
    if "blocks" in s.method:
        asks.append(("blocks", max(s.blocks)))
    for key, n in asks:
        if n > depth:
            raise AuroraSweepError(
                f"[search] {key} asks for {n} blocks but the {config.model.base} base model's "
                f"backbone has {depth}: choose at most {depth}"
            )


def sampler(seed: int) -> optuna.samplers.TPESampler:
    """Multivariate TPE over the conditional space (`group`: one model per set of parameters
    that appear together), and the constant liar so that workers avoid what others run."""
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=8, multivariate=True, group=True, constant_liar=True
    )


def study_pruner(config: StudyConfig) -> optuna.pruners.MedianPruner:
    """The median pruner, never at a trial's first evaluation: reports come every `eval_every`
    steps and the warm-up lasts past the first, so a trial is judged on at least two (a recipe
    that starts slowly, LoRA with its zero-initialised B say, is not cut for starting slowly)."""
    return optuna.pruners.MedianPruner(
        n_startup_trials=6, n_warmup_steps=config.train.eval_every + 1
    )


def open_study(
    config: StudyConfig,
    *,
    create: bool = True,
    seed: int | None = None,
    on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    on_create: Callable[[optuna.Study], None] | None = None,
) -> optuna.Study:
    """The study in its storage (created once, even when workers race to create it).

    Database storage gets heartbeats: a trial whose process or machine died is failed when a
    worker next looks, and `on_stale` is called for it (end its MLflow run, retry it).
    `on_create` runs in the one process whose call created the study (the storage refuses a
    second study of the same name), so what it adds, the reference trials, is added once.
    """
    storage = _storage(config, on_stale)
    tpe = sampler(config.sampler_seed if seed is None else seed)
    pruner = study_pruner(config)
    for attempt in range(5):
        try:
            created = False
            if create:
                try:
                    study = optuna.create_study(
                        study_name=config.name, storage=storage, sampler=tpe, pruner=pruner,
                        directions=["minimize"] * len(config.objectives),
                    )  # fmt: skip
                    created = True
                except optuna.exceptions.DuplicatedStudyError:
                    pass  # it exists: load it
            if not created:
                study = optuna.load_study(
                    study_name=config.name, storage=storage, sampler=tpe, pruner=pruner
                )
            study = _same_objectives(study, config)
            if created and on_create is not None:
                on_create(study)
            return study
        except KeyError:
            raise AuroraSweepError(
                f"no study named {config.name!r} in {storage_label(config.storage)}: "
                "run 'aurora-sweep run' first (with the same --storage)"
            ) from None
        except optuna.exceptions.DuplicatedStudyError:
            time.sleep(0.2 * (attempt + 1))  # created by another worker a moment ago: load it
    raise AuroraSweepError(f"could not open study {config.name!r} in {config.storage}")


def _same_objectives(study: optuna.Study, config: StudyConfig) -> optuna.Study:
    """The study, its objectives named; refused when it was made with other objectives."""
    names = list(config.objectives)
    if len(study.directions) != len(names) or study.metric_names not in (None, names):
        made = study.metric_names or [f"{len(study.directions)} objective(s)"]
        raise AuroraSweepError(
            f"study {config.name!r} in {storage_label(config.storage)} minimises "
            f"{', '.join(made)}, not {', '.join(names)}: give the study a new [study] name, "
            "or put the objectives back"
        )
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # set_metric_names is marked experimental
            study.set_metric_names(names)
    return study


def _storage(config: StudyConfig, on_stale) -> Any:
    url = config.storage
    if not url.startswith(("sqlite", "postgresql", "mysql")):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    # idle connections die during hour-long trials: test each before use
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=config.heartbeat_seconds,
                    grace_period=3 * config.heartbeat_seconds,
                    heartbeat_stale_trial_callback=on_stale,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            time.sleep(0.5 * (attempt + 1))  # another worker is creating the tables
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as e:
            reason = str(e.orig if hasattr(e, "orig") else e).strip().splitlines()[0]
            raise AuroraSweepError(
                f"cannot open the study storage {storage_label(url)}: {reason}; check that the "
                "database server runs and the URL (user, host, port, database) is right"
            ) from None
        except ModuleNotFoundError as e:
            raise AuroraSweepError(
                f"storage {storage_label(url)} needs the Python driver {e.name!r}: "
                "use postgresql+psycopg://… (psycopg is installed with aurora-sweep)"
            ) from None
    raise AuroraSweepError(f"could not create the study tables in {storage_label(url)}")


def storage_label(url: str) -> str:
    """The storage URL without its password, for messages and MLflow tags."""
    if "://" in url and "@" in url:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


def worker_seed(config: StudyConfig, study: optuna.Study, index: int) -> int:
    """A sampler seed per worker and per invocation, so that workers (and a resumed run) do not
    propose the same configs. One process on SQLite is reproducible from the config's seed;
    processes sharing a journal or a database also mix in their host and pid."""
    single = config.storage.startswith("sqlite")
    trials = len(study.get_trials(deepcopy=False))
    if single and trials == 0 and index == 0:
        return config.sampler_seed  # a fresh study, first worker: as the config says
    parts = [config.sampler_seed, trials, index]
    if not single:
        parts += [socket.gethostname(), os.getpid()]
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass
class StudySummary:
    study: optuna.Study
    new_trials: int
    experiment_id: str
    parent_run_id: str
    tracking_uri: str = ""

    @property
    def ui_link(self) -> str:
        ui = self.tracking_uri if self.tracking_uri.startswith("http") else UI
        return f"{ui.rstrip('/')}/#/experiments/{self.experiment_id}/runs"


def _data_tags(config: StudyConfig) -> dict[str, str]:
    d = config.data
    r = d.region
    return {
        "data.source": d.source,
        "data.region": f"{r.north}N..{r.south}N, {r.west}E..{r.east}E",
        "data.levels": ",".join(map(str, d.levels)),
        "data.train": f"{d.train.start}..{d.train.end}",
        "data.validation": f"{d.validation.start}..{d.validation.end}",
    }


def _adapter_data(config: StudyConfig) -> dict[str, Any]:
    """The data description each adapter carries (region, levels, splits, grid)."""
    tags = {k.removeprefix("data."): v for k, v in _data_tags(config).items()}
    return tags | {
        "grid": config.data.grid,
        "test": f"{config.data.test.start}..{config.data.test.end}",
    }


def plan_devices(workers: int, gpus: list[int] | None) -> list[dict[str, int | None]]:
    """One device per worker: a GPU each when there are GPUs, else a share of the CPU cores."""
    import torch

    count = torch.cuda.device_count()
    if gpus:
        if len(set(gpus)) != len(gpus):
            raise AuroraSweepError(f"--gpus {gpus}: each worker needs its own GPU")
        if workers not in (1, len(gpus)):
            raise AuroraSweepError(
                f"--workers {workers} with --gpus {','.join(map(str, gpus))}: give one GPU per "
                "worker (or leave out --workers)"
            )
        missing = [g for g in gpus if g >= count]
        if missing:
            raise AuroraSweepError(
                f"--gpus {','.join(map(str, gpus))}: this machine has {count} GPU(s) "
                f"(0..{count - 1}); GPU {missing[0]} does not exist"
            )
        return [{"gpu": g, "threads": None} for g in gpus]
    if count:
        if workers > count:
            raise AuroraSweepError(
                f"--workers {workers}: this machine has {count} GPU(s); one worker per GPU"
            )
        return [{"gpu": g, "threads": None} for g in range(workers)]
    cores = usable_cores()
    return [{"gpu": None, "threads": max(1, cores // workers)} for _ in range(workers)]


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what a scheduler such as Slurm or
    `taskset` grants), which `os.cpu_count` ignores; torch threads beyond it only contend."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def run_study(
    config: StudyConfig,
    *,
    trials: int,
    workers: int = 1,
    gpus: list[int] | None = None,
    console: Console | None = None,
    fit: Callable[..., Any] | None = None,
) -> StudySummary:
    """Run (or resume) `config`'s study until it holds `trials` finished trials.

    `trials` is the study-wide total of completed and pruned trials, whoever runs them: this
    process's `workers` and any other process on the same storage. `fit` replaces `train.fit`
    inside the trial workers (a picklable top-level function; tests use it to simulate
    out-of-memory errors and crashes).
    """
    console = console or Console(stderr=True)
    from aurora_sweep.data import open_cube
    from aurora_sweep.dataset import model_longitudes, patch_crop
    from aurora_sweep.memory import MIB
    from aurora_sweep.model import resolve_checkpoint
    from aurora_sweep.tracking import client_for, experiment_id, study_run
    from aurora_sweep.worker import TrialWorker, WorkerSpec

    overlap = config.data.train.start < AURORA_PRETRAINING_END and config.model.base != "demo"
    if overlap:
        warnings.warn(
            f"the train period starts {config.data.train.start}, inside Aurora's pretraining "
            "period (ERA5 up to 2021): skill there is not a test of adaptation",
            stacklevel=2,
        )
    devices = plan_devices(workers, gpus)
    # failures are reported in one line each below; Optuna's own warning repeats the traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_search(config)
    client = client_for(config)
    study = open_study(
        config,
        on_stale=functools.partial(_retry_stale, client=client),
        on_create=functools.partial(enqueue_references, config=config),
    )
    reaped = reap_dead_trials(study, client)
    if reaped:
        console.print(
            f"trial(s) {', '.join(map(str, reaped))} were left running by a process that no longer "
            "exists (killed): recorded as failed, their MLflow runs ended as KILLED; retrying them"
        )
    retry_interrupted(study)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    local = config.tracking_uri is None or config.tracking_uri.startswith("sqlite")
    experiment = experiment_id(
        client, config.name, artifacts=(config.workdir / "mlruns") if local else None
    )
    summary = StudySummary(study, 0, experiment, "", tracking_uri=config.tracking_uri or "")
    if done >= trials:
        console.print(f"study {config.name!r} already holds {done} trials; nothing to add")
        return summary

    cap = config.gpu_memory_cap
    known = {t.number for t in study.get_trials(deepcopy=False)}
    spec = WorkerSpec(
        config_path=config.path, workdir=config.workdir, checkpoint=config.model.checkpoint,
        memory_cap=cap, extra={"data": _adapter_data(config)},
        fit=fit, base_mse=study.user_attrs.get(BASE_MSE), **devices[0],
    )  # fmt: skip
    first = TrialWorker(spec)
    first.launch()  # it imports torch, Aurora and peft while the data are made or opened
    try:
        # everything that can refuse (data, checkpoint) comes before the first MLflow run
        cube = open_cube(config, console=console)
        grid = patch_crop(cube.sizes["latitude"], cube.sizes["longitude"])
        _, lon_shift = model_longitudes(cube["longitude"].values)
        resolve_checkpoint(config.model.base, config.model.checkpoint)
        info = first.start()
    except BaseException:
        first.close(at_once=True)
        raise
    if BASE_MSE not in study.user_attrs:  # the base model's scores: once per study
        study.set_user_attr(BASE_MSE, info["base_mse"])
    # the other workers, and a replacement (after an OOM or a crash), reuse them
    spec = dataclasses.replace(spec, base_mse=info["base_mse"])
    first.spec = spec
    pool = [first] + [TrialWorker(dataclasses.replace(spec, **d)) for d in devices[1:]]
    tags = {
        "optuna.study": config.name, "optuna.storage": storage_label(config.storage),
        "aurora_sweep.pretraining_overlap": str(overlap).lower(), "device": info["device"],
        "gpu_memory_cap_mb": str(cap / MIB if cap else None),
        # a box crossing 0° is shifted east for Aurora (its longitudes must lie in [0, 360))
        "data.lon_shift_deg": str(lon_shift), **_data_tags(config),
    }  # fmt: skip
    where = (
        f"{len(pool)} workers on GPUs {','.join(str(d['gpu']) for d in devices)}"
        if devices[0]["gpu"] is not None and len(pool) > 1
        else f"{len(pool)} workers, {devices[0]['threads']} CPU thread(s) each"
        if len(pool) > 1
        else info["device"]
    )
    try:
        with study_run(
            client, experiment, study=config.name,
            name=f"{config.name} {dt.datetime.now():%Y-%m-%d %H:%M}", tags=tags,
        ) as parent:  # fmt: skip
            summary.parent_run_id = parent
            console.print(
                f"study {config.name!r}: {done} trials so far, {trials} wanted; "
                f"{info['train']} train and {info['validation']} validation samples on {where}"
                + (f", cap {cap / MIB:.0f} MB" if cap else ""),
                highlight=False,
            )
            sweep = Sweep(
                config=config, study=study, client=client, experiment=experiment, parent=parent,
                console=console, grid=grid, total=trials,
            )  # fmt: skip
            sweep.run(pool)
            log_study_figures(client, parent, study, config)
    finally:
        for worker in pool:
            worker.close(at_once=True)
    summary.new_trials = sum(
        1
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        if t.number not in known and t.user_attrs.get("pid") == os.getpid()
    )
    return summary


@dataclass
class Sweep:
    """What the worker threads of one `run` share: the study, MLflow, and the trial budget."""

    config: StudyConfig
    study: optuna.Study
    client: Any
    experiment: str
    parent: str
    console: Console
    grid: tuple[int, int]
    total: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    asking: threading.Lock = field(default_factory=threading.Lock)  # see `claim`
    signum: int = signal.SIGINT
    errors: list[BaseException] = field(default_factory=list)
    running: int = 0  # worker threads not ended yet
    failures_in_a_row: int = 0  # trials of this process that failed, since the last finished
    ended: threading.Event = field(default_factory=threading.Event)  # all of them have

    def run(self, pool: list) -> None:
        """Run `pool`'s workers, one thread each, until the study holds the total."""
        threads = [
            threading.Thread(target=self.work, args=(w, i), name=f"trial-worker-{i}", daemon=True)
            for i, w in enumerate(pool)
        ]
        self.running = len(threads)
        # wait on an event, not Thread.join: a signal that interrupts join() can leave the
        # thread marked as ended while it is still settling its trial
        try:
            with signals_as_interrupts():
                for t in threads:
                    t.start()
                while not self.ended.wait(0.5):
                    pass
        except KeyboardInterrupt as e:
            # stop every trial now: each thread records its trial as interrupted
            self.signum = getattr(e, "signum", signal.SIGINT)
            self.stop.set()
            for w in pool:
                w.interrupt()
            self.ended.wait(timeout=60)
            raise Interrupted(self.signum) from None
        if self.errors:
            raise self.errors[0]

    def work(self, worker, index: int) -> None:
        """One worker's loop (a thread): claim a trial, run it, until the total is reached."""
        study = optuna.load_study(
            study_name=self.config.name, storage=self.study._storage,
            sampler=sampler(worker_seed(self.config, self.study, index)),
            pruner=self.study.pruner,
        )  # fmt: skip
        held = {"asking": False}  # this thread holds `asking`: its trial does not exist yet

        def release() -> None:
            if held["asking"]:
                held["asking"] = False
                self.asking.release()

        def objective(trial: optuna.Trial) -> float | tuple[float, float]:
            release()  # the trial exists (RUNNING): the next claim here counts it
            try:
                return self.run_trial(trial, worker)
            except KeyboardInterrupt:
                trial.set_user_attr("interrupted", True)
                raise

        try:
            while self.claim():
                held["asking"] = True
                try:
                    # the model lives in the worker process: a full collection of this
                    # process's heap after every trial (Optuna's gc_after_trial) freed nothing
                    # and took 0.5 s a trial
                    study.optimize(
                        objective, n_trials=1, catch=(Exception,), gc_after_trial=False,
                        callbacks=[self.settle],
                    )  # fmt: skip
                finally:
                    release()
        except KeyboardInterrupt:
            pass  # the trial is recorded as interrupted; `run` re-raises in the main thread
        except BaseException as e:
            self.errors.append(e)
            self.stop.set()
        finally:
            release()
            worker.close(at_once=self.stop.is_set())
            with self.lock:
                self.running -= 1
                if self.running == 0:
                    self.ended.set()

    def claim(self) -> bool:
        """True when this worker may start a trial: the study's finished and running trials,
        here and in any other process, leave room under the total. When the rest are running,
        wait for them (one may fail and need replacing) rather than overshoot.

        On True the caller holds `asking` until its trial exists: the threads of one process
        create trials one at a time, so two never count the same free slot, nor take the same
        waiting (retried) trial, which SQLite's transactions would let them do.
        """
        while not self.stop.is_set():
            self.asking.acquire()
            states = [t.state for t in self.study.get_trials(deepcopy=False)]
            finished = sum(state in FINISHED for state in states)
            if finished >= self.total:
                self.asking.release()
                return False
            if finished + states.count(optuna.trial.TrialState.RUNNING) < self.total:
                return True
            self.asking.release()
            self.stop.wait(2.0)
            with self.lock, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fail_stale_trials is marked experimental
                optuna.storages.fail_stale_trials(self.study)
                reap_dead_trials(self.study, self.client)
        return False

    def keep_base_scores(self, by_precision: dict[str, dict[str, float]]) -> None:
        """Add the base model's scores in a precision no trial had used yet to the study's
        (a worker scores the base in a trial's precision when the first such trial comes)."""
        with self.lock:
            known = self.study.user_attrs.get(BASE_MSE, {})
            if set(by_precision) - set(known):
                self.study.set_user_attr(BASE_MSE, known | by_precision)

    def failed(self, trial: optuna.Trial, reason: str) -> TrialError:
        """Record why `trial` failed and say so; the error to raise (Optuna records FAIL)."""
        trial.set_user_attr("error", reason[:1000])
        self.console.print(f"trial {trial.number:3d}  failed: {reason}", highlight=False)
        return TrialError(reason)

    def check_forgetting(self, trial: optuna.Trial, run, variable: str, ratio: float) -> None:
        """A trial that made a variable Aurora already predicted worse than `max_forgetting`
        times the base model's RMSE is infeasible: the constraint steers the sampler away and
        `best` never offers it as the answer."""
        limit = self.config.max_forgetting
        trial.set_constraint("forgetting_over_max", ratio - limit)
        if ratio > limit:
            reason = f"forgets {variable}: RMSE ×{ratio:.2f} the base model's (max ×{limit:g})"
            trial.set_user_attr("infeasible", reason)
            run.set_tags({"infeasible": reason})

    def settle(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """After each trial of this process: count failures in a row, and stop the run after
        `max_failures` of them (a study that cannot succeed must not spin)."""
        if trial.state == optuna.trial.TrialState.FAIL and "error" in trial.user_attrs:
            with self.lock:
                self.failures_in_a_row += 1
                if self.failures_in_a_row < self.config.max_failures or self.stop.is_set():
                    return
                self.errors.append(
                    AuroraSweepError(
                        f"{self.failures_in_a_row} trials failed in a row, the last (trial "
                        f"{trial.number}) because {trial.user_attrs['error']}; fix that and run "
                        "again (finished trials are kept), or raise [study] max_failures"
                    )
                )
                self.stop.set()
        elif trial.state in FINISHED:
            with self.lock:
                self.failures_in_a_row = 0

    def surplus(self, trial: optuna.Trial) -> bool:
        """True when the trials finished and those started before this one fill the total (two
        processes claimed the last slot at once: the later trial, by number, steps back)."""
        finished = ahead = 0
        for t in self.study.get_trials(deepcopy=False):
            finished += t.state in FINISHED
            ahead += t.state == optuna.trial.TrialState.RUNNING and t.number < trial.number
        return finished + ahead >= self.total

    def run_trial(self, trial: optuna.Trial, worker) -> float | tuple[float, float]:
        from aurora_sweep.memory import MIB, check_cap, estimate_peak
        from aurora_sweep.tracking import Killed, trial_run
        from aurora_sweep.worker import WorkerCrashed

        config, console = self.config, self.console
        if self.surplus(trial):
            # another process took the last slot in the same instant: give it back unused
            trial.set_user_attr("surplus", True)
            raise Surplus(f"the study already holds or runs its {self.total} trials")
        tc = sample_trial(trial, config)
        trial.set_user_attr("config", tc.to_dict())  # the whole recipe, sampled or not
        for key, value in this_process().items():  # to tell later whether it was killed
            trial.set_user_attr(key, value)
        with trial_run(
            self.client, self.experiment, parent=self.parent, number=trial.number,
            tags={"host": socket.gethostname(), "device": worker.info.get("device", "")},
        ) as run:  # fmt: skip
            trial.set_user_attr("mlflow_run_id", run.run_id)
            trial.set_user_attr("mlflow_parent_run_id", self.parent)
            run.log_params(tc.to_dict())
            estimate = estimate_peak(tc, grid=self.grid, levels=len(tc.levels), device="cuda")
            trial.set_user_attr("predicted_peak_mb", estimate.megabytes)
            run.log_metrics({"predicted_peak_mb": estimate.megabytes})

            def infeasible(reason: str, over_mb: float, seconds: float = 0.0):
                over_mb = max(over_mb, 1.0)
                trial.set_user_attr("memory_over_cap_mb", over_mb)
                trial.set_constraint("memory_over_cap_mb", over_mb)  # samplers avoid it
                trial.set_user_attr("infeasible", reason)
                run.set_tags({"infeasible": reason})
                run.log_metrics({"trial_seconds": seconds})
                console.print(f"trial {trial.number:3d}  infeasible: {reason}", highlight=False)
                return optuna.TrialPruned(reason)

            cap = config.gpu_memory_cap
            over = check_cap(estimate, cap)
            if over > 0:
                raise infeasible(
                    f"predicted peak {estimate.megabytes:.0f} MB exceeds the cap {cap / MIB:.0f} MB",
                    over,
                )

            run.flush()  # the config is in MLflow while the trial trains

            def report(step: int, value: float) -> bool:
                if config.cost:  # Optuna prunes single-objective studies only
                    return False
                trial.report(value, step)
                return trial.should_prune()

            with tempfile.TemporaryDirectory() as tmp:
                adapter = Path(tmp) / "adapter"
                try:
                    outcome = worker.run(tc.to_dict(), adapter, report)
                except WorkerCrashed as e:
                    # a signal to this process group also stops the worker: that is an interrupt
                    if self.stop.wait(2.0):
                        raise Interrupted(self.signum) from None
                    if e.signal is None:  # it crashed by itself: the config's fault, not retried
                        raise self.failed(trial, f"{e}; starting a new worker") from None
                    # killed from outside (the OOM killer, kill -9): retried once, elsewhere
                    trial.set_user_attr("killed_by", e.signal)
                    retried = retry_once(
                        self.study, self.study.get_trials(deepcopy=False)[trial.number]
                    )
                    console.print(
                        f"trial {trial.number:3d}  {e}"
                        + ("; retrying it once in a new worker" if retried else "")
                    )
                    raise Killed(str(e)) from None
                p = outcome.payload
                if outcome.status == "pruned":
                    console.print(
                        f"trial {trial.number:3d}  pruned at step {p['step']} "
                        f"({config.objective} {p['value']:.4f} on the pruner's subset)",
                        highlight=False,
                    )
                    run.log_metrics({"trial_seconds": p["seconds"]})
                    raise optuna.TrialPruned(
                        f"{config.objective} {p['value']:.4f} at step {p['step']}"
                    )
                if outcome.status == "oom":
                    trial.set_user_attr("measured_peak_mb", p["peak_memory_mb"])
                    run.log_metrics({"peak_memory_mb": p["peak_memory_mb"]})
                    limit = cap / MIB if cap else p["peak_memory_mb"]
                    raise infeasible(
                        f"out of memory at {p['peak_memory_mb']:.0f} MB ({p['message'][:200]})",
                        p["peak_memory_mb"] - limit,
                        p["seconds"],
                    )
                if outcome.status == "error":
                    raise self.failed(trial, p["message"])
                value = p["metrics"].get(config.objective_metric, float("nan"))
                if not math.isfinite(value):
                    raise self.failed(
                        trial, f"its objective {config.objective_metric} is {value} (the forecast or "
                        "the scores are not finite)",
                    )  # fmt: skip
                scalars = {**p["metrics"], "peak_memory_mb": p["peak_memory_mb"],
                           "trial_seconds": p["seconds"]}  # fmt: skip
                if p.get("peak_reserved_mb") is not None:
                    scalars["peak_reserved_mb"] = p["peak_reserved_mb"]
                if p.get("loader_wait_fraction") is not None:
                    scalars["loader_wait_fraction"] = p["loader_wait_fraction"]
                worst_variable: dict[str, str] = {}
                for steps in LEADS:  # the worst forgetting at every lead scored
                    suffix = lead_suffix(steps)
                    worst = worst_forgetting(p["metrics"], suffix)
                    if worst is not None:
                        scalars["forget_worst_ratio" + suffix] = worst[1]
                        worst_variable[suffix] = worst[0]
                        if steps == config.lead_steps:  # the constraint: at the study's lead
                            self.check_forgetting(trial, run, *worst)
                run.log_history({
                    "train_loss": p["train_loss"], "val_loss": p["val_loss"],
                    **{f"val_loss_{k}": v for k, v in p.get("val_terms", {}).items()},
                    f"val_{config.objective}_subset": p["intermediate"],
                    **{k: [(0, v)] for k, v in scalars.items()},
                })  # fmt: skip
                write_scores(trial, scalars, worst_variable)
                if p.get("objective_terms"):  # for paired comparisons between trials
                    trial.set_user_attr("objective_terms", p["objective_terms"])
                self.keep_base_scores(p.get("base_mse") or {})
                run.log_artifacts(adapter.parent)  # adapter/ and figures/, in one call
        m = p["metrics"]
        console.print(f"trial {trial.number:3d}  {_score_line(m, config)}  "
                      f"({p['seconds']:.1f} s, {p['peak_memory_mb']:.0f} MB, predicted GPU "
                      f"{estimate.megabytes:.0f} MB)", highlight=False)  # fmt: skip
        if config.cost:
            return m[config.objective_metric], scalars.get(config.cost, estimate.megabytes)
        return m[config.objective_metric]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (Ctrl-C, a scheduler's preemption); `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, so the study can end its trial
    and every MLflow run it opened before the process exits. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def reap_dead_trials(study: optuna.Study, client) -> list[int]:
    """Fail the trials that a process on this machine left RUNNING when it was killed.

    SIGKILL (a scheduler's hard limit, the OOM killer) gives a process no chance to settle its
    trial: Optuna keeps it RUNNING and MLflow keeps its run RUNNING, forever. A trial records
    its host, pid and the pid's start time; a RUNNING trial of this host whose process is gone
    is marked FAIL, its MLflow run is ended as KILLED, and it is retried once. Trials of other
    hosts are left to the database's heartbeats (`_retry_stale`).
    """
    from aurora_sweep.tracking import end_runs

    host = socket.gethostname()
    reaped = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        a = t.user_attrs
        if a.get("host") != host or alive(a.get("pid"), a.get("pid_started")):
            continue
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process settled it a moment ago
        end_runs(client, [a.get("mlflow_run_id")])
        retry_once(study, t)
        reaped.append(t.number)
    return reaped


def _retry_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial, *, client) -> None:
    """A trial whose heartbeat stopped (its process or machine died) was failed by Optuna:
    end its MLflow run as KILLED and retry it once."""
    from aurora_sweep.tracking import end_runs

    end_runs(client, [trial.user_attrs.get("mlflow_run_id")])
    retry_once(study, trial)


def retry_once(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Enqueue `trial` again with the same parameters, unless it is itself a retry or has been
    retried already: a trial that kills its process every time is not retried forever."""
    reference = trial.user_attrs.get("reference")
    if "retry_of" in trial.user_attrs or not (trial.params or reference):
        return False
    if any(t.user_attrs.get("retry_of") == trial.number for t in study.get_trials(deepcopy=False)):
        return False
    marks = {"retry_of": trial.number} | ({"reference": reference} if reference else {})
    study.enqueue_trial(trial.params, user_attrs=marks)
    return True


def retry_interrupted(study: optuna.Study) -> list[int]:
    """Enqueue once, with the same parameters, every trial a signal interrupted."""
    return [
        t.number
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        if t.user_attrs.get("interrupted") and retry_once(study, t)
    ]


def _score_line(m: dict[str, float], config: StudyConfig) -> str:
    """One line of a trial's verdict at the study's lead: objective with its interval, skills."""
    objective, sfx = config.objective, lead_suffix(config.lead_steps)
    lo, hi = m.get(f"{objective}_q05{sfx}"), m.get(f"{objective}_q95{sfx}")
    interval = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return (
        f"{config.objective_metric} {m[config.objective_metric]:.3f}{interval}  skill vs "
        f"persistence {m['tp_skill_persistence' + sfx]:+.3f}, vs climatology "
        f"{m['tp_skill_climatology' + sfx]:+.3f}"
    )


def log_study_figures(client, run_id: str, study: optuna.Study, config: StudyConfig) -> None:
    """Optuna's optimisation history and importances, and skill against the study's cost (peak
    memory unless it names another) with the Pareto front drawn."""
    from aurora_sweep.figures import study_figures
    from aurora_sweep.results import front_cost, pareto_front, ranked, recipe

    complete = ranked(study.get_trials(deepcopy=False))  # completed, within the cap
    cost = front_cost(config, complete)
    records = {t.number: TrialRecord.of(t) for t in complete}
    complete = [t for t in complete if records[t.number].value(cost) is not None]
    if not complete:
        return
    front = {t.number for t in pareto_front(complete, cost)}
    points = [
        {
            "number": t.number,
            "skill": records[t.number].get("tp_skill_climatology"),
            "peak_mb": records[t.number].value(cost),
            "label": recipe(t),
            "front": t.number in front,
        }
        for t in complete
    ]
    import matplotlib.pyplot as plt

    if cost == "peak_memory_mb":
        on_gpu = any(r.on_gpu for r in records.values())
        axis = "peak GPU memory (MB)" if on_gpu else "peak resident memory of the trial (MB, CPU)"
    else:  # a CPU study's figure shows the GPU memory each recipe is predicted to need
        axis = {"predicted_peak_mb": "predicted peak GPU memory (MB)",
                "trial_seconds": "trial wall time (s)"}[cost]  # fmt: skip
    labels = {
        "skill": f"skill vs climatology (1 − {config.objective}/climatology's)",
        "memory": axis,
    }
    figure = "skill_vs_time.png" if cost == "trial_seconds" else "skill_vs_memory.png"
    for name, fig in study_figures(study, points, name=figure, **labels).items():
        client.log_figure(run_id, fig, f"study/{name}")
        plt.close(fig)


class Surplus(RuntimeError):
    """A trial started when the study's total was already taken (recorded FAIL, never run)."""


class TrialError(RuntimeError):
    """A trial raised inside its worker (recorded as FAIL; the study goes on)."""
