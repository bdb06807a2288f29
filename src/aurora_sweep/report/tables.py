"""The report's tables as rows (`html.render_report` draws them): every score of the model against
the baselines, by lead and region, what the fine-tune changed, and the notes that define them."""

from __future__ import annotations

from collections.abc import Sequence

from aurora_sweep.config.objective import Objective, forget_name
from aurora_sweep.config.targets import DEFAULT, TARGETS, Target
from aurora_sweep.sweep.records import worst_forgetting


def score_rows_spec(target: Target) -> list[tuple[str, str, bool | None, float | None]]:
    """The scores table's rows for `target`: (metric, label, higher is better, best value)."""
    from aurora_sweep.verify.metrics import FSS_WINDOWS

    u, m = target.units, target.metric
    rows: list[tuple[str, str, bool | None, float | None]] = [
        (m("seeps"), "SEEPS (0 perfect, 1 ≈ climatology)", False, None),
        (m("rmse"), f"RMSE ({u})", False, None),
        (m("mae"), f"MAE ({u})", False, None),
        (m("bias"), f"bias ({u}, 0 best)", None, 0.0),
        (m("acc"), "anomaly correlation (1 perfect, 0 ≈ climatology)", True, None),
    ]
    for t in target.thresholds:
        rows += [
            (m(f"csi_{t:g}"), f"CSI ≥ {t:g} {u}", True, None),
            (m(f"ets_{t:g}"), f"ETS ≥ {t:g} {u}", True, None),
            (m(f"fbias_{t:g}"), f"frequency bias ≥ {t:g} {u} (1 best)", None, 1.0),
        ]
    for t in target.fss_thresholds:
        for w in FSS_WINDOWS:
            rows.append((m(f"fss_{t:g}_w{w}"), f"FSS ≥ {t:g} {u}, {w}×{w} points", True, None))
    return rows


def report_rows(scores: dict[str, float], objective: Objective) -> list[dict]:
    """The scores table: each score for the model and both baselines, intervals where known."""
    rows = []
    for name, label, higher, target in score_rows_spec(objective.variable):
        if name not in scores:
            continue
        row = {
            "score": name,
            "label": label,
            "model": scores[name],
            "q05": scores.get(f"{name}_q05"),
            "q95": scores.get(f"{name}_q95"),
            "persistence": scores.get(f"{name}_persistence"),
            "climatology": scores.get(f"{name}_climatology"),
            "higher_is_better": bool(higher),
            "target": target,
        }
        rows.append(row)
    for ref in ("persistence", "climatology", "aurora15"):
        name = objective.skill(ref)
        if name not in scores:  # Aurora 1.5 untrained: where the study has that baseline
            continue
        rows.append(
            {
                "score": name,
                "label": f"skill vs {ref} (1 − {objective}/{objective.of(ref)})",
                "model": scores[name],
                "q05": scores.get(objective.skill(ref, "q05")),
                "q95": scores.get(objective.skill(ref, "q95")),
                "persistence": None,
                "climatology": None,
                "higher_is_better": True,
                "target": None,
            }
        )
    return rows


def forgetting_rows(scores: dict[str, float], base_mse: dict[str, float]) -> list[dict]:
    """Per variable: base RMSE, fine-tuned RMSE and their ratio at 6 h (> 1: the fine-tune made
    it worse), and the ratio at each longer lead scored (`ratio_12h`, `ratio_24h`)."""
    from aurora_sweep.config.recipe import LEADS, lead_suffix

    rows = []
    for name, mse in base_mse.items():
        ratio = scores.get(forget_name(name))
        if ratio is None:
            continue
        base = float(mse) ** 0.5
        row = {"variable": name, "base_rmse": base, "finetuned_rmse": base * ratio, "ratio": ratio}
        for steps, label in list(LEADS.items())[1:]:
            later = forget_name(name, lead_suffix(steps))
            if later in scores:
                row[f"ratio_{label}"] = scores[later]
        rows.append(row)
    return rows


def lead_rows(scores: dict[str, float], objective: Objective) -> list[dict]:
    """One row per lead scored and region (the whole box, then its interior where scored): the
    objective with its interval, the baselines' objective, the skills and (on the whole box)
    the worst forgetting ratio."""
    from aurora_sweep.config.recipe import LEADS, lead_suffix

    rows = []
    for steps, label in LEADS.items():
        for interior in (False, True):
            at = objective.at(steps).on(interior)
            if at.name not in scores:
                continue
            lo, hi = scores.get(at.of("q05")), scores.get(at.of("q95"))
            worst = None if interior else worst_forgetting(scores, lead_suffix(steps))
            rows.append(
                {
                    "lead": label,
                    "region": at.region,
                    "objective": f"{scores[at.name]:.4f}",
                    "90 % interval": f"{lo:.4f}–{hi:.4f}"
                    if lo is not None and hi is not None
                    else "",
                    "persistence": f"{scores[at.of('persistence')]:.4f}",
                    "climatology": f"{scores[at.of('climatology')]:.4f}",
                    "skill vs persistence": f"{scores[at.skill('persistence')]:+.3f}",
                    "skill vs climatology": f"{scores[at.skill('climatology')]:+.3f}",
                    "worst forgetting": f"{worst[0]} ×{worst[1]:.2f}" if worst else "",
                }
            )
            if at.of("aurora15") in scores:  # the zero-shot Aurora 1.5 baseline
                rows[-1]["Aurora 1.5"] = f"{scores[at.of('aurora15')]:.4f}"
                rows[-1]["skill vs Aurora 1.5"] = f"{scores[at.skill('aurora15')]:+.3f}"
    return rows


def report_notes(
    references: Sequence[str],
    n_samples: int,
    split: str,
    times,
    adapted: str = "",
    target: Target = TARGETS[DEFAULT],
) -> list[str]:
    """The report's notes: how the adapter compares with the study's references, what was
    adapted (`adapted`, `bases.target_description`), what was scored (`target`), and how each
    score and baseline is defined."""
    seeps = (
        [
            f"SEEPS: dry at most {target.per_lead(0.1, 6):g} {target.units} (WeatherBench 2's 0.1 mm "
            "for 6-hour totals); dry probability and light/heavy threshold per grid point, month and "
            "hour of day from the train split (not WeatherBench 2's 30-year climate); points with a "
            "dry probability outside 0.1..0.85 are left out."
        ]
        if target.seeps
        else []
    )
    return [
        *([adapted] if adapted else []),
        *(
            f"Against the study's reference recipes (validation split): {line}"
            for line in references
        ),
        f"{n_samples} samples of the {split} split ({times.min():%Y-%m-%d} to "
        f"{times.max():%Y-%m-%d}); {target.name}: {target.what}, {target.each_step}, in "
        f"{target.units}; scores latitude-weighted where it applies.",
        "Intervals: 90 % paired block bootstrap over days (blocks of consecutive days keep the "
        "day-to-day correlation). 'within noise': better than both baselines, but the interval "
        "reaches one of them.",
        "Persistence repeats what was observed when the forecast starts (the value then, or "
        "over the lead's length ending then); climatology is the train-split mean by grid point, "
        "calendar month and time of day.",
        *seeps,
        "Forgetting: RMSE of the fine-tuned model over that of the untouched base model on the "
        "same samples, for the variables Aurora already predicted (> 1: worse than before).",
    ]
