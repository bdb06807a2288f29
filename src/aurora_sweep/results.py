"""After the search: rank trials, export the best one, score an exported adapter.

The study's storage says which trial won; MLflow holds each trial's adapter as an artifact, so
exporting copies that artifact and adds a model card, rather than training anything again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import optuna
from rich.table import Table

from aurora_sweep.config import StudyConfig, load_config
from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.records import TrialRecord, worst_forgetting
from aurora_sweep.storage import open_study
from aurora_sweep.tracking import client_for


def study_trials(config: StudyConfig) -> list[optuna.trial.FrozenTrial]:
    """Every trial of the study, read from its storage once for all the views below."""
    return open_study(config, create=False).get_trials(deepcopy=False)


def ranked_trials(config: StudyConfig) -> list[optuna.trial.FrozenTrial]:
    """Completed trials within the memory cap, best (lowest objective) first."""
    return ranked(study_trials(config))


def ranked(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Of `trials`, the feasible ones, best (lowest objective) first: completed, within the
    memory cap, and not forgetting more than the study allows (`forgets`)."""
    return [t for t in completed(trials) if not forgets(t)]


def completed(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Of `trials`, the completed ones within the memory cap (feasible or not), best first."""
    done = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.values
        and TrialRecord.of(t).memory_over_cap_mb <= 0
    ]
    return sorted(done, key=score)


def forgets(trial: optuna.trial.FrozenTrial) -> bool:
    """True when the trial made a variable Aurora already predicted worse than the study's
    `max_forgetting` allows (its Optuna constraint is violated)."""
    return trial.constraints.get("forgetting_over_max", 0.0) > 0


def score(trial: optuna.trial.FrozenTrial) -> float:
    """A completed trial's objective (the first of a multi-objective study's values)."""
    return trial.values[0]


def front_cost(config: StudyConfig, trials: list[optuna.trial.FrozenTrial]) -> str:
    """What the Pareto front trades skill against: the study's cost objective; else the peak GPU
    memory measured, or the one predicted when the trials ran on a CPU (whose resident set
    grows with the worker's age, not with the recipe)."""
    if config.cost:
        return config.cost
    on_gpu = any(TrialRecord.of(t).on_gpu for t in trials)
    return "peak_memory_mb" if on_gpu else "predicted_peak_mb"


def pareto_front(
    trials: list[optuna.trial.FrozenTrial], cost: str
) -> list[optuna.trial.FrozenTrial]:
    """The trials no other trial beats in both the objective and `cost` (lower is better in
    both), cheapest first: each step along it buys skill with more of the cost."""
    costs = {t.number: TrialRecord.of(t).value(cost) for t in trials}
    points = [t for t in trials if costs[t.number] is not None]
    front = [
        t
        for t in points
        if not any(
            score(o) <= score(t)
            and costs[o.number] <= costs[t.number]
            and (score(o) < score(t) or costs[o.number] < costs[t.number])
            for o in points
        )
    ]
    return sorted(front, key=lambda t: (costs[t.number], score(t)))


def pareto_table(config: StudyConfig, trials: list[optuna.trial.FrozenTrial]) -> Table:
    """The Pareto front of the study's `trials`, skill against the study's cost, cheapest first,
    with what each step along it gains in the objective and costs more."""
    trials = ranked(trials)
    objective, cost = config.objective, front_cost(config, trials)
    front = pareto_front(trials, cost)
    table = Table(
        title=f"study {config.name}: Pareto front of {objective} against {cost} "
        f"({len(front)} trials; none is both more skilful and cheaper; *: a reference recipe)"
    )
    predicted = cost != "predicted_peak_mb"  # also show the prediction beside another cost
    for c in ("trial", objective, "90 % interval", f"Δ {objective}", cost, f"Δ {cost}",
              *(["predicted GPU MB"] if predicted else []), "recipe"):  # fmt: skip
        table.add_column(c, justify="left" if c == "recipe" else "right")
    previous = None
    for t in front:
        a, ci = TrialRecord.of(t), interval(t, objective, lead_of(config))
        spent = a.get(cost)
        table.add_row(
            str(t.number), f"{score(t):.4f}", f"{ci[0]:.4f}–{ci[1]:.4f}" if ci else "-",
            f"{score(t) - score(previous):+.4f}" if previous else "",
            f"{spent:.1f}" if cost == "trial_seconds" else f"{spent:.0f}",
            f"{spent - TrialRecord.of(previous).get(cost):+.1f}" if previous else "",
            *([f"{a.get('predicted_peak_mb'):.0f}"] if predicted else []),
            recipe(t),
        )  # fmt: skip
        previous = t
    return table


def interval(
    trial: optuna.trial.FrozenTrial, objective: str, suffix: str = ""
) -> tuple[float, float] | None:
    """The 90 % bootstrap interval of a trial's objective (at the lead `suffix` names: '' for
    6 h, '_24h'), when it was computed."""
    return TrialRecord.of(trial).interval(objective, suffix)


def lead_of(config: StudyConfig) -> str:
    """The suffix of the study's lead in metric names ('' for 6 h, '_12h', '_24h')."""
    from aurora_sweep.config import lead_suffix

    return lead_suffix(config.lead_steps)


def paired_to(
    reference: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial], objective: str
) -> list[tuple[float, float, float] | None]:
    """For each of `trials`: its objective minus `reference`'s, with the 90 % paired block
    bootstrap interval of that difference (None where either lacks per-sample terms).

    Every trial is scored on the same validation samples, so the two forecasts' errors share the
    weather: the interval of the difference over the same resamples is much narrower than the
    overlap of two marginal intervals suggests, and is the honest test of "better".
    """
    from aurora_sweep.metrics import decode_terms, paired_difference

    ref_terms = TrialRecord.of(reference).objective_terms
    if ref_terms is None:
        return [None] * len(trials)
    ref_num, ref_den, days = decode_terms(ref_terms)
    out: list[tuple[float, float, float] | None] = []
    for t in trials:
        packed = TrialRecord.of(t).objective_terms
        if packed is None:
            out.append(None)
            continue
        num, den, their_days = decode_terms(packed)
        if len(num) != len(ref_num) or not (their_days == days).all():
            out.append(None)  # scored on other samples: not comparable pairwise
            continue
        out.append(paired_difference(objective, (num, den), (ref_num, ref_den), days))
    return out


