"""An objective as a sum of per-sample terms: its block bootstrap interval, the paired difference
of two trials' objectives, and the terms' compact encoding for Optuna's storage.

Comparing trials: every trial of a study is scored on the same samples with the same bootstrap
resamples, so whether trial A beats trial B is a paired question. `metrics.objective_terms` (or
`tp_scores(terms_out=...)`) gives each sample's share of the objective, and `paired_difference`
the difference of two objectives with a bootstrap interval over the same resamples for both; an
interval containing 0 means the two are not distinguishable. Overlap of two marginal intervals
would ignore that both trials meet the same weather and so overstate the uncertainty.

NumPy only: `best` ranks and compares stored trials without importing the scores.
"""

from __future__ import annotations

import base64
import math

import numpy as np

from aurora_sweep.config.objective import Objective


def block_bootstrap(
    days: np.ndarray, *, n_resamples: int, block_days: int, seed: int
) -> list[np.ndarray]:
    """Resamples of the samples, in blocks of consecutive days (a circular block bootstrap).

    The scheme: order the distinct days present in `days` (n_days of them). A resample draws
    k = ceil(n_days / block_days) start days uniformly with replacement; each block is its start day
    and the next `block_days - 1` distinct days present, wrapping from the last day to the first
    (so every day is equally likely to be drawn); the resample is every sample of every day of the
    blocks, block after block. It holds k * block_days days, at most block_days - 1 more than the
    original. Whole days stay together and neighbouring days travel together, which keeps the
    day-to-day correlation of weather that an i.i.d. bootstrap over samples would ignore and so
    gives intervals that are not too narrow.

    Args:
        days: each sample's day, datetime64[D] (any order; repeated for several samples a day).
        n_resamples: how many resamples to draw.
        block_days: the number of consecutive days in a block (>= 1).
        seed: the random generator's seed; the same seed gives the same resamples.

    Returns:
        `n_resamples` integer arrays of indices into `days`.
    """
    if block_days < 1 or n_resamples < 0:
        raise ValueError(
            f"need block_days >= 1 and n_resamples >= 0; got {block_days}, {n_resamples}"
        )
    unique, day_of_sample = np.unique(np.asarray(days), return_inverse=True)
    n_days = unique.size
    if n_days == 0:
        return [np.zeros(0, dtype=int) for _ in range(n_resamples)]
    by_day = np.argsort(day_of_sample, kind="stable")  # sample indices grouped by day
    per_day = np.bincount(day_of_sample, minlength=n_days)
    first = np.cumsum(per_day) - per_day  # where each day's samples start in `by_day`
    n_blocks = math.ceil(n_days / block_days)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_days, size=(n_resamples, n_blocks))
    chosen = (starts[..., None] + np.arange(block_days)) % n_days  # (resample, block, day)
    resamples = []
    for picked in chosen.reshape(n_resamples, -1):
        lengths = per_day[picked]
        ends = np.cumsum(lengths)
        offsets = np.repeat(first[picked] - (ends - lengths), lengths)
        resamples.append(by_day[offsets + np.arange(ends[-1])])
    return resamples


