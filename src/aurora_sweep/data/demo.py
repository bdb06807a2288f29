"""The embedded demo: a small, deterministic ERA5-like world, written as the CDS writes it.

Users should see the whole workflow run before they have a CDS key or a GPU. This module makes
sample data that behave enough like the atmosphere for the workflow to mean something: travelling
baroclinic waves set geopotential, geostrophic winds, temperature and humidity on pressure levels;
the surface fields follow them with a diurnal cycle and orography; and precipitation falls where
moist southerly flow rises ahead of troughs and against mountains, plus a little small-scale
rain that no other field explains. So `tp` is learnable from Aurora's inputs, but neither
persistence nor climatology predicts it well.

The files have the layout the CDS returns today (see `write_cds_files`): `valid_time` in int64
seconds, `pressure_level` float64 descending, latitude descending, an `expver` string coordinate,
ERA5 short names, and `tp` hourly in metres in the accumulated-field file, zipped together with the
instantaneous surface fields exactly as a mixed request comes back. The demo then goes through the
same import as real downloads.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

G = 9.80665
OMEGA = 7.292e-5
M_PER_DEG = 111_195.0

#: Demo days per month: a sample needs three consecutive 6-hourly times, so the demo keeps short
#: runs of consecutive days instead of the whole record, which keeps the files small.
DEMO_DAYS = range(1, 7)


@dataclass(frozen=True)
class DemoWorld:
    """The fixed parameters of the demo atmosphere; `seed` decides everything else."""

    north: float = 62.0
    west: float = 4.0
    rows: int = 32
    cols: int = 48
    grid: float = 1.0
    levels: tuple[int, ...] = (500, 700, 850)
    first_year: int = 2021
    last_year: int = 2025
    n_waves: int = 6
    seed: int = 20240601
    #: write Aurora 1.5's other surface inputs too (`store.V15_SURF_VARS`)
    v15: bool = False
    #: the study's target (`targets.TARGETS`): its ERA5 variables are written too
    target: str = "tp"

    @property
    def lat(self) -> np.ndarray:
        return self.north - self.grid * np.arange(self.rows)

    @property
    def lon(self) -> np.ndarray:
        return self.west + self.grid * np.arange(self.cols)


def world_for(data) -> DemoWorld:
    """The demo world that covers a study's region, levels and years (`data`: DataConfig)."""
    r = data.region
    if r.west > r.east or r.crosses_zero:
        raise ValueError("the demo world lies east of 0°; give the demo study a box there")
    return DemoWorld(
        north=r.north,
        west=r.west,
        rows=int(round((r.north - r.south) / data.grid)) + 1,
        cols=int(round((r.east - r.west) / data.grid)) + 1,
        grid=data.grid,
        levels=tuple(sorted(data.levels)),
        first_year=data.period.start.year,
        last_year=data.period.end.year,
        v15=data.v15_inputs,
        target=data.target,
    )


def _waves(world: DemoWorld) -> dict[str, np.ndarray]:
    """Random but fixed wave parameters: wavenumbers (rad/deg), phase speeds, amplitudes."""
    rng = np.random.default_rng(world.seed)
    n = world.n_waves
    return {
        "kx": 2 * np.pi / rng.uniform(18, 45, n),  # zonal wavelength in degrees
        "ky": 2 * np.pi / rng.uniform(14, 40, n) * rng.choice([-1, 1], n),
        "speed": rng.uniform(6, 16, n) / 24,  # eastward, degrees per hour
        "amp": rng.uniform(18, 45, n),  # metres of geopotential height at 500 hPa
        "phase": rng.uniform(0, 2 * np.pi, n),
        "mod_period": rng.uniform(90, 400, n),  # hours, slow amplitude changes
        "mod_phase": rng.uniform(0, 2 * np.pi, n),
        # small-scale convective cells that move with their own speed: rain no other field explains
        "cell_k": 2 * np.pi / rng.uniform(5, 9, 3),
        "cell_speed": rng.uniform(10, 20, 3) / 24,
        "cell_phase": rng.uniform(0, 2 * np.pi, 3),
    }


