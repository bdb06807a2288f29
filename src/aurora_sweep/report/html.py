"""One self-contained HTML page that says what a sweep found: the recipe, its scores, its figures.

The report is mailed around, opened on machines without network and printed, so the page carries
everything inline: CSS in a <style> element, figures as base64 PNG data URLs, no scripts, fonts,
stylesheets or images to fetch. Each score stands beside persistence and climatology with the
model's 90 % interval, because nearby recipes differ by less than their sampling noise: "better
than both" is only a plain "yes" when the whole interval clears both baselines.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path

from aurora_sweep.config.objective import Objective, forget_name
from aurora_sweep.config.targets import DEFAULT, TARGETS, Target
from aurora_sweep.sweep.records import worst_forgetting

MISSING = "–"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: A fine-tuned RMSE this much above the base model's is flagged as forgetting.
FORGETTING_FLAG = 1.05

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b;
       max-width: 62rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
header { border-bottom: 2px solid #1b1b1b; margin-bottom: 1.5rem; }
h1 { margin: 0 0 0.2rem; font-size: 1.7rem; }
.subtitle { margin: 0 0 0.8rem; color: #555; }
h2 { font-size: 1.2rem; margin: 2rem 0 0.6rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.4rem 0 0.6rem; font-size: 0.92rem; }
th, td { border: 1px solid #bbb; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.key { display: block; color: #666; font-size: 0.8rem; font-family: ui-monospace, monospace; }
.yes { background: #e3f3e6; }
.no { background: #fbe4e1; }
.noise { background: #fff4d6; }
tr.worse td { background: #fbe4e1; font-weight: 600; }
.legend { color: #555; font-size: 0.85rem; margin: 0; }
figure { margin: 1.2rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.9rem; margin-top: 0.3rem; }
@media print {
  body { max-width: none; margin: 0; font-size: 10pt; }
  h2 { break-after: avoid; }
  table, figure, tr { break-inside: avoid; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


def _number(value: object) -> float | None:
    """The value as a float, or None when it is missing or not finite."""
    if value is None or isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fmt(value: object) -> str:
    """Text for a table cell: numbers to 4 significant figures, missing values as a dash."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Real):
        if isinstance(value, Integral):
            return str(int(value))
        number = _number(value)
        return MISSING if number is None else f"{number:.4g}"
    return str(value)


def _e(value: object) -> str:
    return html.escape(_fmt(value), quote=True)


def _verdict(row: Mapping[str, object]) -> tuple[str, str]:
    """Whether the model beats both baselines: text and CSS class.

    "yes" when the model is better than persistence and climatology and so is the worse end of
    its 90 % interval (or no interval was given); "within noise" when the model is better but its
    interval reaches a baseline; "no" when it is not better than both; a dash when a value is
    missing.
    """
    model = _number(row.get("model"))
    baselines = [_number(row.get("persistence")), _number(row.get("climatology"))]
    if model is None or any(b is None for b in baselines):
        return MISSING, ""
    higher = bool(row.get("higher_is_better", False))
    target = _number(row.get("target"))
    if target is not None:  # bias-like scores: best at `target`, judged by the distance to it

        def beats(value: float) -> bool:
            return all(abs(value - target) < abs(b - target) for b in baselines)  # type: ignore[operator]

        if not beats(model):
            return "no", "no"
        return "yes", "yes"

    def beats(value: float) -> bool:
        return all(value > b if higher else value < b for b in baselines)  # type: ignore[operator]

    if not beats(model):
        return "no", "no"
    low, high = _number(row.get("q05")), _number(row.get("q95"))
    if low is None or high is None:
        return "yes", "yes"
    return ("yes", "yes") if beats(low if higher else high) else ("within noise", "noise")


def _interval(row: Mapping[str, object]) -> str:
    low, high = _number(row.get("q05")), _number(row.get("q95"))
    if low is None or high is None:
        return MISSING
    return f"[{_fmt(low)}, {_fmt(high)}]"


def _caption(key: str) -> str:
    """A figure's file name in words: "skill_vs_memory.png" -> "Skill vs memory"."""
    words = re.sub(r"[_\-/]+", " ", re.sub(r"\.png$", "", key, flags=re.IGNORECASE)).strip()
    return words[:1].upper() + words[1:] if words else key


