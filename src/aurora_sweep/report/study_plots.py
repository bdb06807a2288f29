"""The study's own figures, logged to its parent run when a sweep ends: Optuna's optimisation
history and parameter importances, and skill against the study's cost with the Pareto front.

Drawn as `verify.plots` draws a trial's (plain Agg figures, nothing left in pyplot); Optuna's
visualisations draw through pyplot, so they are drawn inside an `rc_context` and unregistered at
once.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aurora_sweep.verify.plots import finite, new_figure, note

if TYPE_CHECKING:
    import optuna
    from matplotlib.axes import Axes

    from aurora_sweep.config.study import StudyConfig

log = logging.getLogger(__name__)


def skill_vs_memory(
    trials: list[dict], *, skill: str = "skill", memory: str = "peak memory (MB)"
) -> Figure:
    """Skill against peak memory (or another cost), one point per trial, the most skilful
    highlighted and the Pareto front drawn: the trials no other beats in both, each labelled
    with its recipe, so the figure says how much skill each extra megabyte buys.

    Args:
        trials: dicts with "number", "skill", "peak_mb", "label" (the recipe in a few words,
            such as "dora r8 qkv+proj bf16") and optionally "front" (True for a Pareto front
            member); trials without a finite skill or memory are left out.
        skill: what the skill is, for the y axis.
        memory: what the memory is, for the x axis.
    """
    fig = new_figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    points = [t for t in trials if finite(t.get("skill")) and finite(t.get("peak_mb"))]
    if points:
        x = [float(t["peak_mb"]) for t in points]
        y = [float(t["skill"]) for t in points]
        ax.scatter(x, y, s=28, color="C0", alpha=0.8, label="trial", zorder=2)
        for t, xi, yi in zip(points, x, y):
            ax.annotate(
                str(t["number"]), (xi, yi), xytext=(4, 3), textcoords="offset points", fontsize=7
            )
        _pareto_front(ax, [t for t in points if t.get("front")])
        best = max(points, key=lambda t: float(t["skill"]))
        ax.scatter(
            [float(best["peak_mb"])],
            [float(best["skill"])],
            s=160,
            marker="*",
            color="C3",
            zorder=3,
            label=f"best: #{best['number']} {best.get('label', '')}".rstrip(),
        )
        ax.legend(loc="best", fontsize=8)
    else:
        note(ax, "no trial with both a skill and a peak memory")
    ax.set(xlabel=memory, ylabel=f"{skill} (higher is better)", title="Skill and memory")
    ax.grid(alpha=0.3)
    return fig


def _pareto_front(ax: Axes, front: list[dict]) -> None:
    """The Pareto front's trials joined as a step line, each labelled with its recipe."""
    if not front:
        return
    front = sorted(front, key=lambda t: float(t["peak_mb"]))
    x, y = [float(t["peak_mb"]) for t in front], [float(t["skill"]) for t in front]
    label = f"Pareto front ({len(front)} trials)"
    ax.step(x, y, where="post", color="C2", linewidth=1.2, zorder=1, label=label)
    for t, xi, yi in zip(front, x, y):
        style = {"textcoords": "offset points", "fontsize": 6, "color": "C2"}
        ax.annotate(t.get("label", ""), (xi, yi), xytext=(4, -9), **style)


def _optuna_figure(plot: Callable[..., Axes], study: optuna.Study, **kwargs: Any) -> Figure | None:
    """Draw one of Optuna's matplotlib plots without leaving anything behind in pyplot.

    Optuna draws through pyplot and calls `plt.style.use("ggplot")`: the rc_context puts the
    global style back, and every figure it opened is closed in pyplot (the one returned stays
    renderable, now on its own Agg canvas). Returns None when Optuna cannot draw the study.
    """
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    fig = None
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning and small-study notices
        try:
            fig = plot(study, **kwargs).figure
        except Exception as error:  # a figure is never worth failing a sweep for
            log.info("Optuna could not draw %s: %s", plot.__name__, error)
        finally:
            for number in set(plt.get_fignums()) - before:
                plt.close(number)
    if fig is not None:
        FigureCanvasAgg(fig)  # detach from the closed pyplot manager, whatever its backend
        if fig.get_layout_engine() is None:
            fig.set_layout_engine("tight")  # the importances' long parameter names get cut off
    return fig


def _importances_computable(complete: Sequence[optuna.trial.FrozenTrial]) -> bool:
    """Importances need two complete trials and a parameter, shared by all, that varied."""
    if len(complete) < 2:
        return False
    shared = set.intersection(*(set(t.params) for t in complete))
    return any(len({repr(t.params[name]) for t in complete}) > 1 for name in shared)


def study_figures(
    study: optuna.Study,
    trials_for_memory: list[dict],
    *,
    name: str = "skill_vs_memory.png",
    **labels: str,
) -> dict[str, Figure]:
    """The study-level figures, keyed by file name; what cannot be drawn yet is left out.

    Args:
        study: the Optuna study (single- or multi-objective; the first objective is plotted).
        trials_for_memory: dicts for `skill_vs_memory`.
        name: the file name of the `skill_vs_memory` figure.
        labels: `skill` and `memory` axis labels for `skill_vs_memory`.
    """
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    # Optuna leaves out trials whose value is inf or NaN and then draws an empty plot.
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.values and finite(t.values[0])
    ]
    names = study.metric_names
    target_name = names[0] if names else "Objective Value"
    kwargs: dict[str, Any] = {"target_name": target_name}
    if len(study.directions) > 1:
        kwargs["target"] = lambda trial: trial.values[0]

    figures: dict[str, Figure] = {}
    if complete:
        fig = _optuna_figure(optuna_plots.plot_optimization_history, study, **kwargs)
        if fig is not None:
            figures["optimization_history.png"] = fig
    if _importances_computable(complete):
        fig = _optuna_figure(optuna_plots.plot_param_importances, study, **kwargs)
        if fig is not None:
            figures["param_importances.png"] = fig
    if any(finite(t.get("skill")) and finite(t.get("peak_mb")) for t in trials_for_memory):
        figures[name] = skill_vs_memory(trials_for_memory, **labels)
    return figures


def log_study_figures(client, run_id: str, study: optuna.Study, config: StudyConfig) -> None:
    """Log to the study's parent run Optuna's optimisation history and importances, and skill
    against the study's cost with the Pareto front drawn."""
    import matplotlib.pyplot as plt

    from aurora_sweep.report.best import skill_and_cost

    cost, points, on_gpu = skill_and_cost(config, study.get_trials(deepcopy=False))
    if not points:
        return
    if cost == "peak_memory_mb":
        axis = "peak GPU memory (MB)" if on_gpu else "peak resident memory of the trial (MB, CPU)"
    else:  # a CPU study's figure shows the GPU memory each recipe is predicted to need
        axis = {
            "predicted_peak_mb": "predicted peak GPU memory (MB)",
            "trial_seconds": "trial wall time (s)",
        }[cost]
    labels = {
        "skill": f"skill vs climatology (1 − {config.objective}/climatology's)",
        "memory": axis,
    }
    figure = "skill_vs_time.png" if cost == "trial_seconds" else "skill_vs_memory.png"
    for name, fig in study_figures(study, points, name=figure, **labels).items():
        client.log_figure(run_id, fig, f"study/{name}")
        plt.close(fig)