def paired_difference(
    objective: Objective,
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    days: np.ndarray,
    *,
    n_resamples: int = 1000,
    block_days: int = 3,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The objective of A minus that of B, with a paired block bootstrap interval.

    Both forecasts were scored on the same samples, so the interval comes from the same resamples
    (`block_bootstrap`) applied to both: the weather they share cancels out of the difference. An
    interval containing 0 means A and B are not distinguishable. Samples where either side has a
    NaN term are dropped from both.

    Args:
        objective: the objective the terms are of.
        a: A's per-sample (numerator, denominator), as `objective_terms` gives them, (n,) each.
        b: B's, over the same samples in the same order.
        days: each sample's target day, datetime64[D], (n,).
        n_resamples: how many bootstrap resamples (>= 1).
        block_days: consecutive days per bootstrap block.
        seed: the bootstrap's seed.

    Returns:
        The difference, and its 5 % and 95 % quantiles over the resamples.
    """
    if n_resamples < 1:
        raise ValueError(f"need n_resamples >= 1 for an interval; got {n_resamples}")
    arrays = [np.asarray(x, dtype=np.float64) for x in (*a, *b)]
    days = np.asarray(days)
    lengths = {np.shape(x) for x in (*arrays, days)}
    if len(lengths) != 1 or days.ndim != 1:
        raise ValueError(
            "a's and b's terms and days must be 1-d arrays over the same samples; got shapes "
            + ", ".join(str(np.shape(x)) for x in (*arrays, days))
        )
    keep = ~np.isnan(np.stack(arrays)).any(axis=0)
    a_num, a_den, b_num, b_den = (x[keep] for x in arrays)
    difference = objective_from(objective, a_num.sum(), a_den.sum()) - objective_from(
        objective, b_num.sum(), b_den.sum()
    )
    resamples = block_bootstrap(
        days[keep], n_resamples=n_resamples, block_days=block_days, seed=seed
    )
    differences = objective_from(
        objective, resampled_sums(a_num, resamples), resampled_sums(a_den, resamples)
    ) - objective_from(
        objective, resampled_sums(b_num, resamples), resampled_sums(b_den, resamples)
    )
    return (float(difference), *interval(differences))


def over_seeds(
    objective: Objective,
    a: list[tuple[np.ndarray, np.ndarray]],
    days: np.ndarray,
    b: list[tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    n_resamples: int = 1000,
    block_days: int = 3,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A recipe trained with several seeds: the mean of its seeds' objectives (minus recipe B's,
    when `b` is given), with a 90 % interval that holds both the day-to-day sampling and the
    seed-to-seed spread.

    Each resample draws the days in blocks (`block_bootstrap`, the same days for A and B: the
    weather they share cancels out of a difference) and, independently for each recipe, as many
    seeds as it has, with replacement; its value is the mean over the drawn seeds of their
    objectives on the drawn days. A recipe of one seed has no seed spread to show.

    Args:
        objective: the objective the terms are of.
        a, b: per seed, the per-sample (numerator, denominator) over the same samples, (n,) each.
        days: each sample's target day, datetime64[D], (n,).
    """
    rng = np.random.default_rng(seed)
    stacks = [np.asarray([[*t] for t in terms], dtype=np.float64) for terms in (a, b) if terms]
    keep = ~np.concatenate([np.isnan(s).any(axis=(0, 1))[None] for s in stacks]).any(axis=0)
    resamples = block_bootstrap(
        np.asarray(days)[keep], n_resamples=n_resamples, block_days=block_days, seed=seed
    )

    def mean_over_seeds(stack: np.ndarray) -> tuple[float, np.ndarray]:
        num, den = stack[:, 0, keep], stack[:, 1, keep]
        point = np.mean([objective_from(objective, n.sum(), d.sum()) for n, d in zip(num, den)])
        each = np.stack(
            [
                objective_from(
                    objective, resampled_sums(n, resamples), resampled_sums(d, resamples)
                )
                for n, d in zip(num, den)
            ]
        )  # (seeds, resamples)
        drawn = rng.integers(0, len(stack), size=(n_resamples, len(stack)))
        return float(point), each[drawn, np.arange(n_resamples)[:, None]].mean(axis=1)

    value, values = mean_over_seeds(stacks[0])
    if len(stacks) == 2:
        other, others = mean_over_seeds(stacks[1])
        value, values = value - other, values - others
    return (value, *interval(values))


def pack(values: np.ndarray, dtype: str) -> str:
    """`values` as base64 text of `dtype` (JSON-safe); days as int32 days since 1970."""
    if np.asarray(values).dtype.kind == "M":
        values = np.asarray(values, dtype="datetime64[D]").astype(np.int64)
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode()


def unpack(text: str, dtype: str) -> np.ndarray:
    """The array `pack` made: float32 as float64, "<i4" days as datetime64[D]."""
    values = np.frombuffer(base64.b64decode(text), dtype=dtype)
    return values.astype("datetime64[D]") if dtype == "<i4" else values.astype(np.float64)


def encode_terms(num: np.ndarray, den: np.ndarray, days: np.ndarray) -> dict[str, str]:
    """Per-sample objective terms and their days as short JSON-safe text (base64 of float32 and
    int32 days since 1970), small enough to keep with every trial in Optuna's storage: a year of
    Europe's 6-hourly samples is about 23 kB."""
    days = np.asarray(days, dtype="datetime64[D]")
    return {"num": pack(num, "<f4"), "den": pack(den, "<f4"), "days": pack(days, "<i4")}


def decode_terms(packed: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (num, den, days) that `encode_terms` packed."""
    return unpack(packed["num"], "<f4"), unpack(packed["den"], "<f4"), unpack(packed["days"], "<i4")


def objective_from(
    objective: Objective, num: np.ndarray | float, den: np.ndarray | float
) -> np.ndarray | float:
    """The objective from summed terms: sqrt of the mean squared error, or the SEEPS weighted mean."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.divide(num, den)
    value = np.sqrt(ratio) if objective.rmse else ratio
    return float(value) if np.ndim(value) == 0 else value


def resampled_sums(values: np.ndarray, resamples: list[np.ndarray]) -> np.ndarray:
    """The sum of `values` over each resample's indices, in one pass."""
    if values.size == 0:
        return np.zeros(len(resamples))
    lengths = np.array([len(r) for r in resamples])
    starts = np.cumsum(lengths) - lengths
    return np.add.reduceat(values[np.concatenate(resamples)], starts)


def interval(values: np.ndarray) -> tuple[float, float]:
    q05, q95 = np.quantile(values, [0.05, 0.95])
    return float(q05), float(q95)