def _recipe_section(recipe: Mapping[str, object]) -> list[str]:
    if not recipe:
        return ["<h2>Recipe</h2>", "<p>None recorded.</p>"]
    rows = [f"<tr><th scope='row'>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in recipe.items()]
    return ["<h2>Recipe</h2>", "<table class='recipe'>", *rows, "</table>"]


def _scores_section(scores: Sequence[Mapping[str, object]]) -> list[str]:
    out = ["<h2>Scores</h2>"]
    if not scores:
        return [*out, "<p>None recorded.</p>"]
    out += [
        "<table class='scores'>",
        "<tr><th>score</th><th>model</th><th>90 % interval</th><th>persistence</th>"
        "<th>climatology</th><th>better than both?</th></tr>",
    ]
    for row in scores:
        target = _number(row.get("target"))
        if target is not None:
            direction = f"best at {_fmt(target)}"
        else:
            direction = "higher is better" if row.get("higher_is_better") else "lower is better"
        label = row.get("label") or row.get("score")
        verdict, css = _verdict(row)
        out.append(
            f"<tr><td>{_e(label)}<span class='key'>{_e(row.get('score'))} · {direction}</span></td>"
            f"<td class='num'>{_e(row.get('model'))}</td>"
            f"<td class='num'>{html.escape(_interval(row))}</td>"
            f"<td class='num'>{_e(row.get('persistence'))}</td>"
            f"<td class='num'>{_e(row.get('climatology'))}</td>"
            f"<td{f' class={css!r}' if css else ''}>{html.escape(verdict)}</td></tr>"
        )
    out += [
        "</table>",
        "<p class='legend'>yes: the model and its whole 90 % interval are better than both "
        "baselines; within noise: the model is better but its interval reaches a baseline; "
        f"no: not better than both; {MISSING}: a value is missing.</p>",
    ]
    return out


def _forgetting_section(forgetting: Sequence[Mapping[str, object]]) -> list[str]:
    out = ["<h2>What the fine-tune changed</h2>"]
    if not forgetting:
        return [*out, "<p>None recorded.</p>"]
    later = [k for k in ("ratio_12h", "ratio_24h") if any(k in row for row in forgetting)]
    heads = "".join(f"<th>ratio at {k.removeprefix('ratio_')}</th>" for k in later)
    out += [
        "<table class='forgetting'>",
        "<tr><th>variable</th><th>base RMSE</th><th>fine-tuned RMSE</th><th>ratio</th>"
        f"{heads}</tr>",
    ]
    for row in forgetting:
        ratios = [_number(row.get(k)) for k in ("ratio", *later)]
        worse = any(r is not None and r > FORGETTING_FLAG for r in ratios)
        opening = "<tr class='worse'>" if worse else "<tr>"
        out.append(
            f"{opening}<td>{_e(row.get('variable'))}</td>"
            f"<td class='num'>{_e(row.get('base_rmse'))}</td>"
            f"<td class='num'>{_e(row.get('finetuned_rmse'))}</td>"
            f"<td class='num'>{_e(row.get('ratio'))}</td>"
            + "".join(f"<td class='num'>{_e(row.get(k))}</td>" for k in later)
            + "</tr>"
        )
    out += [
        "</table>",
        "<p class='legend'>ratio = fine-tuned RMSE / base RMSE at 6 h (and at the longer leads, "
        "rolled out): above 1 the fine-tuned model is worse than the base model; rows above "
        f"{FORGETTING_FLAG:g} at any lead are highlighted.</p>",
    ]
    return out


def _leads_section(leads: Sequence[Mapping[str, object]]) -> list[str]:
    """The objective against both baselines, skill and worst forgetting at each lead."""
    if not leads:
        return []
    zero_shot = ("Aurora 1.5", "skill vs Aurora 1.5") if "Aurora 1.5" in leads[0] else ()
    cols = (
        "lead",
        "objective",
        "90 % interval",
        "persistence",
        "climatology",
        *zero_shot[:1],
        "skill vs persistence",
        "skill vs climatology",
        *zero_shot[1:],
        "worst forgetting",
    )
    out = [
        "<h2>By lead time</h2>",
        "<table class='leads'>",
        "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>",
    ]
    for row in leads:
        out.append("<tr>" + "".join(f"<td>{_e(row.get(c))}</td>" for c in cols) + "</tr>")
    return [
        *out,
        "</table>",
        "<p class='legend'>The target over the lead (a total, a mean rate, or the value at the "
        "valid time, as its kind is); beyond 6 h the model is rolled out, each forecast fed back "
        "as its next input; persistence is the observed value over the lead's length ending at "
        "the start, climatology the train-split mean of the same windows"
        + (
            "; Aurora 1.5 its own hourly precipitation over the lead, untrained (it was "
            "fine-tuned on IFS analyses and is started and scored here from ERA5)"
            if zero_shot
            else ""
        )
        + ".</p>",
    ]


def _figures_section(figures: Mapping[str, bytes]) -> list[str]:
    if not figures:
        return []
    out = ["<h2>Figures</h2>"]
    for key, data in figures.items():
        if not bytes(data[:8]) == PNG_SIGNATURE:
            raise ValueError(f"figure {key!r} is not a PNG (render it with figures.png_bytes)")
        encoded = base64.b64encode(data).decode("ascii")
        out.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{html.escape(key)}">'
            f"<figcaption>{html.escape(_caption(key))}</figcaption></figure>"
        )
    return out


