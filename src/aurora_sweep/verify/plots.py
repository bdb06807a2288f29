"""Figures for a sweep's runs and report, drawn offline and without leaking memory.

A sweep logs figures for hundreds of trials from one long-lived process. pyplot keeps every figure
it creates in a global registry until it is closed, so the figures here are plain
`matplotlib.figure.Figure` objects on an Agg canvas, freed like any object once dropped. The one
exception is Optuna's own matplotlib visualisations (optimisation history, parameter importances):
they draw through pyplot and switch the global style to ggplot, so they are drawn inside an
`rc_context` (the style does not leak into later figures) and unregistered from pyplot at once.

Maps need no cartopy, which downloads its coastlines at first use and fails on offline machines:
the coastline is the 0.5 contour of the store's land-sea mask. Values are in the study's target's
units (`targets.Target`; tp by default: mm per 6 h), on a class scale of its own.
"""

from __future__ import annotations

import io
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, Colormap, ListedColormap, Normalize
from matplotlib.dates import ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from aurora_sweep.config.targets import DEFAULT, TARGETS, Target

if TYPE_CHECKING:
    from matplotlib.axes import Axes


log = logging.getLogger(__name__)

DPI = 100
#: Class edges of the shared precipitation scale (mm per 6 h); below 0.1 mm counts as dry. Another
#: precipitation-like target's are these times its first threshold over tp's (`_scale_levels`).
PRECIP_LEVELS = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
_TP = TARGETS[DEFAULT]
MAP_COLUMNS = ("observed", "forecast", "persistence")
MISSING_COLOUR = "0.88"  # NaN points on maps
COAST_COLOUR = "0.2"


