"""The `aurora-sweep` command: parse arguments, call one function per command, map errors.

Heavy modules (torch, aurora, peft, optuna, mlflow) are imported inside the commands so that
`aurora-sweep --help` answers at once. A problem the user can fix (`AuroraSweepError`) is printed
on one line with exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import typer

from aurora_sweep.cli.data import data_app, fail
from aurora_sweep.errors import AuroraSweepError

app = typer.Typer(
    help="Search parameter-efficient fine-tuning recipes for Aurora (tp, pr, rain_rate, runoff, "
    "snowfall or soil moisture) inside a GPU memory cap.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")

ConfigOption = typer.Option(
    None, "--config", "-c", help="Study config (TOML); default: the embedded demo study."
)
SplitOption = typer.Option("validation", "--split", help="validation or test.")
StorageOption = typer.Option(
    None,
    "--storage",
    help="Optuna storage: sqlite:///FILE.db, FILE.journal or postgresql+psycopg://USER@HOST/DB "
    "(default: the config's [study] storage, else NAME.optuna.db here).",
)
AdapterArgument = typer.Argument(
    ...,
    help="An adapter directory from `best --export`, or its registered version "
    "models:/<study>/<version>.",
)
RegistryOption = typer.Option(
    None,
    "--tracking-uri",
    help="Where a models:/ adapter is registered (default: MLFLOW_TRACKING_URI, else mlflow.db "
    "here).",
)
TrackingOption = typer.Option(
    None,
    "--tracking-uri",
    help="MLflow tracking URI, e.g. an mlflow server's http://HOST:5000 "
    "(default: the config's [study] tracking_uri, else mlflow.db here).",
)


def _gpus(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        gpus = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise AuroraSweepError(f"--gpus {text!r}: give GPU numbers, e.g. --gpus 0,1,2,3") from None
    if not gpus or min(gpus) < 0:
        raise AuroraSweepError(f"--gpus {text!r}: give GPU numbers, e.g. --gpus 0,1,2,3")
    return gpus


def _console(*, stderr: bool = False):
    """A rich console that does not squeeze tables to 80 columns when output is redirected."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160, soft_wrap=True)


def _quiet_libraries() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message="The normalisation statics")
    warnings.filterwarnings("ignore", message=".*is an experimental feature")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)


@app.command()
def run(
    trials: int = typer.Option(
        30,
        "--trials",
        "-n",
        min=1,
        help="Finished trials the study should hold, counting every worker and machine.",
    ),
    config: Path | None = ConfigOption,
    workers: int = typer.Option(
        1, "--workers", "-w", min=1, help="Trials at once on this machine (one GPU each)."
    ),
    gpus: str | None = typer.Option(
        None, "--gpus", help="GPUs to use, e.g. 0,1,2,3 (default: the first --workers GPUs)."
    ),
    storage: str | None = StorageOption,
    tracking_uri: str | None = TrackingOption,
    checkpoint: Path | None = typer.Option(None, help="Local base checkpoint file."),
    gpu_memory_cap: str | None = typer.Option(
        None,
        "--gpu-memory-cap",
        help="GPU memory each trial may use, e.g. 10GiB (default: config).",
    ),
    quiet: bool = typer.Option(
        False,
        "--quiet",
        "-q",
        help="Print only the final lines (the best trial, the finalists, where MLflow is).",
    ),
) -> None:
    """Run the study, or resume it, until it holds --trials finished trials.

    On a terminal a live panel shows each worker's trial (phase, step, loss, time left) and the
    study's counts; elsewhere (a log file, a scheduler) a line per trial.

    Another process or machine joins the same study with the same --storage and --tracking-uri.
    """
    _quiet_libraries()
    from aurora_sweep.sweep.run import run_study

    console = _console(stderr=True)
    try:
        study = _run_config(config, storage, tracking_uri, gpu_memory_cap, checkpoint)
        summary = run_study(
            study, trials=trials, workers=workers, gpus=_gpus(gpus), console=console, quiet=quiet
        )
    except AuroraSweepError as e:
        fail(e)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        console.print(
            f"interrupted by {signal.Signals(signum).name}: the running trial(s) will be "
            "retried; run the same command again to resume",
            highlight=False,
        )
        raise typer.Exit(128 + signum) from None
    _run_ended(study, summary, console)


def _run_ended(study, summary, console) -> None:
    """`run`'s final lines (printed with --quiet too): the best trial, the finalists, MLflow."""
    _log_study_figures(study, summary)
    console.print(_best_line(study))
    _say_finalists(study)
    if study.tracking_uri and study.tracking_uri.startswith("http"):
        console.print(f"MLflow: open {summary.ui_link}")
    else:
        console.print(f"MLflow: run `mlflow ui` here, then open {summary.ui_link}")