def _static(world: DemoWorld) -> dict[str, np.ndarray]:
    lat, lon = np.meshgrid(world.lat, world.lon, indexing="ij")
    height = (
        2200 * np.exp(-(((lat - 46) / 2.2) ** 2 + ((lon - 14) / 5.0) ** 2))
        + 1300 * np.exp(-(((lat - 41) / 3.0) ** 2 + ((lon - 30) / 2.5) ** 2))
        + 900 * np.exp(-(((lat - 56) / 2.0) ** 2 + ((lon - 40) / 4.0) ** 2))
    )
    coast = 10 + 6 * np.sin(np.deg2rad(lat * 9)) + 0.15 * (lat - 45)
    lsm = 1 / (1 + np.exp(-(lon - coast) * 1.5))
    lsm = np.clip(lsm + (height > 300), 0, 1)
    slt = np.where(lsm > 0.5, 1 + (np.floor(lat + lon) % 6), 0)
    return {"height": height, "z": G * height, "lsm": lsm, "slt": slt.astype(float)}


def _state(world: DemoWorld, hours: np.ndarray, w: dict, static: dict) -> dict[str, np.ndarray]:
    """The demo atmosphere at `hours` (hours since 1970): arrays shaped (time, [level,] lat, lon).

    Each wave is cos(kx*lon + ky*lat + phase(t)); sums of them are computed as a product of
    separable complex exponentials, so a year of hourly fields takes well under a second.
    """
    doy = 2 * np.pi * ((hours / 24) % 365.25) / 365.25
    season = (-np.cos(doy - 0.35)[:, None, None]).astype(np.float32)  # -1 mid-Jan, +1 mid-Jul
    wave_sum = _wave_sum(world, hours, w, season)
    state = _upper_air(world, wave_sum, season)
    _surface(state, world, hours, wave_sum, static)
    _rain(state, world, hours, w, static)
    return {k: v.astype(np.float32) for k, v in state.items()}


def _wave_sum(world: DemoWorld, hours: np.ndarray, w: dict, season: np.ndarray):
    """wave_sum(tilt, factor): the sum of the travelling waves at every time, and its derivatives
    along longitude and latitude (per degree), with troughs shifted east by `tilt` degrees."""
    lat, lon = world.lat.astype(np.float32), world.lon.astype(np.float32)
    t = hours[:, None]  # phases are computed in float64 on (time, wave), fields in float32
    amp = w["amp"] * (1 + 0.45 * np.sin(2 * np.pi * t / w["mod_period"] + w["mod_phase"]))
    amp = amp * (1.3 - 0.3 * season[:, 0])  # stronger waves in winter
    ey = np.exp(1j * np.outer(w["ky"], lat)).astype(np.complex64)  # (wave, lat)
    ex = np.exp(1j * np.outer(w["kx"], lon)).astype(np.complex64)  # (wave, lon)

    def wave_sum(tilt: float, factor: float) -> tuple[np.ndarray, ...]:
        coef = factor * amp * np.exp(1j * (w["kx"] * (tilt - w["speed"] * t) + w["phase"]))
        coef = coef.astype(np.complex64)

        def field(c: np.ndarray) -> np.ndarray:  # sum over waves of c * e^(i ky lat) e^(i kx lon)
            return np.matmul((c[:, :, None] * ey[None]).transpose(0, 2, 1), ex).real

        # derivatives in metres per degree
        return field(coef), field(coef * (1j * w["kx"])), field(coef * (1j * w["ky"]))

    return wave_sum