def new_figure(layout: str | None = "constrained", **kwargs: Any) -> Figure:
    """A figure on its own Agg canvas, unknown to pyplot, so it is freed when dropped."""
    fig = Figure(layout=layout, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def note(ax: Axes, text: str) -> None:
    """Say in the middle of an empty panel why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def png_bytes(fig: Figure, *, dpi: int = DPI) -> bytes:
    """Render a figure to PNG, then close and clear it.

    Args:
        fig: the figure; it is unusable afterwards (its artists are cleared to free memory, and
            it is closed in pyplot if pyplot knows it).
        dpi: resolution of the PNG.
    """
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        if "matplotlib.pyplot" in sys.modules:  # nothing can be registered without pyplot
            sys.modules["matplotlib.pyplot"].close(fig)
        fig.clear()
    return buffer.getvalue()


def loss_curves(train_loss: list[tuple[int, float]], val_loss: list[tuple[int, float]]) -> Figure:
    """Normalised MSE against step: training as a thin line, validation as markers.

    Args:
        train_loss: (step, loss) pairs, one per logged training step.
        val_loss: (step, loss) pairs, one per validation.
    """
    fig = new_figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    if train_loss:
        steps, values = zip(*train_loss)
        ax.plot(steps, values, lw=0.8, alpha=0.8, color="C0", label="training")
    if val_loss:
        steps, values = zip(*val_loss)
        ax.plot(steps, values, ls="none", marker="o", ms=5, color="C1", label="validation")
    finite = [v for _, v in (*train_loss, *val_loss) if np.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        ax.set_yscale("log")  # losses fall by decades; a linear axis hides the late steps
    if finite:
        ax.legend()
    else:
        note(ax, "no loss recorded")
    ax.set(xlabel="step", ylabel="normalised MSE", title="Loss")
    ax.grid(alpha=0.3)
    return fig


def _area_means(fields: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """cos(latitude)-weighted mean of each (lat, lon) field of a stack, NaN points left out."""
    weights = np.broadcast_to(np.cos(np.deg2rad(lat))[None, :, None], fields.shape)
    present = np.isfinite(fields)
    total = np.where(present, fields * weights, 0.0).sum(axis=(1, 2))
    weight = np.where(present, weights, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / weight


def pick_cases(observed: np.ndarray, lat: np.ndarray) -> dict[str, int]:
    """The samples to map: wettest, median and driest by cos(latitude)-weighted area mean.

    Ties keep sample order, so the three indices are distinct whenever there are at least three
    samples with a finite mean.

    Args:
        observed: (sample, lat, lon) observed target (tp in mm); NaN points left out.
        lat: latitudes in degrees, one per row of a field.
    """
    observed = np.asarray(observed, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    if observed.ndim != 3 or observed.shape[1] != lat.size:
        raise ValueError(
            f"observed must be (sample, lat, lon) with {lat.size} latitudes, got {observed.shape}"
        )
    means = _area_means(observed, lat)
    finite = np.flatnonzero(np.isfinite(means))
    if finite.size == 0:
        raise ValueError("pick_cases needs at least one sample with a finite value")
    order = finite[np.argsort(means[finite], kind="stable")]
    return {
        "wet": int(order[-1]),
        "median": int(order[(order.size - 1) // 2]),
        "dry": int(order[0]),
    }


def _plot_longitudes(lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitudes in the convention that keeps the box in one piece, and the order sorting them.

    A box across Greenwich stored in 0..360 (rolled or not) comes out in -180..180, west negative;
    a box across the date line stays in 0..360. Ties prefer -180..180.
    """
    lon = np.asarray(lon, dtype=np.float64)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for candidate in (np.mod(lon + 180.0, 360.0) - 180.0, np.mod(lon, 360.0)):
        order = np.argsort(candidate, kind="stable")
        gap = float(np.max(np.diff(candidate[order]), initial=0.0))
        if best is None or gap < best[0] - 1e-9:
            best = (gap, candidate[order], order)
    assert best is not None
    return best[1], best[2]


def _lon_label(x: float, _pos: int | None = None) -> str:
    x = float(np.mod(x + 180.0, 360.0) - 180.0)
    if abs(x) < 1e-9 or abs(abs(x) - 180.0) < 1e-9:
        return f"{abs(x):g}°"
    return f"{abs(x):g}°{'E' if x > 0 else 'W'}"


def _lat_label(y: float, _pos: int | None = None) -> str:
    if abs(y) < 1e-9:
        return "0°"
    return f"{abs(y):g}°{'N' if y > 0 else 'S'}"


def _units(target: Target) -> str:
    """The units a figure labels: tp's 'mm per 6 h', else the target's own."""
    return "mm per 6 h" if target.name == DEFAULT else target.units


def _scale_levels(target: Target, fields: Sequence[np.ndarray]) -> tuple[float, ...]:
    """Class edges of the map scale: tp's classes (`PRECIP_LEVELS`) scaled to a precipitation-
    like target's thresholds (pr's in mm h-1 are a fifth of tp's), or seven equal classes
    over the observed range of a continuous one (swvl1)."""
    if target.thresholds:
        factor = target.thresholds[0] / _TP.thresholds[0]
        return tuple(round(v * factor, 6) for v in PRECIP_LEVELS)
    values = np.concatenate([np.ravel(f) for f in fields])
    values = values[np.isfinite(values)]
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    high = high if high > low else low + 1.0
    return tuple(float(v) for v in np.linspace(low, high, len(PRECIP_LEVELS)))


def _precip_scale(levels: Sequence[float] = PRECIP_LEVELS) -> tuple[Colormap, BoundaryNorm]:
    """The sequential class scale shared by observed, forecast and persistence maps: white
    below the first class (dry), the darkest blue above the last."""
    base = matplotlib.colormaps["YlGnBu"]
    colours = ["white", *base(np.linspace(0.2, 0.85, len(levels) - 2))]
    cmap = ListedColormap(colours).with_extremes(over=base(1.0), under="white", bad=MISSING_COLOUR)
    return cmap, BoundaryNorm(levels, cmap.N)


def _symmetric_limit(errors: Sequence[np.ndarray]) -> float:
    """A robust half-width for the error scale: the 99th percentile of |error|, at least 0.1."""
    magnitudes = np.abs(np.concatenate([e.ravel() for e in errors]))
    magnitudes = magnitudes[np.isfinite(magnitudes)]
    if magnitudes.size == 0:
        return 1.0
    return max(float(np.percentile(magnitudes, 99)), 0.1)


def case_maps(
    *,
    cases: list[dict],
    lat: np.ndarray,
    lon: np.ndarray,
    lsm: np.ndarray | None,
    target: Target = _TP,
) -> Figure:
    """Maps of a few cases: observed, forecast, persistence and the forecast's error.

    One row per case. The first three columns share one class scale and colorbar; the error has
    a symmetric diverging scale (brown: too dry, green: too wet) with its own colorbar. The
    coastline is the 0.5 contour of the land-sea mask.

    Args:
        cases: dicts with "label", "time" (text) and 2-D (lat, lon) fields of `target` (in its
            units) under "observed", "forecast" and "persistence".
        lat: latitudes in degrees (any order; descending as stored).
        lon: longitudes in degrees, in 0..360 or -180..180; a box across Greenwich is drawn with
            west negative.
        lsm: (lat, lon) land-sea mask (1 land, 0 sea), or None for no coastline.
        target: what the fields are (`targets.TARGETS`): the scale and the labels.
    """
    if not cases:
        raise ValueError("case_maps needs at least one case")
    units = _units(target)
    lat = np.asarray(lat, dtype=np.float64)
    lon_plot, order = _plot_longitudes(lon)
    shape = (lat.size, lon_plot.size)

    def grid(values: object, what: str) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64)
        if array.shape != shape:
            raise ValueError(f"{what} has shape {array.shape}, expected (lat, lon) = {shape}")
        return array[:, order]

    rows = [
        {key: grid(case[key], f"case {case.get('label')!r}: {key}") for key in MAP_COLUMNS}
        for case in cases
    ]
    mask = None if lsm is None else grid(lsm, "lsm")
    errors = [row["forecast"] - row["observed"] for row in rows]
    limit = _symmetric_limit(errors)
    levels = _scale_levels(target, [row["observed"] for row in rows])
    precip_cmap, precip_norm = _precip_scale(levels)
    error_cmap = matplotlib.colormaps["BrBG"].with_extremes(bad=MISSING_COLOUR)
    error_norm = Normalize(-limit, limit)

    # One degree of longitude is cos(latitude) as long as one of latitude.
    aspect = 1.0 / max(np.cos(np.deg2rad(np.mean(lat))), 0.1)
    lat_span = float(np.ptp(lat)) or 1.0
    lon_span = float(np.ptp(lon_plot)) or 1.0
    # A fixed layout in inches: a layout engine measures every tick label of the 12 panels
    # twice and took 1.5 s of each trial's 2 s figure.
    shape_ratio = lat_span * aspect / lon_span  # height over width of one map
    panel_h = float(np.clip(3.0 * shape_ratio, 1.2, 6.0))
    panel_w = float(np.clip(panel_h / shape_ratio, 1.5, 3.0))  # a tall box gets narrow panels
    left, right, gap, title, row_gap, top = 1.05, 0.25, 0.2, 0.25, 0.12, 0.5
    bottom = 1.45  # the last row's tick labels, then the colorbars and their labels
    width = left + 4 * panel_w + 3 * gap + right
    height = top + len(cases) * (title + panel_h) + (len(cases) - 1) * row_gap + bottom
    fig = new_figure(None, figsize=(width, height))

    def rect(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """A rectangle given in inches from the top left, in figure fractions."""
        return (x / width, 1.0 - (y + h) / height, w / width, h / height)

    axes = np.empty((len(cases), 4), dtype=object)
    for r in range(len(cases)):
        y = top + r * (title + panel_h + row_gap) + title
        for c in range(4):
            share = None if r == c == 0 else axes[0, 0]
            axes[r, c] = fig.add_axes(
                rect(left + c * (panel_w + gap), y, panel_w, panel_h), sharex=share, sharey=share
            )
            axes[r, c].tick_params(labelleft=c == 0, labelbottom=r == len(cases) - 1)

    precip_mesh = error_mesh = None
    for r, (case, row, error) in enumerate(zip(cases, rows, errors)):
        for c, key in enumerate(MAP_COLUMNS):
            precip_mesh = axes[r, c].pcolormesh(
                lon_plot, lat, row[key], cmap=precip_cmap, norm=precip_norm, shading="nearest"
            )
            axes[r, c].set_title(key, fontsize=10)
        error_mesh = axes[r, 3].pcolormesh(
            lon_plot, lat, error, cmap=error_cmap, norm=error_norm, shading="nearest"
        )
        axes[r, 3].set_title("forecast − observed", fontsize=10)
        axes[r, 0].set_ylabel(f"{case['label']}\n{case['time']}", fontweight="bold")
        for ax in axes[r]:
            _decorate_map(ax, lon_plot, lat, mask, aspect)

    bar_y = height - bottom + 0.55
    three = 3 * panel_w + 2 * gap
    fig.colorbar(
        precip_mesh,
        cax=fig.add_axes(rect(left + 0.2 * three, bar_y, 0.6 * three, 0.15)),
        orientation="horizontal",
        extend="max",
        ticks=levels,
        format="{x:.3g}",
        label=f"{target.name} ({units})",
    )
    fig.colorbar(
        error_mesh,
        cax=fig.add_axes(rect(left + 3 * (panel_w + gap) + 0.1, bar_y, panel_w - 0.2, 0.15)),
        orientation="horizontal",
        extend="both",
        label=f"forecast − observed\n({units})",
    )
    fig.suptitle(f"{target.what} ({units})", y=1.0 - 0.2 / height, va="center")
    return fig


def _decorate_map(
    ax: Axes, lon: np.ndarray, lat: np.ndarray, mask: np.ndarray | None, aspect: float
) -> None:
    """Coastline, aspect and degree labels of one map panel."""
    if mask is not None and min(mask.shape) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an all-sea box has no 0.5 contour
            ax.contour(lon, lat, mask, levels=[0.5], colors=COAST_COLOUR, linewidths=0.7)
    ax.set_aspect(aspect)
    ax.xaxis.set_major_formatter(FuncFormatter(_lon_label))
    ax.yaxis.set_major_formatter(FuncFormatter(_lat_label))
    ax.tick_params(labelsize=7)


def finite(value: object) -> bool:
    try:
        return bool(np.isfinite(float(value)))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _finite_pairs(forecast: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    both = np.isfinite(forecast) & np.isfinite(observed)
    return forecast[both], observed[both]


def reliability(
    forecast: np.ndarray | Mapping[str, np.ndarray],
    observed: np.ndarray,
    target: Target = _TP,
    thresholds: Sequence[float] | None = None,
) -> Figure:
    """Reliability of rain occurrence by threshold, for one or several deterministic forecasts.

    One panel per threshold: the forecast amount is binned on log-spaced bins, and each bin shows
    how often the observed amount reached the threshold (a perfect forecast jumps from 0 to 1 at
    the dotted line); the faint steps are the number of points per bin (right axis). The last
    panel puts each forecast's frequency of occurrence against the observed one: points above
    the diagonal forecast the event too often (frequency bias > 1).

    Args:
        forecast: one forecast array, or a dict name -> array (model, persistence, climatology).
        observed: observed amounts of `target`, the same shape as each forecast.
        target: what is forecast (`targets.TARGETS`): its units and thresholds.
        thresholds: event thresholds in the target's units (None: `target.thresholds`).
    """
    forecasts = dict(forecast) if isinstance(forecast, Mapping) else {"model": forecast}
    observed = np.asarray(observed, dtype=np.float64)
    thresholds = tuple(float(t) for t in (target.thresholds if thresholds is None else thresholds))
    units = _units(target)
    if not forecasts or not thresholds:
        raise ValueError("reliability needs at least one forecast and one threshold")
    pairs = {}
    for name, values in forecasts.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != observed.shape:
            raise ValueError(
                f"forecast {name!r} has shape {values.shape}, observed {observed.shape}"
            )
        pairs[name] = _finite_pairs(values.ravel(), observed.ravel())

    largest = [float(f.max()) for f, _ in pairs.values() if f.size]
    top = max([20.0, *largest]) * 1.0001
    edges = np.concatenate([[0.0], np.geomspace(0.01, top, 16)])
    centres = np.concatenate([[0.005], np.sqrt(edges[1:-1] * edges[2:])])  # dry bin drawn at 0.005

    fig = new_figure(figsize=(3.8 * (len(thresholds) + 1), 3.9))
    axes = fig.subplots(1, len(thresholds) + 1, squeeze=False)[0]
    for ax, threshold in zip(axes, thresholds):
        counts_ax = ax.twinx()
        for i, (name, (f, o)) in enumerate(pairs.items()):
            index = np.digitize(f, edges[1:-1])
            counts = np.bincount(index, minlength=centres.size).astype(np.float64)
            hits = np.bincount(index, weights=o >= threshold, minlength=centres.size)
            with np.errstate(invalid="ignore", divide="ignore"):
                frequency = np.where(counts > 0, hits / counts, np.nan)
            ax.plot(centres, frequency, marker="o", ms=3.5, lw=1.2, color=f"C{i}", label=name)
            counts[counts == 0] = np.nan
            counts_ax.step(centres, counts, where="mid", color=f"C{i}", alpha=0.25, lw=1)
        ax.axvline(threshold, color="0.4", ls=":", lw=1)
        ax.set(
            xscale="log",
            ylim=(-0.03, 1.03),
            xlabel=f"forecast ({units})",
            ylabel=f"observed frequency of ≥ {threshold:g} {target.units}",
            title=f"{target.name} ≥ {threshold:g} {target.units}",
        )
        ax.grid(alpha=0.3)
        counts_ax.set_yscale("log")
        for axis in (ax.xaxis, counts_ax.yaxis):
            axis.set_minor_formatter(NullFormatter())  # minor log labels cost most of a render
        counts_ax.set_ylabel("points per bin", color="0.55", fontsize=8)
        counts_ax.tick_params(colors="0.55", labelsize=7)
        ax.set_zorder(counts_ax.get_zorder() + 1)  # lines above the faint counts
        ax.patch.set_visible(False)

    _frequency_bias_panel(axes[-1], pairs, thresholds, target.units)
    fig.suptitle(f"Reliability of {target.name} events by threshold")
    return fig


def _frequency_bias_panel(
    ax: Axes,
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    thresholds: Sequence[float],
    units: str,
) -> None:
    """Forecast against observed frequency of occurrence, one point per threshold."""
    shown: list[float] = []
    for i, (name, (f, o)) in enumerate(pairs.items()):
        if f.size == 0:
            continue
        obs_freq = np.array([np.mean(o >= t) for t in thresholds])
        fc_freq = np.array([np.mean(f >= t) for t in thresholds])
        keep = (obs_freq > 0) & (fc_freq > 0)  # a log axis cannot show a frequency of zero
        ax.plot(obs_freq[keep], fc_freq[keep], marker="o", ms=5, lw=0.8, color=f"C{i}", label=name)
        shown.extend([*obs_freq[keep], *fc_freq[keep]])
        if i == 0:
            for t, x, y in zip(thresholds, obs_freq, fc_freq):
                if x > 0 and y > 0:
                    ax.annotate(
                        f"≥ {t:g} {units}",
                        (x, y),
                        xytext=(5, -10),
                        textcoords="offset points",
                        fontsize=7,
                    )
    low = min(shown) / 2 if shown else 1e-3
    ax.plot([low, 1.0], [low, 1.0], color="0.5", ls="--", lw=0.8, label="no bias")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(low, 1.2),
        ylim=(low, 1.2),
        xlabel="observed frequency",
        ylabel="forecast frequency",
        title="Frequency of occurrence",
    )
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def point_series(
    times: Sequence[object] | np.ndarray,
    series: dict[str, np.ndarray],
    *,
    title: str,
    observed_key: str = "observed",
    target: Target = _TP,
) -> Figure:
    """Time series of a target's 6-hour values (tp: totals) at one grid point.

    A precipitation-like target's observed series is drawn as grey stems from 0 (one per 6-hour
    total, visible at any time scale); a continuous one's (soil moisture) as a thick grey line,
    on an axis that fits its range rather than starting at 0. The others (model, persistence,
    ...) are lines with a point at each end time. Every line breaks wherever the samples have a
    gap (a split need not be continuous), so none bridges missing days.

    Args:
        times: end times of the 6-hour periods (datetime64, datetimes or ISO strings) or steps.
        series: name -> 1-D array of the target (its units), one value per time.
        title: the panel title (say where the point is).
        observed_key: which entry of `series` is the observation.
        target: what the series are (`targets.TARGETS`): the axis label.
    """
    t = np.asarray(times)
    if t.dtype.kind in "OUS":
        t = t.astype("datetime64[ns]")
    gaps = np.zeros(t.shape, dtype=bool)
    if t.size > 1:
        steps = np.diff(t)
        gaps[1:] = steps > np.min(steps)  # a step longer than the regular one starts a new piece
    fig = new_figure(figsize=(8.0, 3.6))
    ax = fig.add_subplot()
    colour = 0
    for name, values in series.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != t.shape:
            raise ValueError(f"series {name!r} has shape {values.shape}, times {t.shape}")
        # NaN at each gap's first point breaks a line there; markers keep every value
        broken = np.where(gaps, np.nan, values)
        if name == observed_key and target.precipitation_like:
            ax.vlines(t, 0, values, color="0.55", lw=1.6, alpha=0.8, label=name)
        elif name == observed_key:
            ax.plot(t, broken, lw=2.5, color="0.6", label=name)
        else:
            ax.plot(t, broken, lw=1.0, color=f"C{colour}", label=name)
            ax.plot(t, values, ls="none", marker=".", ms=3, color=f"C{colour}")
            colour += 1
    if t.dtype.kind == "M":
        ax.xaxis.set_major_formatter(ConciseDateFormatter(ax.xaxis.get_major_locator()))
    if target.precipitation_like:
        ax.set_ylim(bottom=0)
    ax.set(ylabel=f"{target.name} ({_units(target)})", title=title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="upper right", fontsize=8)
    return fig
