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
    interior = any(row.get("region") == "interior" for row in leads)
    cols = (
        "lead",
        *(("region",) if interior else ()),
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
        + (
            "; interior: the box without its edge zone ([study] edge_margin in from each side), "
            "through whose edges a regional model is fed nothing"
            if interior
            else ""
        )
        + ".</p>",
    ]


def _finalists_section(finalists: Sequence[str]) -> list[str]:
    """The study's finalists, each recipe re-trained with more seeds, as `best` ranks them."""
    if not finalists:
        return []
    return [
        "<h2>The study's finalists</h2>",
        f"<pre class='finalists'>{html.escape(chr(10).join(finalists))}</pre>",
        "<p class='legend'>After the search, the best distinct recipes were trained again with "
        "more seeds; they are ranked by their mean over the seeds, this adapter being the "
        "winner's seed nearest that mean.</p>",
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
    finalists: Sequence[str] = (),
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
        leads: rows {"lead", "region", "objective", "90 % interval", "persistence", "climatology",
            "skill vs persistence", "skill vs climatology", "worst forgetting"}, one per lead.
        finalists: the study's finalists as `best` lists them (`report.finalists`), if any.
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
        *_finalists_section(finalists),
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
