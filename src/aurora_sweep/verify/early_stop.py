"""Scoring that stops for a recipe that cannot win: the validation days in blocks, a paired test
after each.

Scoring a completed trial on the whole validation split at every lead costs about as much as
training it, and most trials scored are not the study's answer. So a trial is scored block by
block (`scoring_blocks`: the 6-hour samples grouped by their valid day, the days in one shuffled
order every trial shares, cut into blocks), and after each block its per-day objective is
compared, day by day, with the best feasible trial's on the same samples (`cannot_win`). The
test is Optuna's `WilcoxonPruner`'s, with the days as its problem instances: a one-sided
Wilcoxon signed-rank test of the daily differences (`zero_method="zsplit"`), and no stop while
the trial's mean over those days is not worse than the best's. A trial that cannot win stops
there and is recorded as pruned, with its objective over the days scored, labelled as partial.

Forgetting is judged on the same days with the same care (`forgets`): after each block, every
variable Aurora already predicts is tested, day by day, against the untouched base model's
error on the same samples; a trial that makes one worse than `[study] max_forgetting` beyond
doubt can never be the answer, and its scoring stops there too. The base model's errors by day
are made once per study with its other scores (`encode_daily`).

Every trial that goes on is scored on every day at every lead, so its scores are the same as
without the test; the finalists' replicas and the reference recipes are always scored whole.

A leaf: NumPy and SciPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from aurora_sweep.config.objective import Objective
from aurora_sweep.verify.bootstrap import objective_from, pack, unpack

#: the most blocks the validation days are cut into; a trial is tested after each but the last
BLOCKS = 8


def block_count(samples: int, batch_size: int) -> int:
    """How many blocks a split of `samples` 6-hour samples is scored in, at `batch_size`
    samples a forward pass: `BLOCKS`, fewer where a block would hold less than two full passes
    (a block's samples are rolled out to their own leads, in passes of their own: small
    blocks make small passes, and a survivor pays for them), at least 2."""
    return max(2, min(BLOCKS, samples // (2 * batch_size)))


#: days scored by both trials before the test may stop one (Wilcoxon's test on fewer days
#: cannot reach p < 0.1 unless nearly every day agrees)
MIN_DAYS = 8


class ScoringStopped(Exception):
    """A trial's scoring stopped after some blocks: it cannot win (`cannot_win`)."""

    def __init__(self, value: float, days: int, of: int) -> None:
        super().__init__(f"scoring stopped after {days} of {of} days")
        #: the objective over the days scored (partial), and how many of how many days
        self.value, self.days, self.of = value, days, of
        #: where the trial's time went (`train.fit` sets it)
        self.metrics: dict[str, float] = {}


def scoring_blocks(days: np.ndarray, blocks: int = BLOCKS, seed: int = 0) -> list[np.ndarray]:
    """Positions of `days` (each sample's day) grouped by day, the days in a fixed shuffled
    order (`seed`), cut into at most `blocks` blocks of whole days; every position in one."""
    days = np.asarray(days)
    unique = np.unique(days)
    order = np.random.default_rng(seed).permutation(len(unique))
    cuts = np.array_split(unique[order], min(blocks, len(unique)))
    return [np.flatnonzero(np.isin(days, cut)) for cut in cuts if len(cut)]


def daily(objective: Objective, num: np.ndarray, den: np.ndarray, days: np.ndarray):
    """The objective of each day (the days in order, `np.unique`) from per-sample terms; NaN
    for a day whose terms hold a NaN (a missing observation, a failed forecast)."""
    unique, sums = daily_sums(np.column_stack([num, den]), days)
    return unique, np.asarray(objective_from(objective, sums[:, 0], sums[:, 1]), float)


def cannot_win(
    objective: Objective,
    trial: tuple[np.ndarray, np.ndarray],
    best: tuple[np.ndarray, np.ndarray],
    days: np.ndarray,
    *,
    p_threshold: float,
    min_days: int = MIN_DAYS,
) -> tuple[bool, float, int]:
    """Whether a trial scored on some samples cannot beat the best trial: its per-sample
    (numerator, denominator) `trial` and the best's `best` on the same samples, whose days are
    `days`. Returns (stop, the test's p-value, the days compared)."""
    _, mine = daily(objective, *trial, days)
    _, theirs = daily(objective, *best, days)
    both = np.isfinite(mine) & np.isfinite(theirs)
    mine, theirs = mine[both], theirs[both]
    if len(mine) < max(2, min_days):
        return False, float("nan"), len(mine)
    differences = mine - theirs
    p = float(stats.wilcoxon(differences, alternative="greater", zero_method="zsplit").pvalue)
    # Optuna's safety: never stop a trial whose mean over these days is not worse than the best's
    if mine.mean() <= theirs.mean():
        return False, p, len(mine)
    return p < p_threshold, p, len(mine)


