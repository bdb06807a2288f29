"""After the search: rank trials, export the best one, score an exported adapter.

The study's storage says which trial won; MLflow holds each trial's adapter as an artifact, so
exporting copies that artifact and adds a model card, rather than training anything again.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import optuna
from rich.table import Table

from aurora_sweep.config import StudyConfig, load_config
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.study import open_study, tracking_uri


def ranked_trials(config: StudyConfig) -> list[optuna.trial.FrozenTrial]:
    """Completed trials within the memory cap, best (lowest tp RMSE) first."""
    study = open_study(config, create=False)
    done = [
        t
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.value is not None
        and t.user_attrs.get("memory_over_cap_mb", 0.0) <= 0
    ]
    return sorted(done, key=lambda t: t.value)


def top_trials_table(config: StudyConfig, *, top: int = 10) -> Table:
    trials = ranked_trials(config)
    table = Table(
        title=f"study {config.name}: best {min(top, len(trials))} of {len(trials)} completed trials"
    )
    cols = ("trial", "tp_rmse", "skill pers.", "skill clim.", "rank", "targets", "unfrozen",
            "batch", "precision", "lr", "ckpt", "peak MB", "s")  # fmt: skip
    for c in cols:
        table.add_column(c, justify="right" if c not in ("targets", "precision") else "left")
    for t in trials[:top]:
        p, a = t.params, t.user_attrs
        table.add_row(
            str(t.number), f"{t.value:.4f}", f"{a.get('tp_skill_persistence', float('nan')):+.3f}",
            f"{a.get('tp_skill_climatology', float('nan')):+.3f}", str(p.get("lora_rank")),
            str(p.get("lora_targets")), str(p.get("unfrozen_blocks")), str(p.get("batch_size")),
            str(p.get("precision")), f"{p['learning_rate']:.1e}" if "learning_rate" in p else "-",
            "yes" if p.get("activation_checkpointing") else "no",
            f"{a.get('peak_memory_mb', float('nan')):.0f}", f"{a.get('trial_seconds', float('nan')):.1f}",
        )  # fmt: skip
    return table


def export_best(config: StudyConfig, target: Path) -> Path:
    """Copy the best trial's adapter from MLflow to `target` and write its model card."""
    import mlflow

    from aurora_sweep.export import META, write_model_card

    trials = ranked_trials(config)
    if not trials:
        raise AuroraSweepError(f"study {config.name!r} has no completed trial to export yet")
    best = trials[0]
    run_id = best.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise AuroraSweepError(f"trial {best.number} has no MLflow run recorded")
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not (target / META).exists():
        raise AuroraSweepError(
            f"{target} exists and is not an adapter directory: choose an empty one"
        )
    mlflow.set_tracking_uri(tracking_uri(config))
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="adapter", dst_path=tmp
            )
        except Exception as e:
            raise AuroraSweepError(
                f"cannot read trial {best.number}'s adapter from MLflow ({type(e).__name__}); "
                "run this from the directory that holds mlflow.db and mlruns/"
            ) from None
        if target.exists():
            shutil.rmtree(target)
        shutil.move(local, target)
    write_model_card(target, study=config.name, number=best.number)
    return target


def evaluate_adapter(adapter: Path, *, split: str, checkpoint: Path | None = None) -> dict:
    """Score an exported adapter on `split` with the data of the study it came from."""
    from aurora_sweep.data import open_cube
    from aurora_sweep.export import load_finetuned, read_meta
    from aurora_sweep.train import TrialConfig, TrialData, default_device, eval_indices, score

    adapter = Path(adapter)
    meta = read_meta(adapter)
    config = load_config(adapter / "study.toml")
    trial = TrialConfig.from_dict(meta["trial"])
    # the same splits and baselines as the trial had (the model carries its own tp statistics)
    data = TrialData.prepare(open_cube(config), config, eval_split=split)
    device = default_device()
    model = load_finetuned(adapter, checkpoint=checkpoint, device=str(device))
    limit = trial.val_samples if split == "validation" else 0
    scores = score(model, data, val_samples=limit, batch_size=8, device=device)
    return {**scores, "split": split, "samples": len(eval_indices(len(data.validation), limit))}
