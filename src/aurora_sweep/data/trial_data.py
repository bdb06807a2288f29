"""What every trial of a study shares, prepared once per worker: the train and evaluation
splits, the target's statistics, the climatology and SEEPS climates, the samples of each lead scored,
the base model's forgetting reference and the baselines' scores.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from aurora_sweep.config.bases import reads_v15_inputs
from aurora_sweep.config.objective import Objective
from aurora_sweep.config.recipe import LEADS, BaseKey
from aurora_sweep.config.settings import Window, interior_window
from aurora_sweep.config.study import Period, StudyConfig
from aurora_sweep.config.targets import TARGETS
from aurora_sweep.data.climates import (
    DRY_MM_BY_LEAD,
    SeepsClimate,
    climatology,
    complete_train,
    seeps_climate,
)
from aurora_sweep.data.samples import (
    Samples,
    TargetStats,
    fits_in_memory,
    in_period,
    target_stats,
)
from aurora_sweep.errors import AuroraSweepError

#: The start times (UTC) the 12- and 24-hour scores are made from: WeatherBench 2 scores its
#: forecasts from the 00 and 12 UTC initialisations (the 6-hour scores use every start).
LONG_LEAD_INITS = (0, 12)


@dataclass
class TrialData:
    """What every trial of a study shares: the splits, the target's statistics and the
    baselines."""

    train: Samples
    validation: Samples  # the evaluation split (validation during the search)
    stats: TargetStats
    climatology: np.ndarray  # (month, hour, lat, lon), in the target's units
    seeps: SeepsClimate | None  # None: SEEPS is not defined for the target
    objective: Objective  # at 6 h; its lead is `objective_steps`
    #: the untouched base model's MSE per variable on the evaluation split (forgetting ratios),
    #: by `reference_key`, then by lead ('6h', '12h', '24h'): a trial is compared with the base
    #: run in its own precision, at each lead it is scored at; made when a trial first needs
    #: them (`verify.prepare.score_base`)
    base_mse: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: the evaluation split's samples and SEEPS climate at each lead scored, by model steps
    #: (1: `validation` and `seeps`); a lead the split is too short for is left out
    leads: dict[int, Samples] = field(default_factory=dict)
    lead_seeps: dict[int, SeepsClimate | None] = field(default_factory=dict)
    #: the lead the objective is scored at (model steps)
    objective_steps: int = 1
    #: the forecast grid's interior, every score made on it too (`_interior`); None: none
    interior: Window | None = None
    #: training samples by rollout length, made when a trial first asks
    _train_by_steps: dict[int, Samples] = field(default_factory=dict, repr=False)
    #: the baselines' scores at each lead, computed with the first trial's (`metrics.scores`)
    baseline_scores: dict[int, dict] = field(default_factory=dict, repr=False)
    #: Aurora 1.5's own totals (mm over the lead) on each lead's samples, by model steps, for
    #: the "aurora-1.5" baseline (`verify.prepare.trial_data`); empty: not a baseline here, or
    #: its scores given (among `baseline_scores`)
    aurora15: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    #: Aurora 1.5's static fields at the evaluation grid (name -> (lat, lon) tensor), for the
    #: trials of a base that reads its inputs (`verify.prepare.trial_data`); None: none here
    v15_statics: dict | None = field(default=None, repr=False)
    #: the levels the study's data holds ([data] levels), and this data on subsets of them
    #: (keyed by the levels) and as Aurora 1.5 reads it (keyed "v1.5")
    study_levels: tuple[int, ...] = ()
    _views: dict[tuple[int, ...] | str, TrialData] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.leads = self.leads or {1: self.validation}
        self.lead_seeps = self.lead_seeps or {1: self.seeps}
        self.study_levels = self.study_levels or self.train.levels

    @property
    def levels(self) -> tuple[int, ...]:
        """The pressure levels this data's samples hold."""
        return self.train.levels

    def for_levels(self, levels: tuple[int, ...]) -> TrialData:
        """The same data on a subset of its pressure levels, for a trial that trains on them:
        its samples read only those levels (`Samples.with_levels`); the target's statistics, the
        climates and the baselines' scores are the same; the base model's scores (`base_mse`,
        one dict for every subset, by `reference_key`) are shared."""
        levels = tuple(levels)
        if levels == self.levels:
            return self
        return self._view(levels, lambda s: s.with_levels(levels))

    def for_trial(self, base: str, levels: tuple[int, ...]) -> TrialData:
        """The data a trial of `base` on `levels` trains and is scored on: `for_levels`, and
        for a base that reads Aurora 1.5's inputs, its samples with them (`Samples.for_v15`)."""
        data = self.for_levels(levels)
        if not reads_v15_inputs(base):
            return data
        if self.v15_statics is None:
            raise AuroraSweepError(f"the {base} base needs Aurora 1.5's static fields: none loaded")
        return data._view("v1.5", lambda s: s.for_v15(self.v15_statics))

    def _view(self, key, make) -> TrialData:
        """This data with every split's samples made by `make` (once per `key`), sharing the
        rest: the base model's and the baselines' scores, Aurora 1.5's totals and fields."""
        if key not in self._views:
            view = copy.copy(self)
            view.train = make(self.train)
            view.validation = make(self.validation)
            view.leads = {
                k: view.validation if v is self.validation else make(v)
                for k, v in self.leads.items()
            }
            view._train_by_steps = {k: make(v) for k, v in self._train_by_steps.items()}
            view._views = {}
            self._views[key] = view
        view = self._views[key]
        view.base_mse = self.base_mse  # the same dict, even where it was given after the view
        return view

    def reference_key(self, base: str, precision: str, levels: tuple[int, ...]) -> BaseKey:
        """The key of the base model's scores a trial of `base` in `precision` on `levels` is
        compared with (`recipe.BaseKey`): the base run on the same levels, since Aurora's
        encoder reads the levels together."""
        return BaseKey(base, precision, () if tuple(levels) == self.study_levels else levels)

    def train_for(self, steps: int) -> Samples:
        """The train split's samples for a rollout of `steps` model steps."""
        if steps not in self._train_by_steps:
            samples = self.train.at_lead(steps)
            if samples is None:
                raise AuroraSweepError(
                    f"the train split holds no {LEADS[steps]} sample ({steps} consecutive 6-hour "
                    "steps after two input times): use shorter [search] rollout_steps"
                )
            self._train_by_steps[steps] = samples
        return self._train_by_steps[steps]

    @classmethod
    def prepare(cls, cube, config: StudyConfig, *, eval_split: str = "validation") -> TrialData:
        """The splits of `cube`, the target's statistics and climates, and the samples of each
        lead scored: the data alone. A study's trials get it whole, with Aurora 1.5's fields and
        totals and the base model's scores, from `verify.prepare.trial_data`."""
        # in memory when it fits (read once, shared by both splits), else read from the store
        in_memory = fits_in_memory(cube.nbytes)
        if in_memory:
            cube = cube.load()
        train = Samples(cube, config.data, "train", in_memory=in_memory)
        period = config.data.train
        # the train split's target, read once for its statistics and both climatologies
        name = config.data.target
        picked = train.cube[[name, "static_lsm"]]  # the land mask: a land-only target's points
        train_values = picked.sel(time=in_period(train.cube["time"].values, period))
        train_values = train_values.load()
        validation = Samples(cube, config.data, eval_split, in_memory=in_memory)
        # the longer leads from the 00 and 12 UTC starts, as WeatherBench 2 scores them
        leads = {k: validation.at_lead(k, init_hours=LONG_LEAD_INITS) for k in LEADS if k > 1}
        leads = {1: validation, **leads}
        leads = {k: v for k, v in leads.items() if v is not None}
        if config.lead_steps not in leads:
            raise AuroraSweepError(
                f"the {eval_split} split holds no {LEADS[config.lead_steps]} sample to score the "
                "objective at: use a shorter [study] lead, or a split with runs of consecutive days"
            )
        lead_seeps = {k: train_seeps_climate(train_values, period, name, k) for k in leads}
        interior = interior_window(validation.grid, config.data.grid, config.edge_margin)
        return cls(
            train=train,
            validation=validation,
            stats=target_stats(train_values, period, name),
            climatology=climatology(train_values, period, name),
            seeps=lead_seeps[1],
            objective=config.objective,
            leads=leads,
            lead_seeps=lead_seeps,
            objective_steps=config.lead_steps,
            interior=interior,
        )

    @property
    def scored(self) -> Samples:
        """The evaluation samples at the objective's lead."""
        return self.leads[self.objective_steps]


def train_seeps_climate(cube, train: Period, target: str, steps: int = 1) -> SeepsClimate | None:
    """SEEPS's dry probability and light/heavy threshold by month and hour of day, from the
    train split's `target` over `steps` 6-hour windows (totals, or mean rates for pr), with that
    lead's dry threshold in the target's units; None for a target SEEPS is not defined for."""
    spec = TARGETS[target]
    if not spec.seeps:
        return None
    values, times = complete_train(cube, train, target)
    if steps > 1:  # over `steps` consecutive 6-hour windows, at the last one's time
        ends = np.arange(steps - 1, len(times))
        span = times.values[ends] - times.values[ends - steps + 1]
        ends = ends[span == np.timedelta64(6 * (steps - 1), "h")]
        values = spec.over_lead(np.stack([values[ends - k] for k in range(steps - 1, -1, -1)], 1))
        times = times[ends]
    dry = spec.per_lead(DRY_MM_BY_LEAD[6 * steps], 6 * steps)
    return seeps_climate(values, times.month.values, times.hour.values, dry_threshold=dry)