def _log_study_figures(config, summary) -> None:
    """The study's figures, on the parent run of the sweep that just ended (none if it ran no
    trial)."""
    if not summary.parent_run_id:
        return
    from aurora_sweep.report.study_plots import log_study_figures  # matplotlib, at the end only
    from aurora_sweep.sweep.tracking import client_for

    log_study_figures(client_for(config), summary.parent_run_id, summary.study, config)


def _run_config(
    config: Path | None,
    storage: str | None,
    tracking_uri: str | None,
    gpu_memory_cap: str | None,
    checkpoint: Path | None,
):
    """The study config with `run`'s flags in force."""
    import dataclasses

    from aurora_sweep.config.settings import parse_memory
    from aurora_sweep.config.study import with_overrides
    from aurora_sweep.config.study_file import load_config

    study = load_config(config)
    cap = parse_memory(gpu_memory_cap) if gpu_memory_cap is not None else None
    study = with_overrides(study, storage=storage, tracking_uri=tracking_uri, gpu_memory_cap=cap)
    if checkpoint is None:
        return study
    return dataclasses.replace(study, model=dataclasses.replace(study.model, checkpoint=checkpoint))


def _say_finalists(config) -> None:
    """The finalists' winner by its mean over seeds, when the study has finalists."""
    from aurora_sweep.report.best import study_trials
    from aurora_sweep.report.finalists import ranked_finalists, runner_up_difference

    ranked = ranked_finalists(config, study_trials(config))
    if not ranked:
        return
    first = ranked[0]
    line = (
        f"finalists: trial {first.number}'s recipe wins on its mean over {len(first.values)} "
        f"seeds, {first.mean:.4f} ± {first.spread:.4f}"
    )
    delta = runner_up_difference(config, ranked)
    if delta is not None:
        apart = delta[1] > 0 or delta[2] < 0
        line += f" ({'apart from' if apart else 'not apart from'} trial {ranked[1].number}'s)"
    _console(stderr=True).print(line + "; 'aurora-sweep best' lists them", highlight=False)


def _best_line(config) -> str:
    from aurora_sweep.report.best import (
        front_cost,
        interval,
        lead_of,
        pareto_front,
        scored,
        study_trials,
    )
    from aurora_sweep.sweep.records import TrialRecord, completed, ranked, score

    every = study_trials(config)
    trials = ranked(every)
    if not trials:
        forgetful = len(completed(every))
        if forgetful:
            return (
                f"no feasible trial yet: each of the {forgetful} completed trials makes a variable "
                f"worse than ×{config.max_forgetting:g} the base model's RMSE ('aurora-sweep best' "
                "lists them; run more trials)"
            )
        return "no completed trial within the memory cap yet"
    b, a = trials[0], TrialRecord.of(trials[0])
    at = scored(config)
    ci = interval(b, at)
    forgot = a.worst_forgetting(lead_of(config))
    skill = {ref: at.skill(ref) for ref in ("persistence", "climatology", "aurora15")}
    front = ""
    if config.cost:
        members = pareto_front(trials, front_cost(config, trials))
        front = (
            f"\nPareto front of {config.objective} against {config.cost}: trials "
            + ", ".join(str(t.number) for t in members)
            + " ('aurora-sweep best --pareto' compares them)"
        )
    return (
        f"best: trial {b.number}, {config.objective_metric} {score(b):.4f}"
        + (f" (90 % interval {ci[0]:.4f}–{ci[1]:.4f})" if ci else "")
        + f"; skill vs persistence {a.get(skill['persistence']):+.3f}, "
        f"vs climatology {a.get(skill['climatology']):+.3f}"
        + (
            f", vs Aurora 1.5 untrained {a.get(skill['aurora15']):+.3f} (fine-tuned on IFS "
            "analyses, started here from ERA5)"
            if a.value(skill["aurora15"]) is not None
            else ""
        )
        + (f"; worst forgetting {forgot[0]} ×{forgot[1]:.2f}" if forgot else "")
        + front
    )


@app.command()
def best(
    config: Path | None = ConfigOption,
    top: int = typer.Option(10, "--top", min=1, help="How many trials to list."),
    export: Path | None = typer.Option(
        None, "--export", help="Write the best trial's adapter here (or --trial N's)."
    ),
    trial: int | None = typer.Option(
        None, "--trial", min=0, help="With --export: this trial (a Pareto front member, say)."
    ),
    pareto: bool = typer.Option(
        False,
        "--pareto",
        help="Show the Pareto front of skill against the study's cost "
        "(peak memory unless [study] objectives names another).",
    ),
    register: bool = typer.Option(
        True,
        "--register/--no-register",
        help="With --export: also log the adapter to its trial's run as an MLflow model and "
        "register it under the study's name.",
    ),
    storage: str | None = StorageOption,
    tracking_uri: str | None = TrackingOption,
) -> None:
    """List the best trials (or the Pareto front); with --export, write the best one's adapter
    (or --trial N's) and model card, and register it in MLflow's model registry."""
    _quiet_libraries()
    from aurora_sweep.config.study import with_overrides
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.report.best import (
        against_references,
        best_by_method,
        pareto_table,
        recipe,
        stopped_scoring,
        study_trials,
        top_trials_table,
    )
    from aurora_sweep.report.finalists import finalist_lines

    console = _console()
    try:
        if trial is not None and export is None:
            raise AuroraSweepError("--trial N says which trial to export: add --export DIR")
        study = with_overrides(load_config(config), storage=storage, tracking_uri=tracking_uri)
        trials = study_trials(study)  # read once for every view below
        table = pareto_table(study, trials) if pareto else top_trials_table(study, trials, top=top)
        console.print(table)
        lines = [*best_by_method(study, trials), *against_references(study, trials)]
        lines += stopped_scoring(trials)
        for line in [*lines, *finalist_lines(study, trials, recipe)]:
            console.print(line, highlight=False)
        if export is not None:
            _export(study, export, trial, trials, register=register, console=console)
    except AuroraSweepError as e:
        fail(e)


