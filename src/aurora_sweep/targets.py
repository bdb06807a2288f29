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
mm h-1). A leaf module: no torch, no xarray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACCUMULATED, MEAN_RATE, INSTANTANEOUS = "accumulated", "mean_rate", "instantaneous"
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


#: The targets a study trains and scores today; the others are downloaded and imported only.
TRAINED = ("tp",)

#: m of water -> mm (= kg m-2); kg m-2 s-1 (= mm s-1 of water) -> mm h-1
_MM, _MM_PER_HOUR = 1000.0, 3600.0

TARGETS: dict[str, Target] = {
    "tp": Target(
        "tp", (("total_precipitation", "tp"),), ACCUMULATED, _MM, "mm", 0.0, None,
        "lwe_thickness_of_precipitation_amount",
        "total precipitation over the 6 hours ending at time", True, True,
    ),
    "pr": Target(
        "pr", (("total_precipitation", "tp"),), MEAN_RATE, _MM, "mm h-1", 0.0, None,
        "lwe_precipitation_rate", "mean precipitation rate over the 6 hours ending at time",
        True, True,
    ),
    "rain_rate": Target(
        "rain_rate", (("convective_rain_rate", "crr"), ("large_scale_rain_rate", "lsrr")),
        INSTANTANEOUS, _MM_PER_HOUR, "mm h-1", 0.0, None, "rainfall_rate",
        "rain rate (convective + large-scale) at time", True, False,
    ),
    "ro": Target(
        "ro", (("runoff", "ro"),), ACCUMULATED, _MM, "kg m-2", 0.0, None,
        "runoff_amount", "runoff over the 6 hours ending at time (kg m-2 = mm of water)", True,
        False,
    ),
    "sf": Target(
        "sf", (("snowfall", "sf"),), ACCUMULATED, _MM, "mm", 0.0, None,
        "lwe_thickness_of_snowfall_amount",
        "snowfall over the 6 hours ending at time (mm of water equivalent)", True, False,
    ),
    # the upper bound: the largest porosity of ERA5's soil types (HTESSEL's organic soil)
    "swvl1": Target(
        "swvl1", (("volumetric_soil_water_layer_1", "swvl1"),), INSTANTANEOUS, 1.0, "m3 m-3",
        0.0, 0.766, "volume_fraction_of_condensed_water_in_soil",
        "volumetric soil water in the top layer (0-7 cm) at time", False, False,
    ),
}  # fmt: skip