def distinguishable(delta: tuple[float, float, float] | None) -> bool | None:
    """Whether a paired difference's 90 % interval excludes 0 (None: not computed)."""
    if delta is None:
        return None
    return not (delta[1] <= 0.0 <= delta[2])


def top_trials_table(
    config: StudyConfig, trials: list[optuna.trial.FrozenTrial], *, top: int = 10
) -> Table:
    """The `top` best completed trials of the study's `trials`, infeasible ones marked, each
    with its paired difference to the best feasible trial."""
    listed = completed(trials)
    best = next(iter(ranked(trials)), None)
    objective = config.objective
    table = Table(
        title=f"study {config.name}: best {min(top, len(listed))} of {len(listed)} completed "
        f"trials by {objective} (validation; 90 % interval; Δ best: paired difference to the best "
        f"feasible trial with its 90 % interval, ≈: it contains 0; ✗: forgets more than "
        f"×{config.max_forgetting:g}, never the answer; *: a reference recipe)"
    )
    cols = ("trial", objective, "90 % interval", "Δ best", "≈", "skill pers.", "skill clim.",
            "worst forgetting", "recipe", "peak MB", "s")  # fmt: skip
    for c in cols:
        table.add_column(c, justify="left" if c in ("recipe", "worst forgetting") else "right")
    shown = listed[:top]
    deltas = paired_to(best, shown, objective) if best else [None] * len(shown)
    sfx = lead_of(config)
    for t, delta in zip(shown, deltas):
        a = TrialRecord.of(t)
        ci = a.interval(objective, sfx)
        forgot = a.worst_forgetting(sfx)
        worst = f"{forgot[0]} ×{forgot[1]:.2f}" if forgot else "-"
        if forgets(t):
            worst = f"✗ {worst}"
        same = t is best or delta is None
        table.add_row(
            str(t.number), f"{score(t):.4f}", f"{ci[0]:.4f}–{ci[1]:.4f}" if ci else "-",
            "" if same else f"{delta[0]:+.4f} [{delta[1]:+.4f}, {delta[2]:+.4f}]",
            "" if same or distinguishable(delta) else "≈", _skill(a, "persistence" + sfx),
            _skill(a, "climatology" + sfx), worst, recipe(t),
            f"{a.get('peak_memory_mb'):.0f}", f"{a.get('trial_seconds'):.1f}",
        )  # fmt: skip
    return table