def _upper_air(world: DemoWorld, wave_sum, season: np.ndarray) -> dict[str, np.ndarray]:
    """z, u, v, t and q on every level, (time, level, lat, lon): geostrophic wind of the waves
    over a jet, temperature following the height field, humidity from the meridional wind."""
    lat2 = world.lat.astype(np.float32)[None, :, None]
    f = 2 * OMEGA * np.sin(np.deg2rad(lat2))
    coslat = np.cos(np.deg2rad(lat2))
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("z", "u", "v", "t", "q")}
    for p in world.levels:
        height_factor = (1000 - p) / 500  # 0.3 at 850, 1 at 500
        tilt = -4.0 * (850 - p) / 350  # troughs lean westward with height
        h, hx, hy = wave_sum(tilt, 0.4 + 0.6 * height_factor)
        ref = 7.9 * (1000 - p) + 110 + 0.004 * (1000 - p) ** 2
        h_tot = ref - 9 * (lat2 - 45) * height_factor + 50 * season * height_factor + h
        jet = (6 + 12 * height_factor) * (1.2 - 0.4 * season)
        u = jet - (G / f) * (hy / M_PER_DEG)
        v = (G / f) * hx / (M_PER_DEG * coslat)
        t_ref = 288.0 * (p / 1000) ** 0.19 - 0.6 * (lat2 - 45) + 9 * season
        temp = t_ref + 0.045 * h
        rh = np.clip(0.55 + 0.35 * np.tanh(v / 12) - 0.1 * height_factor, 0.05, 1.0)
        e_sat = 611.2 * np.exp(17.67 * (temp - 273.15) / (temp - 29.65))
        q = rh * 0.622 * e_sat / (p * 100)
        for k, a in (("z", G * h_tot), ("u", u), ("v", v), ("t", temp), ("q", q)):
            out[k].append(a)
    return {k: np.stack(v, axis=1) for k, v in out.items()}


def _local_hour(world: DemoWorld, hours: np.ndarray) -> np.ndarray:
    lon = world.lon.astype(np.float32)
    return ((hours[:, None, None] % 24 + lon[None, None, :] / 15) % 24).astype(np.float32)


def _surface(state: dict, world: DemoWorld, hours: np.ndarray, wave_sum, static: dict) -> None:
    """2 m temperature, 10 m wind and mean sea-level pressure, from the lowest level."""
    low = int(np.argmax(world.levels))  # the lowest level drives the surface and the rain
    u_low, v_low, t_low = (state[k][:, low] for k in ("u", "v", "t"))
    hs, _, _ = wave_sum(-6.0, 0.8)
    diurnal = 4.5 * np.cos(2 * np.pi * (_local_hour(world, hours) - 15) / 24)
    diurnal = diurnal * (0.4 + 0.6 * static["lsm"])
    state["2t"] = t_low + 11 + diurnal - 0.0065 * static["height"]
    state["10u"] = 0.65 * u_low
    state["10v"] = 0.65 * v_low
    state["msl"] = 101_300 + 1.2 * G * hs


def _rain(state: dict, world: DemoWorld, hours: np.ndarray, w: dict, static: dict) -> None:
    """The rain rate: moist southerly flow rising ahead of troughs, forced up slopes, plus
    travelling cells."""
    lat2, lon = world.lat.astype(np.float32)[None, :, None], world.lon.astype(np.float32)
    low = int(np.argmax(world.levels))
    v_low, q_low = (state[k][:, low] for k in ("v", "q"))
    gy, gx = np.gradient(static["height"], world.grid * M_PER_DEG)
    slope_lift = (state["10u"] * gx - state["10v"] * gy) * 100  # cm/s of forced ascent
    lift = v_low / 10 + 0.6 * slope_lift - 0.3
    cells = sum(
        np.cos(
            (k * (lon[None, None, :] - s * hours[:, None, None]) % (2 * np.pi)).astype(np.float32)
            + 0.7 * k * lat2
            + ph
        )
        for k, s, ph in zip(w["cell_k"], w["cell_speed"], w["cell_phase"])
    )
    # afternoon convection over land: the 6-hourly cycle that persistence gets wrong
    convection = 1 + 0.9 * np.cos(2 * np.pi * (_local_hour(world, hours) - 16) / 24) * static["lsm"]
    rate = 0.12 * (q_low * 1000) * np.maximum(lift, 0) ** 1.5 * (1 + 0.35 * cells / 3) * convection
    state["tp_rate"] = np.maximum(rate, 0)