def render_report(
    *,
    title: str,
    subtitle: str,
    recipe: dict[str, object],
    scores: list[dict],
    forgetting: list[dict],
    figures: dict[str, bytes],
    notes: Sequence[str] = (),
    leads: Sequence[Mapping[str, object]] = (),
) -> str:
    """The report as one self-contained HTML page.

    Args:
        title: page title (the study, usually).
        subtitle: one line under the title (the data, the period, when it was made).
        recipe: the chosen trial's configuration, shown as a key/value table.
        scores: rows {"score", "label", "model", "q05", "q95", "persistence", "climatology",
            "higher_is_better", "target"}; a row with a "target" (0 for a bias, 1 for a
            frequency bias) is better the closer it is to it; q05/q95 bound the model's 90 % interval; None where unknown.
        forgetting: rows {"variable", "base_rmse", "finetuned_rmse", "ratio"}; a ratio above 1
            means the fine-tuned model forecasts that variable worse than the base model.
        figures: file name -> PNG bytes, shown in this order with the name as alt text.
        notes: free-text remarks listed at the end.
        leads: rows {"lead", "objective", "90 % interval", "persistence", "climatology",
            "skill vs persistence", "skill vs climatology", "worst forgetting"}, one per lead.
    """
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'>",
        "<head>",
        "<meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='subtitle'>{html.escape(subtitle)}</p>",
        "</header>",
        *_recipe_section(recipe),
        *_scores_section(scores),
        *_leads_section(leads),
        *_forgetting_section(forgetting),
        *_figures_section(figures),
    ]
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>", *(f"<li>{html.escape(n)}</li>" for n in notes), "</ul>"]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(path: Path, **kwargs: object) -> Path:
    """Render the report (the arguments of `render_report`) and write it as UTF-8.

    Args:
        path: the HTML file to write; its folder is created if missing.
        kwargs: passed to `render_report`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(**kwargs), encoding="utf-8")  # type: ignore[arg-type]
    return path


def score_rows_spec(target: Target) -> list[tuple[str, str, bool | None, float | None]]:
    """The scores table's rows for `target`: (metric, label, higher is better, best value)."""
    from aurora_sweep.verify.metrics import FSS_WINDOWS

    u, m = target.units, target.metric
    rows: list[tuple[str, str, bool | None, float | None]] = [
        (m("seeps"), "SEEPS (0 perfect, 1 ≈ climatology)", False, None),
        (m("rmse"), f"RMSE ({u})", False, None),
        (m("mae"), f"MAE ({u})", False, None),
        (m("bias"), f"bias ({u}, 0 best)", None, 0.0),
        (m("acc"), "anomaly correlation (1 perfect, 0 ≈ climatology)", True, None),
    ]
    for t in target.thresholds:
        rows += [
            (m(f"csi_{t:g}"), f"CSI ≥ {t:g} {u}", True, None),
            (m(f"ets_{t:g}"), f"ETS ≥ {t:g} {u}", True, None),
            (m(f"fbias_{t:g}"), f"frequency bias ≥ {t:g} {u} (1 best)", None, 1.0),
        ]
    for t in target.fss_thresholds:
        for w in FSS_WINDOWS:
            rows.append((m(f"fss_{t:g}_w{w}"), f"FSS ≥ {t:g} {u}, {w}×{w} points", True, None))
    return rows


def report_rows(scores: dict[str, float], objective: Objective) -> list[dict]:
    """The scores table: each score for the model and both baselines, intervals where known."""
    rows = []
    for name, label, higher, target in score_rows_spec(objective.variable):
        if name not in scores:
            continue
        row = {
            "score": name,
            "label": label,
            "model": scores[name],
            "q05": scores.get(f"{name}_q05"),
            "q95": scores.get(f"{name}_q95"),
            "persistence": scores.get(f"{name}_persistence"),
            "climatology": scores.get(f"{name}_climatology"),
            "higher_is_better": bool(higher),
            "target": target,
        }
        rows.append(row)
    for ref in ("persistence", "climatology", "aurora15"):
        name = objective.skill(ref)
        if name not in scores:  # Aurora 1.5 untrained: where the study has that baseline
            continue
        rows.append(
            {
                "score": name,
                "label": f"skill vs {ref} (1 − {objective}/{objective.of(ref)})",
                "model": scores[name],
                "q05": scores.get(objective.skill(ref, "q05")),
                "q95": scores.get(objective.skill(ref, "q95")),
                "persistence": None,
                "climatology": None,
                "higher_is_better": True,
                "target": None,
            }
        )
    return rows