def _export(study, export: Path, trial: int | None, trials, *, register: bool, console) -> None:
    """`best --export`: the adapter and its card, registered in MLflow unless --no-register."""
    from aurora_sweep.report.evaluate import export_trial, register_export

    path, chosen = export_trial(study, export, number=trial, trials=trials)
    which = "the best trial" if trial is None else f"trial {trial}"
    console.print(f"exported {which} to {path} (see {path / 'README.md'})")
    if register:
        uri = register_export(study, path, chosen)
        console.print(
            f"registered in MLflow as {uri} (forecast, evaluate and report take it)",
            highlight=False,
        )


@app.command()
def evaluate(
    adapter: str = AdapterArgument,
    split: str = SplitOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    checkpoint: Path | None = typer.Option(None, help="Local base checkpoint file."),
    lead: str | None = typer.Option(
        None, "--lead", help="6h, 12h or 24h: that lead's scores alone, under the 6-hour names."
    ),
    tracking_uri: str | None = RegistryOption,
) -> None:
    """Score an exported adapter on a split against persistence and climatology, at every lead
    (6 h names plain, 12 h and 24 h with _12h, _24h), or at one with --lead."""
    _quiet_libraries()
    from rich.table import Table

    from aurora_sweep.report.evaluate import evaluate_adapter

    try:
        scores = evaluate_adapter(
            adapter, split=split, checkpoint=checkpoint, lead=lead, tracking_uri=tracking_uri
        )
    except AuroraSweepError as e:
        fail(e)
    if as_json:
        print(json.dumps(scores))
        return
    over = lead or "6 h (12h, 24h: over 12 and 24 h)"
    table = Table(title=f"{adapter} on the {split} split (mm over {over})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in scores.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    _console().print(table)


@app.command()
def forecast(
    adapter: str = AdapterArgument,
    start: str = typer.Option(..., "--start", help="First initialisation day, YYYY-MM-DD."),
    end: str = typer.Option(..., "--end", help="Last initialisation day, YYYY-MM-DD."),
    lead: str = typer.Option(
        "6h",
        "--lead",
        help="6h, or 12h, 24h ... (Aurora's rollout; the target over the lead, as its kind is).",
    ),
    out: Path = typer.Option(Path("forecast.nc"), "--out", help="The NetCDF file to write."),
    checkpoint: Path | None = typer.Option(None, help="Local base checkpoint file."),
    tracking_uri: str | None = RegistryOption,
) -> None:
    """Forecast with an exported adapter from every store time in a date range, into a CF-1.8
    NetCDF file (the study's target over the lead time, under its name and units, and the
    variables Aurora already predicts)."""
    _quiet_libraries()
    from aurora_sweep.report.forecast import forecast_file

    try:
        path, n = forecast_file(
            adapter,
            start=start,
            end=end,
            lead=lead,
            out=out,
            checkpoint=checkpoint,
            tracking_uri=tracking_uri,
        )
    except AuroraSweepError as e:
        fail(e)
    _console().print(f"wrote {n} forecasts ({lead} ahead) to {path}", highlight=False)


def _point(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise AuroraSweepError(
            f"--point {text!r}: give latitude and longitude in degrees, e.g. --point 48.2,16.4"
        ) from None
    return lat, lon


@app.command()
def report(
    adapter: str = AdapterArgument,
    split: str = SplitOption,
    point: str | None = typer.Option(
        None, "--point", help="LAT,LON: add the time series at the nearest grid point."
    ),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="The HTML file to write."),
    checkpoint: Path | None = typer.Option(None, help="Local base checkpoint file."),
    tracking_uri: str | None = RegistryOption,
) -> None:
    """Write one self-contained HTML report: scores with intervals, forgetting, maps."""
    _quiet_libraries()
    from aurora_sweep.report.evaluate import report_adapter

    try:
        path = report_adapter(
            adapter,
            split=split,
            out=out,
            point=_point(point),
            checkpoint=checkpoint,
            tracking_uri=tracking_uri,
        )
    except AuroraSweepError as e:
        fail(e)
    _console().print(f"wrote {path}")
