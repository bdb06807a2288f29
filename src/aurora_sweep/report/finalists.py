"""The finalists, ranked by their mean over seeds: what `best` says the study's answer is.

Each finalist (`sweep.finalists`) is one recipe trained with several seeds. Its objective is the
mean over its seeds, with a 90 % interval that holds both the day-to-day sampling and the
seed-to-seed spread (`bootstrap.over_seeds`); the first two are compared by the paired difference
of their means, over the same days. The adapter `best --export` writes for the winner is the seed
nearest the winner's mean: a typical draw of the recipe, not its luckiest.

A recipe that forgets beyond `[study] max_forgetting` with any of its seeds does not keep Aurora
whole reliably: it ranks after every finalist that does with all of them, whatever its mean, and
`best` marks it; no seed that forgets is ever the one exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import optuna

from aurora_sweep.config.study import StudyConfig
from aurora_sweep.report.best import scored
from aurora_sweep.sweep.finalists import finalists, seeds_of
from aurora_sweep.sweep.records import TrialRecord, forgets, score
from aurora_sweep.verify.bootstrap import decode_terms, over_seeds


@dataclass(frozen=True)
class Finalist:
    """One recipe and its seeds' trials (the search's first), their objectives, and the mean."""

    trials: list
    values: list[float]
    mean: float
    interval: tuple[float, float] | None
    #: each seed's per-sample objective terms and their days (`_terms`); None: not comparable
    terms: tuple[list, np.ndarray] | None = field(default=None, repr=False)

    @property
    def number(self) -> int:
        return self.trials[0].number

    @property
    def spread(self) -> float:
        """The seeds' standard deviation (0 for one seed)."""
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    @property
    def forgetting(self) -> list:
        """The seeds' trials that forget beyond the study's limit."""
        return [t for t in self.trials if forgets(t)]

    @property
    def typical(self) -> optuna.trial.FrozenTrial:
        """The seed's trial nearest the mean, among those that keep the model whole where any
        does: the adapter a user should expect of the recipe."""
        whole = [t for t in self.trials if not forgets(t)] or self.trials
        return min(whole, key=lambda t: (abs(score(t) - self.mean), t.number))


def ranked_finalists(config: StudyConfig, trials: list) -> list[Finalist]:
    """The study's finalists with at least two seeds done, best mean first; those with a seed
    that forgets after every one that keeps the model whole."""
    objective = scored(config)
    out = []
    for finalist in finalists(config, trials):
        seeds = seeds_of(finalist, trials)
        if len(seeds) < 2:
            continue
        values = [score(t) for t in seeds]
        terms = _terms(seeds)
        ci = None
        if terms is not None:
            ci = tuple(over_seeds(objective, terms[0], terms[1])[1:])
        out.append(Finalist(seeds, values, float(np.mean(values)), ci, terms))
    return sorted(out, key=lambda f: (bool(f.forgetting), f.mean, f.number))


def _terms(seeds: list) -> tuple[list, np.ndarray] | None:
    """Each seed's per-sample terms and their days, when every seed has them on the same days."""
    packed = [TrialRecord.of(t).objective_terms for t in seeds]
    if any(p is None for p in packed):
        return None
    decoded = [decode_terms(p) for p in packed]
    days = decoded[0][2]
    if any(len(d) != len(days) or not (d == days).all() for _, _, d in decoded):
        return None
    return [(num, den) for num, den, _ in decoded], days


def runner_up_difference(config: StudyConfig, ranked: list[Finalist]):
    """The winner's mean minus the runner-up's, with its 90 % interval over days and seeds."""
    if len(ranked) < 2:
        return None
    first, second = ranked[0].terms, ranked[1].terms
    if first is None or second is None or len(first[1]) != len(second[1]):
        return None
    if not (first[1] == second[1]).all():
        return None
    return over_seeds(scored(config), first[0], first[1], second[0])


def _forgetting_words(config: StudyConfig, finalist: Finalist) -> list[str]:
    """The line under a finalist that forgets with some seed: which, what and by how much."""
    from aurora_sweep.config.recipe import lead_suffix

    said = []
    for t in finalist.forgetting:
        worst = TrialRecord.of(t).worst_forgetting(lead_suffix(config.lead_steps))
        what = f"{worst[0]} ×{worst[1]:.2f}" if worst else "a variable"
        said.append(f"trial {t.number} (seed {TrialRecord.of(t).seed}) forgets {what}")
    if not said:
        return []
    return [
        f"     ✗ {'; '.join(said)} (max ×{config.max_forgetting:g}): the recipe does not keep "
        "Aurora whole with every seed, so it ranks after those that do"
    ]


def finalist_lines(config: StudyConfig, trials: list, recipe) -> list[str]:
    """What `best` says of the finalists: each one's mean ± seed spread and interval, whether
    the winner is apart from the runner-up, and whether the single-seed winner stayed it."""
    ranked = ranked_finalists(config, trials)
    if not ranked:
        return []
    name = config.objective_metric
    lines = [
        f"finalists, each trained with {len(ranked[0].trials)} seeds ({name}: mean over seeds "
        "± their standard deviation; 90 % interval over days and seeds):"
    ]
    for i, f in enumerate(ranked, 1):
        ci = f" [{f.interval[0]:.4f}, {f.interval[1]:.4f}]" if f.interval else ""
        seeds = ", ".join(f"{v:.4f}" for v in f.values)
        lines.append(
            f"  {i}. trial {f.number}: {f.mean:.4f} ± {f.spread:.4f}{ci} (seeds {seeds}; "
            f"{recipe(f.trials[0])})"
        )
        lines += _forgetting_words(config, f)
    delta = runner_up_difference(config, ranked)
    if delta is not None:
        apart = "apart" if delta[1] > 0 or delta[2] < 0 else "not apart: a draw of the seeds"
        lines.append(
            f"  trial {ranked[0].number} against trial {ranked[1].number}: {delta[0]:+.4f} "
            f"[{delta[1]:+.4f}, {delta[2]:+.4f}], {apart}"
        )
    single = finalists(config, trials)[0].number
    lines.append(
        f"  the single-seed winner, trial {single}, "
        + ("stayed the winner" if single == ranked[0].number else "did not stay the winner")
    )
    return lines
