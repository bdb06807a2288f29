"""The study's trials, ranked: the feasible best first, the Pareto front of skill against a cost,
paired differences to the best and to the reference recipes, and the tables `best` prints.

Everything here reads Optuna's storage through `records.TrialRecord`; nothing trains or loads a
model.
"""

from __future__ import annotations

import optuna
from rich.table import Table

from aurora_sweep.config.objective import Objective
from aurora_sweep.config.recipe import LORA_METHODS, lead_suffix
from aurora_sweep.config.settings import text_levels
from aurora_sweep.config.study import StudyConfig
from aurora_sweep.sweep.records import TrialRecord, completed, forgets, ranked, score
from aurora_sweep.sweep.storage import open_study
from aurora_sweep.verify.bootstrap import decode_terms, paired_difference


def study_trials(config: StudyConfig) -> list[optuna.trial.FrozenTrial]:
    """Every trial of the study, read from its storage once for all the views below."""
    return open_study(config, create=False).get_trials(deepcopy=False)


def ranked_trials(config: StudyConfig) -> list[optuna.trial.FrozenTrial]:
    """Completed trials within the memory cap, best (lowest objective) first."""
    return ranked(study_trials(config))


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
    for c in (
        "trial",
        objective.name,
        "90 % interval",
        f"Δ {objective}",
        cost,
        f"Δ {cost}",
        *(["predicted GPU MB"] if predicted else []),
        "recipe",
    ):
        table.add_column(c, justify="left" if c == "recipe" else "right")
    previous = None
    for t in front:
        a, ci = TrialRecord.of(t), interval(t, scored(config))
        spent = a.get(cost)
        table.add_row(
            str(t.number),
            f"{score(t):.4f}",
            f"{ci[0]:.4f}–{ci[1]:.4f}" if ci else "-",
            f"{score(t) - score(previous):+.4f}" if previous else "",
            f"{spent:.1f}" if cost == "trial_seconds" else f"{spent:.0f}",
            f"{spent - TrialRecord.of(previous).get(cost):+.1f}" if previous else "",
            *([f"{a.get('predicted_peak_mb'):.0f}"] if predicted else []),
            recipe(t),
        )
        previous = t
    return table


def interval(trial: optuna.trial.FrozenTrial, objective: Objective) -> tuple[float, float] | None:
    """The 90 % bootstrap interval of a trial's `objective` (at its lead), when it was
    computed."""
    return TrialRecord.of(trial).interval(objective)


def scored(config: StudyConfig) -> Objective:
    """The study's objective at the study's lead (`tp_seeps_24h`)."""
    return config.objective.at(config.lead_steps)


def lead_of(config: StudyConfig) -> str:
    """The suffix of the study's lead in metric names ('' for 6 h, '_12h', '_24h')."""
    return lead_suffix(config.lead_steps)


def paired_to(
    reference: optuna.trial.FrozenTrial,
    trials: list[optuna.trial.FrozenTrial],
    objective: Objective,
) -> list[tuple[float, float, float] | None]:
    """For each of `trials`: its objective minus `reference`'s, with the 90 % paired block
    bootstrap interval of that difference (None where either lacks per-sample terms).

    Every trial is scored on the same validation samples, so the two forecasts' errors share the
    weather: the interval of the difference over the same resamples is much narrower than the
    overlap of two marginal intervals suggests, and is the honest test of "better".
    """
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
        f"×{config.max_forgetting:g}, never the answer; *: a reference recipe; verify: the "
        "share of its seconds spent scoring it on the whole split)"
    )
    zero_shot = "aurora-1.5" in config.baselines
    cols = (
        "trial",
        objective.name,
        "90 % interval",
        "Δ best",
        "≈",
        "skill pers.",
        "skill clim.",
        *(("skill A1.5",) if zero_shot else ()),
        "worst forgetting",
        "recipe",
        "peak MB",
        "s",
        "verify",
    )
    for c in cols:
        table.add_column(c, justify="left" if c in ("recipe", "worst forgetting") else "right")
    shown = listed[:top]
    deltas = paired_to(best, shown, objective) if best else [None] * len(shown)
    at = scored(config)
    for t, delta in zip(shown, deltas):
        same = t is best or delta is None
        table.add_row(*_top_row(t, None if same else delta, at, zero_shot=zero_shot))
    if zero_shot and shown:  # the baseline itself: the same samples for every trial
        value = TrialRecord.of(shown[0]).value(at.of("aurora15"))
        if value is not None:
            what = "Aurora 1.5 untrained (zero-shot baseline)"
            table.add_row("A1.5", f"{value:.4f}", "-", *[""] * 5, "-", what, "", "", "")
    return table


def _top_row(
    t: optuna.trial.FrozenTrial,
    delta: tuple[float, float, float] | None,
    objective: Objective,
    *,
    zero_shot: bool,
) -> tuple[str, ...]:
    """A trial's row of `top_trials_table`: its `objective` (at the study's lead) with its
    interval, its paired difference to the best (`delta`; None: the best itself, or not
    comparable), its skills, worst forgetting, recipe and costs."""
    a = TrialRecord.of(t)
    ci = a.interval(objective)
    forgot = a.worst_forgetting(lead_suffix(objective.lead))
    worst = f"{forgot[0]} ×{forgot[1]:.2f}" if forgot else "-"
    if forgets(t):
        worst = f"✗ {worst}"
    return (
        str(t.number),
        f"{score(t):.4f}",
        f"{ci[0]:.4f}–{ci[1]:.4f}" if ci else "-",
        "" if delta is None else f"{delta[0]:+.4f} [{delta[1]:+.4f}, {delta[2]:+.4f}]",
        "" if delta is None or distinguishable(delta) else "≈",
        _skill(a, objective, "persistence"),
        _skill(a, objective, "climatology"),
        *((_skill(a, objective, "aurora15"),) if zero_shot else ()),
        worst,
        recipe(t),
        f"{a.get('peak_memory_mb'):.0f}",
        f"{a.get('trial_seconds'):.1f}",
        verify_share(a),
    )