def _target_fields(world: DemoWorld, st: dict, static: dict, *, instant: bool) -> dict:
    """The ERA5 variables of a target other than tp, from the demo's rain: instantaneous ones
    (`instant`: rain rates in kg m-2 s-1, the top soil layer's water) or hourly accumulations
    (m of water over the hour: runoff over land, snowfall where it is below freezing). Empty
    where the study's target is made of tp or of other kind of fields."""
    from aurora_sweep.config.targets import TARGETS

    target = TARGETS[world.target]
    if target.hourly == instant or world.target in ("tp", "pr"):
        return {}
    rate, lsm, cold = st["tp_rate"], static["lsm"], st["2t"] < 273.15  # rate in mm h-1
    fields = {
        "crr": 0.6 * np.where(cold, 0.0, rate) / 3600,
        "lsrr": 0.4 * np.where(cold, 0.0, rate) / 3600,
        "swvl1": lsm * (0.25 + 0.1 * np.tanh(2 * rate)),
        "ro": lsm * (0.4 * rate + 0.01) / 1000,
        "sf": np.where(cold, rate, 0.0) / 1000,
    }
    return {short: fields[short] for _, short in target.sources}


#: Aurora 1.5's other surface inputs: store name -> the CDS's NetCDF short name.
V15_SHORT = {
    "2d": "d2m", "tcwv": "tcwv", "tcc": "tcc", "100u": "u100", "100v": "v100", "sp": "sp",
    "lcc": "lcc", "mcc": "mcc", "hcc": "hcc", "skt": "skt", "stl1": "stl1", "swvl1": "swvl1",
    "ci": "siconc", "sd": "sd",
}  # fmt: skip


def _v15_surface(state: dict, world: DemoWorld, static: dict) -> dict[str, np.ndarray]:
    """Aurora 1.5's other surface inputs, in ERA5's units, from the demo's own fields: dew
    point and water vapour from the low-level humidity, cloud from the rain rate, 100 m wind
    above the 10 m wind, surface pressure from sea-level pressure and height, soil water on
    land, sea ice NaN over land and 0 at sea (ERA5's mask), snow where it is below freezing."""
    low = int(np.argmax(world.levels))
    q_low, t2, lsm = state["q"][:, low], state["2t"], static["lsm"]
    cloud = np.tanh(2 * state["tp_rate"])
    return {
        "2d": t2 - 3 - 4 * (1 - np.clip(q_low * 200, 0, 1)),
        "tcwv": 2500 * q_low,
        "tcc": np.clip(0.2 + 0.8 * cloud, 0, 1),
        "lcc": np.clip(0.1 + 0.7 * cloud, 0, 1),
        "mcc": np.clip(0.05 + 0.6 * cloud, 0, 1),
        "hcc": np.clip(0.1 + 0.4 * cloud, 0, 1),
        "100u": 1.25 * state["10u"],
        "100v": 1.25 * state["10v"],
        "sp": state["msl"] - 12.0 * static["height"],
        "skt": t2 + 1.0,
        "stl1": t2 + 0.5,
        "swvl1": lsm * (0.25 + 0.1 * cloud),
        "ci": np.broadcast_to(np.where(lsm > 0.5, np.nan, 0.0), t2.shape),
        "sd": np.maximum(273.15 - t2, 0) * 1e-3 * lsm,
    }


def model_times(world: DemoWorld) -> pd.DatetimeIndex:
    """The 6-hourly times the demo holds: 00/06/12/18 UTC on `DEMO_DAYS` of every month."""
    days = pd.date_range(f"{world.first_year}-01-01", f"{world.last_year}-12-31", freq="D")
    days = days[days.day.isin(list(DEMO_DAYS))]
    return pd.DatetimeIndex([d + pd.Timedelta(hours=h) for d in days for h in (0, 6, 12, 18)])