#: the key, among the base model's scores at each lead (`verify.scoring.base_state_mse`), of its
#: errors by day at the study's lead (`encode_daily`)
DAILY = "daily"


@dataclass
class PairedState:
    """Every state variable's squared error summed by day over the samples scored so far
    (days, variables): the trial's (`mine`) and the base model's on the same samples."""

    names: list[str]
    mine: np.ndarray
    base: np.ndarray


@dataclass
class Block:
    """What a trial scored in blocks has been scored on so far: the objective's per-sample
    terms (`num`, `den`) of the samples at `positions` (among the objective lead's), and, where
    the study has the base model's errors by day, both models' errors by day (`state`)."""

    positions: np.ndarray
    num: np.ndarray
    den: np.ndarray
    state: PairedState | None = None


def daily_sums(values: np.ndarray, days: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the days in order, `values` (samples, ...) summed over each day's samples)."""
    unique, inverse = np.unique(np.asarray(days), return_inverse=True)
    sums = np.zeros((len(unique), *np.shape(values)[1:]))
    np.add.at(sums, inverse, np.asarray(values, float))
    return unique, sums


def encode_daily(days: np.ndarray, names: list[str], sums: np.ndarray) -> dict:
    """The base model's errors by day (days, variables) as JSON-safe text, kept with its
    other scores in the study (base64 of float32: a year of Europe's days is about 130 kB)."""
    days = np.asarray(days, dtype="datetime64[D]")
    return {"days": pack(days, "<i4"), "names": list(names), "sums": pack(sums, "<f4")}


def decode_daily(packed: dict) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The (days, names, sums) that `encode_daily` packed."""
    days, names = unpack(packed["days"], "<i4"), list(packed["names"])
    return days, names, unpack(packed["sums"], "<f4").reshape(len(days), len(names))


def paired_days(
    mine: tuple[np.ndarray, np.ndarray],
    names: list[str],
    base: tuple[np.ndarray, list[str], np.ndarray],
) -> PairedState | None:
    """The trial's errors by day (`daily_sums`: days, sums) of the variables `names` beside the
    base model's on the same days (`decode_daily`); None when they are not of the same
    variables."""
    days, sums = mine
    base_days, base_names, base_sums = base
    if list(names) != list(base_names):
        return None
    at = np.minimum(np.searchsorted(base_days, days), len(base_days) - 1)
    known = base_days[at] == days
    return PairedState(names, sums[known], base_sums[at[known]])


def forgets(
    state: PairedState, limit: float, *, p_threshold: float, min_days: int = MIN_DAYS
) -> tuple[str, float, float, int] | None:
    """The variable that the trial, on the days scored so far, makes worse than `limit` times
    the base model's RMSE beyond doubt (of several, the one made worst): (its name, its RMSE
    ratio over those days, the test's p-value, the days compared), or None.

    A variable's RMSE ratio over the split exceeds `limit` when its squared errors summed over
    the days exceed limit² times the base's; so each day gives the difference of the two sums,
    and a one-sided Wilcoxon signed-rank test asks whether those differences lean above 0 (as
    `cannot_win` asks of the objective). Every variable is tested, so each at `p_threshold`
    divided by their number (Bonferroni); and, as there, no variable whose ratio over these
    days is within the limit is ever named."""
    mine, base = state.mine, state.base
    both = np.isfinite(mine).all(axis=1) & np.isfinite(base).all(axis=1)
    mine, base = mine[both], base[both]
    if len(mine) < max(2, min_days):
        return None
    found = None
    for j, name in enumerate(state.names):
        total = base[:, j].sum()
        ratio = float(np.sqrt(mine[:, j].sum() / total)) if total > 0 else float("nan")
        if not ratio > limit:
            continue
        differences = mine[:, j] - limit**2 * base[:, j]
        p = float(stats.wilcoxon(differences, alternative="greater", zero_method="zsplit").pvalue)
        if p < p_threshold / len(state.names) and (found is None or ratio > found[1]):
            found = (name, ratio, p, len(mine))
    return found