def verify_share(record: TrialRecord) -> str:
    """The share of a trial's seconds spent verifying it ("-": not recorded)."""
    spent, total = record.value("verify_seconds"), record.value("trial_seconds")
    return f"{spent / total:.0%}" if spent is not None and total else "-"


def stopped_scoring(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """`best`'s line on the trials whose scoring stopped (`verify.early_stop`): not in its
    table, their scores being over fewer days than the rest's."""
    stopped = [(t.number, a.partial) for t in trials if (a := TrialRecord.of(t)).partial]
    if not stopped:
        return []
    each = ", ".join(
        f"{n} ({p['value']:.4f} over {p['days']:.0f} of {p['of']:.0f} days"
        + (f"; forgets {p['forgets']} ×{p['ratio']:.2f})" if p.get("forgets") else ")")
        for n, p in stopped
    )
    return [
        f"{len(stopped)} trial(s) stopped while scoring, worse than the best or forgetting on "
        f"the days scored; partial scores, never the answer: {each}"
    ]


def recipe(trial: optuna.trial.FrozenTrial) -> str:
    """A trial's recipe in a few words: 'dora r8 qkv+proj u1 b2 bf16 lr3.0e-04 ckpt',
    'blocks4 b2 fp32 lr1.0e-03', 'full* b1 bf16 lr3.0e-04 ckpt' (* the reference recipe)."""
    a = TrialRecord.of(trial)
    c = a.config or {"method": a.reference or "lora", **trial.params}
    method = c.get("method", "lora")
    lora = method in LORA_METHODS
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
        _checkpointing_word(c),
        f"tile{c['tile']}" if c.get("tile") else "",
        f"x{c['accumulate']}" if c.get("accumulate", 1) > 1 else "",
        "adafactor" if c.get("optimizer") == "adafactor" else "",
        # the levels, where the study searches them
        _levels_word(c.get("levels", trial.params["levels"])) if "levels" in trial.params else "",
    ]
    return " ".join(w for w in words if w)


def _levels_word(levels: list | str) -> str:
    """'500+850hPa' for the levels a trial trained on (a list, or Optuna's '500,850')."""
    values = text_levels(levels) if isinstance(levels, str) else levels
    return "+".join(str(v) for v in values) + "hPa"


def _checkpointing_word(c: dict) -> str:
    """'ckpt' for Aurora's whole set, 'ckpt:blocks' or 'ckpt:blocks+io' for the lighter sets
    "auto" may choose, 'ckpt-auto' for a trial not yet planned."""
    from aurora_sweep.config.recipe import AURORA_CHECKPOINTING, AUTO_CHECKPOINTING

    on = c.get("activation_checkpointing")
    if on == "auto":
        return "ckpt-auto"
    if on is not True:
        return ""
    names = {
        (): "ckpt",
        AURORA_CHECKPOINTING: "ckpt",
        AUTO_CHECKPOINTING[1]: "ckpt:blocks",
        AUTO_CHECKPOINTING[2]: "ckpt:blocks+io",
    }
    modules = tuple(c.get("checkpoint_modules") or ())
    return names.get(modules, "ckpt:" + "+".join(modules))


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
            ci = interval(t, scored(config))
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
    memory (predicted for a GPU, and measured), best method first; and, in a study that
    searches several bases, one line per base."""
    lines = _best_lines(config, trials, lambda a: a.method)
    if len(config.bases) > 1:
        lines += _best_lines(config, trials, lambda a: f"on {a.base or config.model.base}")
    return lines


def _best_lines(config: StudyConfig, trials, group) -> list[str]:
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for t in ranked(trials):  # best first: the first of each group is its best
        best.setdefault(group(TrialRecord.of(t)), t)
    lines = []
    for name, t in best.items():
        a, ci = TrialRecord.of(t), interval(t, scored(config))
        lines.append(
            f"best {name}: trial {t.number}, {config.objective} {score(t):.4f}"
            + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
            + f", predicted GPU peak {a.get('predicted_peak_mb'):.0f} MB, "
            f"measured {a.get('peak_memory_mb'):.0f} MB ({recipe(t)})"
        )
    return lines


def _skill(a: TrialRecord, objective: Objective, reference: str) -> str:
    return f"{a.get(objective.skill(reference)):+.3f}"


def skill_and_cost(
    config: StudyConfig, trials: list[optuna.trial.FrozenTrial]
) -> tuple[str, list[dict], bool]:
    """The study's cost (peak memory unless it names another), and for each completed trial
    within the cap that has it: its number, skill against climatology, cost, recipe and whether
    it lies on the Pareto front; and whether any trial ran on a GPU."""
    complete = ranked(trials)
    cost = front_cost(config, complete)
    records = {t.number: TrialRecord.of(t) for t in complete}
    complete = [t for t in complete if records[t.number].value(cost) is not None]
    front = {t.number for t in pareto_front(complete, cost)} if complete else set()
    points = [
        {
            "number": t.number,
            "skill": records[t.number].get(config.objective.skill("climatology")),
            "peak_mb": records[t.number].value(cost),
            "label": recipe(t),
            "front": t.number in front,
        }
        for t in complete
    ]
    return cost, points, any(r.on_gpu for r in records.values())