def recipe(trial: optuna.trial.FrozenTrial) -> str:
    """A trial's recipe in a few words: 'dora r8 qkv+proj u1 b2 bf16 lr3.0e-04 ckpt',
    'blocks4 b2 fp32 lr1.0e-03', 'full* b1 bf16 lr3.0e-04 ckpt' (* the reference recipe)."""
    a = TrialRecord.of(trial)
    c = a.config or {"method": a.reference or "lora", **trial.params}
    method = c.get("method", "lora")
    lora = method in ("lora", "rslora", "dora")
    words = [
        method
        + (str(c.get("unfrozen_blocks", "")) if method == "blocks" else "")
        + ("*" if a.reference else ""),
        f"r{c['lora_rank']}" if lora and "lora_rank" in c else "",
        str(c.get("lora_targets", "")) if lora else "",
        f"u{c['unfrozen_blocks']}" if lora and "unfrozen_blocks" in c else "",
        f"b{c['batch_size']}" if "batch_size" in c else "",
        str(c.get("precision", "")),
        f"lr{c['learning_rate']:.1e}" if "learning_rate" in c else "",
        "ckpt" if c.get("activation_checkpointing") else "",
    ]
    return " ".join(w for w in words if w)


def against_references(config: StudyConfig, trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """How the best of the study's `trials` compares with its reference recipes (Aurora's full
    fine-tune, plain LoRA), in the objective and in predicted peak GPU memory."""
    best = next(iter(ranked(trials)), None)
    objective, lines = config.objective, []
    for t in trials:
        a = TrialRecord.of(t)
        name = a.reference
        if not name or a.retry_of is not None and t.state.name != "COMPLETE":
            continue
        what = "Aurora's full fine-tune" if name == "full" else "plain LoRA at its defaults"
        peak = f"predicted peak {a.predicted_peak_mb:.0f} MB" if a.predicted_peak_mb else ""
        if a.infeasible:
            lines.append(f"reference {what} (trial {t.number}): infeasible, {a.infeasible}")
        elif t.state.name == "COMPLETE" and t.values:
            ci = interval(t, objective, lead_of(config))
            verdict = ""
            if best is not None and best.number != t.number:
                (delta,) = paired_to(t, [best], objective)
                verdict = (
                    f"; the best, trial {best.number}, is {score(t) - score(best):.4f} lower"
                    + _paired_words(delta)
                    + f" at predicted peak {TrialRecord.of(best).get('predicted_peak_mb'):.0f} MB"
                )
            if forgets(t):
                verdict += f"; it forgets ({a.infeasible or 'over the limit'})"
            lines.append(
                f"reference {what} (trial {t.number}): {objective} {score(t):.4f}"
                + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
                + (f", {peak}" if peak else "")
                + verdict
            )
        elif t.state.name in ("PRUNED", "FAIL", "RUNNING", "WAITING"):
            lines.append(f"reference {what} (trial {t.number}): {t.state.name.lower()}")
    return lines


def _paired_words(delta: tuple[float, float, float] | None) -> str:
    """' (paired 90 % interval of the difference [a, b]: apart)', or '…: not distinguishable'."""
    if delta is None:
        return ""
    verdict = "apart" if distinguishable(delta) else "not distinguishable"
    return (
        f" (paired 90 % interval of the difference [{delta[1]:+.4f}, {delta[2]:+.4f}]: {verdict})"
    )


def best_by_method(config: StudyConfig, trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """One line per fine-tuning method tried: its best trial's objective, interval and peak
    memory (predicted for a GPU, and measured), best method first."""
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for t in ranked(trials):  # best first: the first of each method is its best
        best.setdefault(TrialRecord.of(t).method, t)
    lines = []
    for method, t in best.items():
        a, ci = TrialRecord.of(t), interval(t, config.objective, lead_of(config))
        lines.append(
            f"best {method}: trial {t.number}, {config.objective} {score(t):.4f}"
            + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
            + f", predicted GPU peak {a.get('predicted_peak_mb'):.0f} MB, "
            f"measured {a.get('peak_memory_mb'):.0f} MB ({recipe(t)})"
        )
    return lines


def _skill(a: TrialRecord, reference: str) -> str:
    return f"{a.get(f'tp_skill_{reference}'):+.3f}"


def export_best(
    config: StudyConfig,
    target: Path,
    *,
    number: int | None = None,
    trials: list[optuna.trial.FrozenTrial] | None = None,
) -> Path:
    """Copy the best trial's adapter (or trial `number`'s, a Pareto front member say) from
    MLflow to `target` and write its model card. `trials`: the study's, when already read."""
    import mlflow

    from aurora_sweep.export import META, write_model_card

    every = study_trials(config) if trials is None else trials
    trials = ranked(every)
    if number is None and not trials:
        if completed(every):
            raise AuroraSweepError(
                f"no completed trial of study {config.name!r} keeps the model whole: each makes a "
                f"variable Aurora already predicted worse than ×{config.max_forgetting:g} the base "
                "model's RMSE ('aurora-sweep best' marks them ✗); export one anyway with --trial N, "
                "or run more trials"
            )
        raise AuroraSweepError(f"study {config.name!r} has no completed trial to export yet")
    if number is None:
        best = trials[0]
    else:  # asked for by number: any completed trial within the cap, infeasible or not
        chosen = [t for t in completed(every) if t.number == number]
        if not chosen:
            raise AuroraSweepError(
                f"trial {number} of study {config.name!r} is not a completed trial within the "
                "memory cap: 'aurora-sweep best' lists those, 'best --pareto' the front"
            )
        best = chosen[0]
    run_id = TrialRecord.of(best).mlflow_run_id
    if not run_id:
        raise AuroraSweepError(f"trial {best.number} has no MLflow run recorded")
    target = Path(target)
    if target.exists() and any(target.iterdir()) and not (target / META).exists():
        raise AuroraSweepError(
            f"{target} exists and is not an adapter directory: choose an empty one"
        )
    client_for(config)  # says so at once when the tracking server does not answer
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="adapter", dst_path=tmp
            )
        except Exception as e:
            raise AuroraSweepError(
                f"cannot read trial {best.number}'s adapter from MLflow ({type(e).__name__}); "
                + (
                    f"check --tracking-uri {config.tracking_uri}"
                    if config.tracking_uri
                    else "run this from the directory that holds mlflow.db and mlruns/, "
                    "or give the sweep's --tracking-uri"
                )
            ) from None
        if target.exists():
            shutil.rmtree(target)
        shutil.move(local, target)
    # how the exported trial compares with the study's reference recipes, for the report
    meta_path = target / META
    meta = json.loads(meta_path.read_text())
    meta["references"] = against_references(config, every)
    meta_path.write_text(json.dumps(meta, indent=2, default=str))
    write_model_card(target, study=config.name, number=best.number)
    return target


def prepare_evaluation(adapter: Path, *, split: str, checkpoint: Path | None = None):
    """The adapter's model and its study's data with `split` as the evaluation split.

    The same splits and baselines as the trial had (the model carries its own tp statistics),
    and the base model's scores on `split` for the forgetting ratios.
    """
    from aurora_sweep.data import open_cube
    from aurora_sweep.evaluation import base_state_mse
    from aurora_sweep.export import load_finetuned, read_meta
    from aurora_sweep.model import resolve_checkpoint
    from aurora_sweep.recipe import TrialConfig
    from aurora_sweep.train import TrialData, default_device

    if split not in ("validation", "test"):
        raise AuroraSweepError(f"--split {split!r}: use validation or test")
    adapter = Path(adapter)
    meta = read_meta(adapter)
    config = load_config(adapter / "study.toml")
    trial = TrialConfig.from_dict(meta["trial"])
    data = TrialData.prepare(open_cube(config), config, eval_split=split)
    device = default_device()
    model = load_finetuned(adapter, checkpoint=checkpoint, device=str(device))
    path = resolve_checkpoint(trial.base, checkpoint)
    data.base_mse = {  # by lead, in the trial's precision
        trial.precision: base_state_mse(
            data,
            base=trial.base,
            checkpoint=path,
            device=device,
            precision=trial.precision,
            wrap_longitude=trial.wrap_longitude,
        )  # fmt: skip
    }
    return model, data, trial, meta, device


def verify_prepared(model, data, trial, device, *, bootstrap: int):
    """`evaluation.verify` of a prepared adapter on its whole evaluation split, batched as its
    trial was scored (so the scores reproduce the trial's)."""
    from aurora_sweep.evaluation import eval_batch_size, verify

    batch = eval_batch_size(trial.batch_size, device)
    return verify(
        model, data, batch_size=batch, device=device, bootstrap=bootstrap,
        precision=trial.precision,
    )  # fmt: skip


def evaluate_adapter(
    adapter: Path,
    *,
    split: str,
    checkpoint: Path | None = None,
    bootstrap: int = 1000,
    lead: str | None = None,
) -> dict:
    """Score an exported adapter on the whole of `split` with its study's data: every lead's
    scores, or with `lead` ('12h', '24h') that lead's alone under the 6-hour names."""
    from aurora_sweep.config import LEADS, lead_suffix, parse_lead

    steps = parse_lead(lead, "--lead") if lead is not None else None
    model, data, trial, _, device = prepare_evaluation(adapter, split=split, checkpoint=checkpoint)
    if steps is not None and steps not in data.leads:
        raise AuroraSweepError(f"the {split} split holds no {lead} sample to score")
    scores, _ = verify_prepared(model, data, trial, device, bootstrap=bootstrap)
    if steps is None:
        return {**scores, "split": split, "samples": len(data.validation)}
    sfx = lead_suffix(steps)
    longer = tuple(lead_suffix(k) for k in LEADS if k > 1)
    names = [k for k in scores if not k.endswith(longer)]
    picked = {k: scores[k + sfx] for k in names if k + sfx in scores}
    return {**picked, "split": split, "lead": lead, "samples": len(data.leads[steps])}


#: The report's score rows: (metric name, label, higher is better; None: closest to `target`).
def score_rows_spec() -> list[tuple[str, str, bool | None, float | None]]:
    from aurora_sweep.metrics import CATEGORICAL_THRESHOLDS_MM, FSS_THRESHOLDS_MM, FSS_WINDOWS

    rows: list[tuple[str, str, bool | None, float | None]] = [
        ("tp_seeps", "SEEPS (0 perfect, 1 ≈ climatology)", False, None),
        ("tp_rmse", "RMSE (mm per 6 h)", False, None),
        ("tp_mae", "MAE (mm per 6 h)", False, None),
        ("tp_bias", "bias (mm per 6 h, 0 best)", None, 0.0),
    ]
    for t in CATEGORICAL_THRESHOLDS_MM:
        rows += [
            (f"tp_csi_{t:g}", f"CSI ≥ {t:g} mm", True, None),
            (f"tp_ets_{t:g}", f"ETS ≥ {t:g} mm", True, None),
            (f"tp_fbias_{t:g}", f"frequency bias ≥ {t:g} mm (1 best)", None, 1.0),
        ]
    for t in FSS_THRESHOLDS_MM:
        for w in FSS_WINDOWS:
            rows.append((f"tp_fss_{t:g}_w{w}", f"FSS ≥ {t:g} mm, {w}×{w} points", True, None))
    return rows


def report_rows(scores: dict[str, float], objective: str) -> list[dict]:
    """The scores table: each score for the model and both baselines, intervals where known."""
    rows = []
    for name, label, higher, target in score_rows_spec():
        if name not in scores:
            continue
        row = {
            "score": name, "label": label, "model": scores[name],
            "q05": scores.get(f"{name}_q05"), "q95": scores.get(f"{name}_q95"),
            "persistence": scores.get(f"{name}_persistence"),
            "climatology": scores.get(f"{name}_climatology"),
            "higher_is_better": bool(higher), "target": target,
        }  # fmt: skip
        rows.append(row)
    for ref in ("persistence", "climatology"):
        name = f"tp_skill_{ref}"
        rows.append({
            "score": name, "label": f"skill vs {ref} (1 − {objective}/{objective}_{ref})",
            "model": scores[name], "q05": scores.get(f"{name}_q05"),
            "q95": scores.get(f"{name}_q95"), "persistence": None, "climatology": None,
            "higher_is_better": True, "target": None,
        })  # fmt: skip
    return rows


def forgetting_rows(scores: dict[str, float], base_mse: dict[str, float]) -> list[dict]:
    """Per variable: base RMSE, fine-tuned RMSE and their ratio at 6 h (> 1: the fine-tune made
    it worse), and the ratio at each longer lead scored (`ratio_12h`, `ratio_24h`)."""
    from aurora_sweep.config import LEADS

    rows = []
    for name, mse in base_mse.items():
        ratio = scores.get(f"forget_{name}_ratio")
        if ratio is None:
            continue
        base = float(mse) ** 0.5
        row = {"variable": name, "base_rmse": base, "finetuned_rmse": base * ratio, "ratio": ratio}
        for label in list(LEADS.values())[1:]:
            if f"forget_{name}_ratio_{label}" in scores:
                row[f"ratio_{label}"] = scores[f"forget_{name}_ratio_{label}"]
        rows.append(row)
    return rows


def lead_rows(scores: dict[str, float], objective: str) -> list[dict]:
    """One row per lead scored: the objective with its interval, both baselines' objective, the
    skills and the worst forgetting ratio."""
    from aurora_sweep.config import LEADS, lead_suffix

    rows = []
    for steps, label in LEADS.items():
        sfx = lead_suffix(steps)
        if objective + sfx not in scores:
            continue
        lo, hi = scores.get(f"{objective}_q05{sfx}"), scores.get(f"{objective}_q95{sfx}")
        worst = worst_forgetting(scores, sfx)
        rows.append({
            "lead": label, "objective": f"{scores[objective + sfx]:.4f}",
            "90 % interval": f"{lo:.4f}–{hi:.4f}" if lo is not None and hi is not None else "",
            "persistence": f"{scores[f'{objective}_persistence{sfx}']:.4f}",
            "climatology": f"{scores[f'{objective}_climatology{sfx}']:.4f}",
            "skill vs persistence": f"{scores['tp_skill_persistence' + sfx]:+.3f}",
            "skill vs climatology": f"{scores['tp_skill_climatology' + sfx]:+.3f}",
            "worst forgetting": f"{worst[0]} ×{worst[1]:.2f}" if worst else "",
        })  # fmt: skip
    return rows


def nearest_point(samples, lat: float, lon: float) -> tuple[int, int]:
    """Row and column of the grid point nearest (lat, lon); refuses a point off the region."""
    import numpy as np

    lats = samples.cube["latitude"].values
    lons = samples.cube["longitude"].values
    dlon = (lons - lon + 180.0) % 360.0 - 180.0  # -5 and 355 are the same meridian
    i, j = int(np.abs(lats - lat).argmin()), int(np.abs(dlon).argmin())
    step = abs(float(lats[0] - lats[1])) if lats.size > 1 else 1.0
    if abs(lats[i] - lat) > step or abs(dlon[j]) > step:
        raise AuroraSweepError(
            f"--point {lat:g},{lon:g} lies outside the region ({lats.min():g}..{lats.max():g}°N, "
            f"{lons.min():g}..{lons.max():g}°E); pick a point inside it"
        )
    return i, j


def report_adapter(
    adapter: Path,
    *,
    split: str,
    out: Path,
    point: tuple[float, float] | None = None,
    checkpoint: Path | None = None,
    bootstrap: int = 1000,
) -> Path:
    """Write one self-contained HTML page verifying an exported adapter on `split`."""
    import datetime as dt

    from aurora_sweep import figures as fg
    from aurora_sweep.dataset import climatology_forecast
    from aurora_sweep.evaluation import case_maps_png
    from aurora_sweep.report import write_report

    if point is not None and not (-90 <= point[0] <= 90):
        raise AuroraSweepError(f"--point {point[0]:g},{point[1]:g}: latitude must be in -90..90")
    model, data, trial, meta, device = prepare_evaluation(
        adapter, split=split, checkpoint=checkpoint
    )
    samples = data.validation
    ij = nearest_point(samples, *point) if point is not None else None
    scores, fc = verify_prepared(model, data, trial, device, bootstrap=bootstrap)
    times = samples.target_times()[fc.indices]
    observed = samples.observed(fc.indices)
    baselines = {
        "persistence": samples.persistence(fc.indices),
        "climatology": climatology_forecast(data.climatology, times),
    }
    pngs = {"cases.png": case_maps_png(samples, fc)}
    pngs["reliability.png"] = fg.png_bytes(fg.reliability({"model": fc.tp, **baselines}, observed))
    if ij is not None:
        i, j = ij
        lat, lon = samples.cube["latitude"].values[i], samples.cube["longitude"].values[j]
        series = {"observed": observed[:, i, j], "forecast": fc.tp[:, i, j]}
        series |= {k: v[:, i, j] for k, v in baselines.items()}
        pngs["point_series.png"] = fg.png_bytes(
            fg.point_series(times, series, title=f"grid point {lat:.2f}°N, {lon:.2f}°E")
        )
    history = meta.get("history") or {}
    if history.get("train_loss"):
        pngs["loss_curves.png"] = fg.png_bytes(
            fg.loss_curves(history["train_loss"], history.get("val_loss", []))
        )
    data_meta = meta.get("data", {})
    recipe = {
        **trial.to_dict(),
        "base checkpoint": f"{meta['base']['checkpoint']} (sha256 {meta['base']['sha256'][:12]}…)",
        "region": data_meta.get("region", "?"),
        "objective": data.objective,
    }
    objective = data.objective
    notes = [
        *(
            f"Against the study's reference recipes (validation split): {line}"
            for line in meta.get("references", [])
        ),
        f"{len(samples)} samples of the {split} split ({times.min():%Y-%m-%d} to "
        f"{times.max():%Y-%m-%d}); 6-hour totals in mm; scores latitude-weighted where it applies.",
        "Intervals: 90 % paired block bootstrap over days (blocks of consecutive days keep the "
        "day-to-day correlation). 'within noise': better than both baselines, but the interval "
        "reaches one of them.",
        "Persistence repeats the last observed 6-hour total; climatology is the train-split mean by "
        "grid point, calendar month and time of day.",
        "SEEPS: dry at most 0.1 mm (WeatherBench 2's threshold for 6-hour totals); dry "
        "probability and light/heavy threshold per grid point, month and hour of day from the "
        "train split (not WeatherBench 2's 30-year climate); points with a dry probability "
        "outside 0.1..0.85 are left out.",
        "Forgetting: RMSE of the fine-tuned model over that of the untouched base model on the "
        "same samples, for the variables Aurora already predicted (> 1: worse than before).",
    ]
    return write_report(
        Path(out),
        title=f"{Path(adapter).resolve().name}: 6-hour precipitation from Aurora",
        subtitle=(
            f"{split} split, {objective} {scores[objective]:.4f}; base {trial.base}; "
            f"levels {', '.join(map(str, trial.levels))} hPa; made {dt.date.today()}"
        ),
        recipe=recipe,
        scores=report_rows(scores, objective),
        forgetting=forgetting_rows(scores, data.base_mse[trial.precision]["6h"]),
        leads=lead_rows(scores, objective),
        figures=pngs,
        notes=notes,
    )
