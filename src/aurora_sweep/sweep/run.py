"""The search: an Optuna study whose trials are fine-tunes, each tracked as an MLflow run.

`run_study` opens (or resumes) the study in its storage, runs trials until the study holds the
requested total, and records each one as a child run under one parent run per invocation. A
trial that fails is recorded and the study goes on. The objective is the study's `objective`
(SEEPS or RMSE of tp) on the whole validation split; the pruner sees the same score on a fixed
subset. The test split is never touched here.

The jobs have rooms of their own: the search space and reference recipes (`space`), the storage
and the recovery of dead trials (`storage`), the devices (`devices`), the scheduler's threads,
signals and slots (`scheduler`), and what a trial keeps in the storage (`records`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from rich.console import Console

from aurora_sweep.config.bases import BASES
from aurora_sweep.config.study import MIB, StudyConfig
from aurora_sweep.data.cube import open_cube
from aurora_sweep.data.lineage import split_datasets, store_digest
from aurora_sweep.devices import plan_devices
from aurora_sweep.model.files import study_files
from aurora_sweep.sweep.finalists import is_replica, replicas_to_run
from aurora_sweep.sweep.live import Watch
from aurora_sweep.sweep.outcomes import Ready
from aurora_sweep.sweep.records import AURORA15, BASE_MSE, TrialRecord
from aurora_sweep.sweep.scheduler import Sweep
from aurora_sweep.sweep.space import check_search, enqueue_references
from aurora_sweep.sweep.storage import (
    FINISHED,
    _retry_stale,
    open_study,
    reap_dead_trials,
    retry_interrupted,
    storage_label,
)
from aurora_sweep.sweep.worker import TrialWorker, WorkerSpec

UI = "http://127.0.0.1:5000"


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


def run_study(
    config: StudyConfig,
    *,
    trials: int,
    workers: int = 1,
    gpus: list[int] | None = None,
    console: Console | None = None,
    fit: Callable[..., Any] | None = None,
    quiet: bool = False,
) -> StudySummary:
    """Run (or resume) `config`'s study until it holds `trials` finished trials.

    `trials` is the study-wide total of completed and pruned trials, whoever runs them: this
    process's `workers` and any other process on the same storage. `fit` replaces `train.fit`
    inside the trial workers (a picklable top-level function; tests use it to simulate
    out-of-memory errors and crashes). `console` shows the run as it goes (`live.Watch`: a live
    panel on a terminal, a line per trial elsewhere); `quiet`: nothing but warnings and errors.
    """
    console = console or Console(stderr=True)
    if quiet:
        console = Console(stderr=True, quiet=True)
    watch = Watch(console, quiet=quiet)
    overlap = _pretraining_overlap(config)
    devices = plan_devices(workers, gpus)
    study, client, summary = _open(config, console)
    searched = [t for t in study.get_trials(deepcopy=False, states=FINISHED) if not is_replica(t)]
    done = len(searched)
    if done >= trials and not replicas_to_run(study, config):
        console.print(f"study {config.name!r} already holds {done} trials; nothing to add")
        return summary

    known = {t.number for t in study.get_trials(deepcopy=False)}
    pool, ready, grid, lon_shift = _start_workers(config, study, devices, fit, console)
    tags = _parent_tags(config, overlap=overlap, device=ready.device, lon_shift=lon_shift)
    try:
        with _parent_run(config, client, summary, tags) as parent:
            watch.say(_start_line(config, done, trials, ready, pool, devices))
            sweep = Sweep(
                config=config,
                study=study,
                client=client,
                experiment=summary.experiment_id,
                parent=parent,
                watch=watch,
                grid=grid,
                total=trials,
                datasets=split_datasets(config, store_digest(config.data.store)),
            )
            with watch:
                sweep.run(pool)
    finally:
        for worker in pool:
            worker.close(at_once=True)
    summary.new_trials = _finished_here(study, known)
    return summary


def _open(config: StudyConfig, console: Console) -> tuple[optuna.Study, Any, StudySummary]:
    """The study, its search checked, opened and recovered (`_open_and_recover`); its MLflow
    client; and a summary that names its experiment."""
    from aurora_sweep.sweep.tracking import client_for, experiment_id

    # failures are reported in one line each below; Optuna's own warning repeats the traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_search(config)
    if config.data.source != "demo":  # the demo's store is made later, when missing
        open_cube(config)  # a store missing, or not the study's, is refused first
    study_files(config)  # then a checkpoint or static file missing, before the study is made
    client = client_for(config)
    study = _open_and_recover(config, client, console)
    local = config.tracking_uri is None or config.tracking_uri.startswith("sqlite")
    experiment = experiment_id(
        client, config.name, artifacts=(config.workdir / "mlruns") if local else None
    )
    summary = StudySummary(study, 0, experiment, "", tracking_uri=config.tracking_uri or "")
    return study, client, summary


@contextlib.contextmanager
def _parent_run(
    config: StudyConfig, client, summary: StudySummary, tags: dict[str, str]
) -> Iterator[str]:
    """This invocation's MLflow parent run, whose children are its trials; its id is kept in
    `summary`."""
    from aurora_sweep.sweep.tracking import study_run

    name = f"{config.name} {dt.datetime.now():%Y-%m-%d %H:%M}"
    experiment = summary.experiment_id
    with study_run(client, experiment, study=config.name, name=name, tags=tags) as parent:
        summary.parent_run_id = parent
        yield parent


def _finished_here(study: optuna.Study, known: set[int]) -> int:
    """The trials this process finished that were not in the study when it started."""
    return sum(
        t.number not in known and TrialRecord.of(t).pid == os.getpid()
        for t in study.get_trials(deepcopy=False, states=FINISHED)
    )


def _pretraining_overlap(config: StudyConfig) -> bool | None:
    """Whether a split lies inside the training period of a base the study adapts (said as a
    warning, by base); None where a base's period is not published (said too).

    A train period there adapts the model to data it has seen; a validation or test period
    there is worse: the recipe is chosen, or its skill reported, on data the base has learnt.
    """
    d = config.data
    splits = {"train": d.train, "validation": d.validation, "test": d.test}
    found: list[bool | None] = []
    for base in config.bases:
        if base == "demo":
            continue  # the demo base was pretrained on the demo world before 2022, on purpose
        end = BASES[base].training_ends
        if end is None:
            warnings.warn(
                f"the {base} base's training period is not published (microsoft/aurora's docs "
                "say it was fine-tuned on IFS analyses, not over which years): whether [data] "
                "train, validation and test lie inside it is unknown",
                stacklevel=3,
            )
            found.append(None)
            continue
        inside = [name for name, p in splits.items() if p.start < end]
        if inside:
            warnings.warn(_overlap_words(base, end, inside, splits), stacklevel=3)
        found.append(bool(inside))
    return True if True in found else (None if None in found else False)


def _overlap_words(base: str, end: dt.date, inside: list[str], splits: dict) -> str:
    days = ", ".join(f"{name} from {splits[name].start}" for name in inside)
    scored = [n for n in inside if n != "train"]
    why = (
        f"the {' and '.join(scored)} scores are of data the base has learnt"
        if scored
        else "skill there is not a test of adaptation"
    )
    era = f"up to {end.year - 1}" if (end.month, end.day) == (1, 1) else f"before {end}"
    start = f"{end.year}" if (end.month, end.day) == (1, 1) else f"{end}"
    return (
        f"{days}: inside the {base} base's training period (ERA5 {era}), so {why}; use periods "
        f"from {start} on ([data] train, validation, test)"
    )


def _parent_tags(
    config: StudyConfig, *, overlap: bool | None, device: str, lon_shift: float
) -> dict[str, str]:
    """The tags of the parent MLflow run of one `run`."""
    cap = config.gpu_memory_cap
    return {
        "optuna.study": config.name,
        "optuna.storage": storage_label(config.storage),
        "aurora_sweep.pretraining_overlap": "unknown" if overlap is None else str(overlap).lower(),
        "device": device,
        "gpu_memory_cap_mb": str(cap / MIB if cap else None),
        # a box crossing 0° is shifted east for Aurora (its longitudes must lie in [0, 360))
        "data.lon_shift_deg": str(lon_shift),
        **_data_tags(config),
    }


def _open_and_recover(config: StudyConfig, client, console: Console) -> optuna.Study:
    """The study, opened or created (with its reference trials), the trials a killed process
    left running failed and queued again, and the interrupted ones queued again."""
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
    return study


def _start_workers(
    config: StudyConfig, study: optuna.Study, devices: list, fit, console: Console
) -> tuple[list[TrialWorker], Ready, tuple[int, int], float]:
    """The trial workers, the first started: (pool, what the first said when ready, the model
    grid, the longitude shift). The demo's data are made here, before the first MLflow run;
    the files the study needs from outside were found before the study was opened
    (`model.files.study_files`)."""
    from aurora_sweep.data.samples import model_longitudes, patch_crop

    spec = WorkerSpec(
        config_path=config.path,
        workdir=config.workdir,
        checkpoint=config.model.checkpoint,
        memory_cap=config.gpu_memory_cap,
        extra={"data": _adapter_data(config)},
        fit=fit,
        base_mse=study.user_attrs.get(BASE_MSE),
        aurora15=study.user_attrs.get(AURORA15),
        **devices[0],
    )
    first = TrialWorker(spec)
    first.launch()  # it imports torch, Aurora and peft while the data are made or opened
    try:
        cube = open_cube(config, console=console)
        grid = patch_crop(cube.sizes["latitude"], cube.sizes["longitude"])
        _, lon_shift = model_longitudes(cube["longitude"].values)
        ready = first.start()
    except BaseException:
        first.close(at_once=True)
        raise
    _keep_base_scores(study, ready)
    # the other workers, and a replacement (after an OOM or a crash), reuse them
    first.spec = dataclasses.replace(spec, base_mse=ready.base_mse, aurora15=ready.aurora15 or None)
    pool = [first] + [TrialWorker(dataclasses.replace(first.spec, **d)) for d in devices[1:]]
    return pool, ready, grid, lon_shift


def _keep_base_scores(study: optuna.Study, ready: Ready) -> None:
    """Keep in the study the base model's scores, and Aurora 1.5's, that its first worker made:
    once per study."""
    if BASE_MSE not in study.user_attrs:
        study.set_user_attr(BASE_MSE, ready.base_mse)
    if ready.aurora15 and AURORA15 not in study.user_attrs:
        study.set_user_attr(AURORA15, ready.aurora15)


def _start_line(
    config: StudyConfig, done: int, trials: int, ready: Ready, pool: list, devices: list
) -> str:
    """What the run says before its first trial: the study, its data and where it trains."""
    where = (
        f"{len(pool)} workers on GPUs {','.join(str(d['gpu']) for d in devices)}"
        if devices[0]["gpu"] is not None and len(pool) > 1
        else f"{len(pool)} workers, {devices[0]['threads']} CPU thread(s) each"
        if len(pool) > 1
        else ready.device
    )
    cap = config.gpu_memory_cap
    return (
        f"study {config.name!r}: {done} trials so far, {trials} wanted; "
        f"{ready.train} train and {ready.validation} validation samples on {where}"
        + (f", cap {cap / MIB:.0f} MB" if cap else "")
    )