def tp_hours(times: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """Every hour whose accumulation a 6-h total at one of `times` needs."""
    hours = {t - pd.Timedelta(hours=k) for t in times for k in range(6)}
    return pd.DatetimeIndex(sorted(hours))


def _hours_since_epoch(times: pd.DatetimeIndex) -> np.ndarray:
    return np.asarray((times - pd.Timestamp("1970-01-01")) / pd.Timedelta(hours=1), dtype=float)


def _cds_coords(world: DemoWorld, times: pd.DatetimeIndex, levels: bool) -> dict:
    # Aurora's final ERA5 vs ERA5T mix: the most recent months come as '0005'.
    expver = np.where(times >= pd.Timestamp("2025-10-01"), "0005", "0001").astype(object)
    coords = {
        "number": 0,
        "valid_time": ("valid_time", times.values.astype("datetime64[ns]")),
        "latitude": ("latitude", world.lat.astype(np.float64)),
        "longitude": ("longitude", world.lon.astype(np.float64)),
        "expver": ("valid_time", expver),
    }
    if levels:
        coords["pressure_level"] = (
            "pressure_level",
            np.array(sorted(world.levels, reverse=True), float),
        )
    return coords


def _encoding(ds: xr.Dataset) -> dict:
    # Uncompressed NetCDF4: the CDS compresses its files, but zlib took 6 s of the demo's
    # first minute for a third less disk; reading a compressed file is tested on the real CDS
    # files (tests/test_era5.py), and the reader does not tell the two apart.
    enc = {v: {"dtype": "float32"} for v in ds.data_vars}
    enc["valid_time"] = {
        "units": "seconds since 1970-01-01",
        "calendar": "proleptic_gregorian",
        "dtype": "int64",
    }
    return enc


def _attrs(step_type: str) -> dict:
    return {
        "GRIB_centre": "ecmf",
        "GRIB_centreDescription": "European Centre for Medium-Range Weather Forecasts",
        "Conventions": "CF-1.7",
        "institution": "European Centre for Medium-Range Weather Forecasts",
        "history": f"aurora-sweep demo generator, laid out as cfgrib with stepType {step_type}",
    }


def write_cds_files(out_dir: Path, world: DemoWorld = DemoWorld()) -> list[Path]:
    """Write the demo in the CDS layout, one set of files per year; return their paths.

    Per year: `era5-single-levels_<year>.zip` (instant 2t/10u/10v/msl and accumulated hourly tp,
    as a mixed request returns them) and `era5-pressure-levels_<year>.nc`; once:
    `era5-static.nc` (z, lsm, slt).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    waves, static = _waves(world), _static(world)
    times_all = model_times(world)
    paths = []
    for year in range(world.first_year, world.last_year + 1):
        times = times_all[times_all.year == year]
        paths += _write_year(out_dir, year, *_year_datasets(world, times, waves, static))
    st_ds = xr.Dataset(
        {
            k: (("valid_time", "latitude", "longitude"), static[k][None].astype(np.float32))
            for k in ("z", "lsm", "slt")
        },
        coords=_cds_coords(world, times_all[:1], levels=False),
        attrs=_attrs("instant"),
    )
    static_path = out_dir / "era5-static.nc"
    st_ds.to_netcdf(static_path, encoding=_encoding(st_ds), engine="netcdf4")
    return [*paths, static_path]


def _year_datasets(
    world: DemoWorld, times: pd.DatetimeIndex, waves: dict, static: dict
) -> tuple[xr.Dataset, xr.Dataset, xr.Dataset]:
    """One year as the CDS returns it: the pressure levels, the instantaneous single levels
    and the hourly tp accumulations (each ending at its valid time)."""
    st = _state(world, _hours_since_epoch(times), waves, static)
    dims3 = ("valid_time", "latitude", "longitude")
    dims4 = ("valid_time", "pressure_level", "latitude", "longitude")
    pl = xr.Dataset(
        {k: (dims4, st[k][:, ::-1].astype(np.float32)) for k in ("z", "u", "v", "t", "q")},
        coords=_cds_coords(world, times, levels=True),
        attrs=_attrs("instant"),
    )
    sl_vars = {"2t": "t2m", "10u": "u10", "10v": "v10", "msl": "msl"}
    if world.v15:
        st |= _v15_surface(st, world, static)
        sl_vars |= V15_SHORT
    instant = _target_fields(world, st, static, instant=True)  # at the model times
    st |= instant
    sl_vars |= {k: k for k in instant}
    inst = xr.Dataset(
        {cds: (dims3, st[k].astype(np.float32)) for k, cds in sl_vars.items()},
        coords=_cds_coords(world, times, levels=False),
        attrs=_attrs("instant"),
    )
    hours = tp_hours(times)
    # the hourly accumulation ending at h: rate at the middle of the hour, in metres
    hourly = _state(world, _hours_since_epoch(hours) - 0.5, waves, static)
    rate = hourly["tp_rate"]
    accum = xr.Dataset(
        {"tp": (dims3, (rate / 1000).astype(np.float32))},
        coords=_cds_coords(world, hours, levels=False),
        attrs=_attrs("accum"),
    )
    accum["tp"].attrs.update(units="m", long_name="Total precipitation", GRIB_stepType="accum")
    for k, v in _target_fields(world, hourly, static, instant=False).items():
        accum[k] = (dims3, v.astype(np.float32))
        accum[k].attrs.update(units="m", GRIB_stepType="accum")
    return pl, inst, accum


def _write_year(
    out_dir: Path, year: int, pl: xr.Dataset, inst: xr.Dataset, accum: xr.Dataset
) -> list[Path]:
    """The year's pressure-level NetCDF, and its single levels zipped as the CDS zips a
    request mixing instantaneous and accumulated variables (written whole, then renamed)."""
    pl_path = out_dir / f"era5-pressure-levels_{year}.nc"
    pl.to_netcdf(pl_path, encoding=_encoding(pl), engine="netcdf4")
    zpath = out_dir / f"era5-single-levels_{year}.zip"
    with zipfile.ZipFile(zpath.with_suffix(".partial"), "w") as zf:
        for name, ds in (("instant", inst), ("accum", accum)):
            member = out_dir / f".{year}-{name}.nc"
            ds.to_netcdf(member, encoding=_encoding(ds), engine="netcdf4")
            zf.write(member, f"data_stream-oper_stepType-{name}.nc")
            member.unlink()
    zpath.with_suffix(".partial").rename(zpath)
    return [zpath, pl_path]


def demo_cube(world: DemoWorld = DemoWorld()) -> xr.Dataset:
    """The demo directly in the canonical store layout (for tests and as the import's reference)."""
    waves, static = _waves(world), _static(world)
    times = model_times(world)
    st = _state(world, _hours_since_epoch(times), waves, static)
    tp = np.zeros_like(st["tp_rate"])
    for k in range(6):
        tp += _state(world, _hours_since_epoch(times) - k - 0.5, waves, static)["tp_rate"]
    d3, d4 = ("time", "latitude", "longitude"), ("time", "level", "latitude", "longitude")
    data = {k: (d3, st[k].astype(np.float32)) for k in ("2t", "10u", "10v", "msl")}
    data["tp"] = (d3, tp.astype(np.float32))
    data |= {k: (d4, st[k].astype(np.float32)) for k in ("z", "u", "v", "t", "q")}
    data |= {
        f"static_{k}": (("latitude", "longitude"), static[k].astype(np.float32))
        for k in ("z", "lsm", "slt")
    }
    return xr.Dataset(
        data,
        coords={
            "time": times.values,
            "level": list(world.levels),
            "latitude": world.lat,
            "longitude": world.lon,
        },
    )