def forgetting_rows(scores: dict[str, float], base_mse: dict[str, float]) -> list[dict]:
    """Per variable: base RMSE, fine-tuned RMSE and their ratio at 6 h (> 1: the fine-tune made
    it worse), and the ratio at each longer lead scored (`ratio_12h`, `ratio_24h`)."""
    from aurora_sweep.config.recipe import LEADS, lead_suffix

    rows = []
    for name, mse in base_mse.items():
        ratio = scores.get(forget_name(name))
        if ratio is None:
            continue
        base = float(mse) ** 0.5
        row = {"variable": name, "base_rmse": base, "finetuned_rmse": base * ratio, "ratio": ratio}
        for steps, label in list(LEADS.items())[1:]:
            later = forget_name(name, lead_suffix(steps))
            if later in scores:
                row[f"ratio_{label}"] = scores[later]
        rows.append(row)
    return rows


def lead_rows(scores: dict[str, float], objective: Objective) -> list[dict]:
    """One row per lead scored: the objective with its interval, both baselines' objective, the
    skills and the worst forgetting ratio."""
    from aurora_sweep.config.recipe import LEADS, lead_suffix

    rows = []
    for steps, label in LEADS.items():
        at = objective.at(steps)
        if at.name not in scores:
            continue
        lo, hi = scores.get(at.of("q05")), scores.get(at.of("q95"))
        worst = worst_forgetting(scores, lead_suffix(steps))
        rows.append(
            {
                "lead": label,
                "objective": f"{scores[at.name]:.4f}",
                "90 % interval": f"{lo:.4f}–{hi:.4f}" if lo is not None and hi is not None else "",
                "persistence": f"{scores[at.of('persistence')]:.4f}",
                "climatology": f"{scores[at.of('climatology')]:.4f}",
                "skill vs persistence": f"{scores[at.skill('persistence')]:+.3f}",
                "skill vs climatology": f"{scores[at.skill('climatology')]:+.3f}",
                "worst forgetting": f"{worst[0]} ×{worst[1]:.2f}" if worst else "",
            }
        )
        if at.of("aurora15") in scores:  # the zero-shot Aurora 1.5 baseline
            rows[-1]["Aurora 1.5"] = f"{scores[at.of('aurora15')]:.4f}"
            rows[-1]["skill vs Aurora 1.5"] = f"{scores[at.skill('aurora15')]:+.3f}"
    return rows


def report_notes(
    references: Sequence[str],
    n_samples: int,
    split: str,
    times,
    adapted: str = "",
    target: Target = TARGETS[DEFAULT],
) -> list[str]:
    """The report's notes: how the adapter compares with the study's references, what was
    adapted (`adapted`, `bases.target_description`), what was scored (`target`), and how each
    score and baseline is defined."""
    seeps = (
        [
            f"SEEPS: dry at most {target.per_lead(0.1, 6):g} {target.units} (WeatherBench 2's 0.1 mm "
            "for 6-hour totals); dry probability and light/heavy threshold per grid point, month and "
            "hour of day from the train split (not WeatherBench 2's 30-year climate); points with a "
            "dry probability outside 0.1..0.85 are left out."
        ]
        if target.seeps
        else []
    )
    return [
        *([adapted] if adapted else []),
        *(
            f"Against the study's reference recipes (validation split): {line}"
            for line in references
        ),
        f"{n_samples} samples of the {split} split ({times.min():%Y-%m-%d} to "
        f"{times.max():%Y-%m-%d}); {target.name}: {target.what}, {target.each_step}, in "
        f"{target.units}; scores latitude-weighted where it applies.",
        "Intervals: 90 % paired block bootstrap over days (blocks of consecutive days keep the "
        "day-to-day correlation). 'within noise': better than both baselines, but the interval "
        "reaches one of them.",
        "Persistence repeats what was observed when the forecast starts (the value then, or "
        "over the lead's length ending then); climatology is the train-split mean by grid point, "
        "calendar month and time of day.",
        *seeps,
        "Forgetting: RMSE of the fine-tuned model over that of the untouched base model on the "
        "same samples, for the variables Aurora already predicted (> 1: worse than before).",
    ]
