"""The hydrological variables a study can fine-tune Aurora to predict, and what each means in time.

Every layer that needs to know about the target (the CDS request, the import, the store, the
scores, the NetCDF attributes) reads it here, from one row of data per target (`TARGETS`), rather
than from `"tp"` literals. The classic ERA5 mistake is to get a variable's time wrong, so each
target says how ERA5's hourly fields become one value per 6-hour model step (`kind`):

- `ACCUMULATED` (tp, ro, sf): ERA5's hourly field is the amount over the hour *ending* at its
  valid time, so the total over the step (T - 6 h, T] is the sum of the six hourly fields valid
  at T - 5 h .. T. Summing 6-hourly samples instead is not a 6-hour total: such a series is
  refused (`era5.assemble.check_hourly`).
- `MEAN_RATE` (pr): the mean rate over the step: the same six hours' amount over six hours.
- `INSTANTANEOUS` (rain_rate, swvl1): the value at T itself; the hours between do not enter.

A target made of several ERA5 variables (rain_rate: convective + large-scale rain rate) is their
sum. `factor` turns ERA5's units into the ones users read (m of water -> mm, kg m-2 s-1 ->
mm h-1).

Over a lead of several steps the same kinds hold (`accumulate`): a 24-hour forecast of tp is the
total over the 24 hours, of pr the mean rate over them, of rain_rate the rate at the valid time.
Scores are named `<target>_<score>` (`metric`): precipitation-like targets get the categorical and
spatial scores at thresholds in their own units (`thresholds`, `fss_thresholds`), SEEPS where it
is defined (tp, pr); a continuous one (swvl1) gets RMSE, MAE, bias and the anomaly correlation.
A leaf module: no torch, no xarray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACCUMULATED, MEAN_RATE, INSTANTANEOUS = "accumulated", "mean_rate", "instantaneous"
#: Where the normalisation of a target is centred (`Target.location`).
BOUND, MEAN = "bound", "mean"
#: Hours in a model step, and seconds.
STEP_HOURS = 6
STEP_SECONDS = STEP_HOURS * 3600


@dataclass(frozen=True)
class Target:
    """One variable a study can predict."""

    name: str
    #: the ERA5 single-level variables it is made of: (CDS request name, NetCDF short name)
    sources: tuple[tuple[str, str], ...]
    kind: str
    #: from ERA5's units to `units`
    factor: float
    units: str
    #: the physical bounds of a value (None: unbounded)
    lower: float | None
    upper: float | None
    standard_name: str
    long_name: str
    #: scored as precipitation is (categorical and spatial scores at thresholds in its units)
    precipitation_like: bool
    #: SEEPS is defined for it (precipitation amounts and rates)
    seeps: bool
    #: the categorical scores' event thresholds ("value >= t"), in `units`
    thresholds: tuple[float, ...] = ()
    #: the fractions skill score's event thresholds, in `units`
    fss_thresholds: tuple[float, ...] = ()
    #: Aurora 1.5 predicts it from its own hourly precipitation (tp: the sum, pr: the mean)
    from_hourly_precipitation: bool = False
    #: Aurora's normalisation of it (`dataset.target_stats`; the scale is the train split's
    #: standard deviation either way): "bound", the location at the lower bound, where Aurora's
    #: clamp of a positive variable (at 0 in normalised units) then sits: precipitation-like
    #: targets, dry much of the time, whose forecast must be exactly dry there; "mean", the
    #: train mean and no clamp, as Aurora normalises its own variables: soil moisture, whose
    #: anomalies are a tenth of its level (from its bound, a step of the new head would be
    #: ten times coarser) and which the bound never reaches
    location: str = BOUND
    #: defined over land only (ERA5's land-surface fields): scored on land points (`static_lsm`
    #: >= 0.5), written NaN at sea in forecasts; at sea a store may hold 0 or NaN
    land_only: bool = False

    @property
    def hourly(self) -> bool:
        """Whether a step's value needs every hour of the step (else only the model times)."""
        return self.kind != INSTANTANEOUS

    @property
    def hours(self) -> tuple[int, ...]:
        """Hours before a model time whose fields make its value (0: the time itself)."""
        return tuple(range(STEP_HOURS)) if self.hourly else (0,)

    @property
    def cell_methods(self) -> str:
        """CF's cell_methods of a value over (or at) the step's end."""
        return {ACCUMULATED: "time: sum", MEAN_RATE: "time: mean"}.get(self.kind, "time: point")

    @property
    def scores(self) -> tuple[str, ...]:
        """The objectives a study of it can minimise (the first is its natural one)."""
        return ("seeps", "rmse") if self.seeps else ("rmse",)

    @property
    def objectives(self) -> tuple[str, ...]:
        """`scores` as metric names: ('tp_seeps', 'tp_rmse')."""
        return tuple(self.metric(s) for s in self.scores)

    def metric(self, score: str) -> str:
        """The name a score of it is logged under: `<target>_<score>`."""
        return f"{self.name}_{score}"

    def per_lead(self, amount: float, hours: int) -> float:
        """An amount over `hours` (mm) in this target's units over a lead of that length: itself
        for a total, over the hours for a mean rate."""
        return amount / hours if self.kind == MEAN_RATE else amount

    def accumulate(self, total, value, step: int):
        """The value over a lead of `step` model steps, from that of `step - 1` steps (`total`,
        None at the first) and the `step`-th step's own `value`: the sum of an accumulation,
        the running mean of a rate, the last value of an instantaneous field. NumPy arrays and
        torch tensors alike."""
        if total is None or self.kind == INSTANTANEOUS:
            return value
        if self.kind == MEAN_RATE:
            return total + (value - total) / step
        return total + value

    def within_bounds(self, values):
        """`values` (a NumPy array or a torch tensor) clipped to the target's bounds, as every
        forecast and score takes a model's output (a bounded target normalised from its bound
        is also clamped by Aurora itself; soil moisture, centred on its mean, only here)."""
        if self.lower is None and self.upper is None:
            return values
        return values.clip(self.lower, self.upper)

    def over_lead(self, parts: np.ndarray) -> np.ndarray:
        """The value over a lead from its steps' values `parts` (n, steps, ...), earliest first."""
        total = None
        for k in range(parts.shape[1]):
            total = self.accumulate(total, parts[:, k], k + 1)
        return total

    @property
    def what(self) -> str:
        """The long name without its time ("total precipitation", "runoff")."""
        return self.long_name.split(" over the 6 hours")[0].removesuffix(" at time")

    @property
    def each_step(self) -> str:
        """What one of its 6-hourly values is, in words."""
        return {
            ACCUMULATED: "the total over the 6 hours ending at each time",
            MEAN_RATE: "the mean rate over the 6 hours ending at each time",
        }.get(self.kind, "the value at each time")

    def lead_attrs(self) -> dict[str, str]:
        """CF attributes of a forecast of it over a lead ending at `valid_time` (the forecast
        NetCDF's dims `time` x `lead_time`)."""
        span = (
            "at valid_time"
            if self.kind == INSTANTANEOUS
            else ("over the lead time, ending at valid_time")
        )
        return {
            "standard_name": self.standard_name,
            "units": self.units,
            "long_name": f"{self.what} {span}",
            "cell_methods": self.cell_methods.replace("time:", "lead_time:"),
        }

    def step_of(self, seconds: int) -> int | None:
        """The model time (seconds since 1970) whose value the hourly field valid at `seconds`
        enters; None when it enters none (an instantaneous field between model times)."""
        if self.hourly:
            return -(-seconds // STEP_SECONDS) * STEP_SECONDS  # the step (T - 6 h, T] holding it
        return seconds if seconds % STEP_SECONDS == 0 else None

    def finish(self, total: np.ndarray, count: int) -> np.ndarray:
        """A model time's value from the sum of the `count` fields that entered it: in the
        target's units, NaN unless every field it needs (`hours` x `sources`) was there."""
        if count != len(self.hours) * len(self.sources):
            return np.full_like(total, np.nan)
        per_hour = len(self.hours) if self.kind == MEAN_RATE else 1
        return total * (self.factor / per_hour)


#: What a study predicts unless `[model] target` says otherwise.
DEFAULT = "tp"

#: m of water -> mm (= kg m-2); kg m-2 s-1 (= mm s-1 of water) -> mm h-1
_MM, _MM_PER_HOUR = 1000.0, 3600.0

TARGETS: dict[str, Target] = {
    "tp": Target(
        "tp", (("total_precipitation", "tp"),), ACCUMULATED, _MM, "mm", 0.0, None,
        "lwe_thickness_of_precipitation_amount",
        "total precipitation over the 6 hours ending at time", True, True,
        (0.1, 1.0, 5.0), (1.0, 5.0), True,
    ),
    "pr": Target(
        "pr", (("total_precipitation", "tp"),), MEAN_RATE, _MM, "mm h-1", 0.0, None,
        "lwe_precipitation_rate", "mean precipitation rate over the 6 hours ending at time",
        True, True, (0.02, 0.2, 1.0), (0.2, 1.0), True,
    ),
    "rain_rate": Target(
        "rain_rate", (("convective_rain_rate", "crr"), ("large_scale_rain_rate", "lsrr")),
        INSTANTANEOUS, _MM_PER_HOUR, "mm h-1", 0.0, None, "rainfall_rate",
        "rain rate (convective + large-scale) at time", True, False, (0.1, 1.0, 4.0),
        (1.0, 4.0),
    ),
    "ro": Target(
        "ro", (("runoff", "ro"),), ACCUMULATED, _MM, "kg m-2", 0.0, None,
        "runoff_amount", "runoff over the 6 hours ending at time (kg m-2 = mm of water)", True,
        False, (0.1, 1.0, 5.0), (1.0, 5.0), land_only=True,
    ),
    "sf": Target(
        "sf", (("snowfall", "sf"),), ACCUMULATED, _MM, "mm", 0.0, None,
        "lwe_thickness_of_snowfall_amount",
        "snowfall over the 6 hours ending at time (mm of water equivalent)", True, False,
        (0.1, 1.0, 5.0), (1.0, 5.0),
    ),
    # the upper bound: the largest porosity of ERA5's soil types (HTESSEL's organic soil)
    "swvl1": Target(
        "swvl1", (("volumetric_soil_water_layer_1", "swvl1"),), INSTANTANEOUS, 1.0, "m3 m-3",
        0.0, 0.766, "volume_fraction_of_condensed_water_in_soil",
        "volumetric soil water in the top layer (0-7 cm) at time", False, False,
        location=MEAN, land_only=True,
    ),
}  # fmt: skip


def of_metric(name: str) -> Target:
    """The target a metric or objective name (`tp_seeps`, `rain_rate_rmse_24h`) is of."""
    for target in sorted(TARGETS.values(), key=lambda t: -len(t.name)):
        if name.startswith(target.name + "_"):
            return target
    raise ValueError(f"{name!r} names no target's score")
