import re

import pytest

from aurora_sweep.config.objective import Objective
from aurora_sweep.report.html import render_report, write_report

SEEPS = Objective.parse("tp_seeps")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16  # only the signature is checked


def report_args(**overrides) -> dict:
    args = {
        "title": "Aurora tp sweep",
        "subtitle": "demo data, test year 2024",
        "recipe": {"lora_rank": 8, "lora_targets": "qkv+proj", "learning_rate": 0.000312345},
        "scores": [
            {
                "score": "tp_seeps",
                "label": "SEEPS",
                "model": 0.4321,
                "q05": 0.41,
                "q95": 0.45,
                "persistence": 1.01,
                "climatology": 0.98,
                "higher_is_better": False,
            },
            {
                "score": "tp_fss_5_w5",
                "label": "FSS ≥ 5 mm",
                "model": 0.5,
                "q05": 0.3,
                "q95": 0.7,
                "persistence": 0.45,
                "climatology": 0.1,
                "higher_is_better": True,
            },
            {
                "score": "tp_csi_1",
                "label": "CSI ≥ 1 mm",
                "model": 0.2,
                "q05": None,
                "q95": None,
                "persistence": None,
                "climatology": float("nan"),
                "higher_is_better": True,
            },
        ],
        "forgetting": [
            {"variable": "2t", "base_rmse": 1.2, "finetuned_rmse": 1.21, "ratio": 1.0083},
            {"variable": "z500", "base_rmse": 50.0, "finetuned_rmse": 60.0, "ratio": 1.2},
        ],
        "figures": {"skill_vs_memory.png": PNG, "case_maps.png": PNG},
        "notes": ["Intervals: block bootstrap over days."],
    }
    return {**args, **overrides}


def table(page: str, css_class: str) -> str:
    return re.search(rf"<table class='{css_class}'>(.*?)</table>", page, re.S).group(1)


def test_report_embeds_every_figure_as_a_png_data_url_in_order_with_its_key_as_alt_text():
    page = render_report(**report_args())
    images = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]+)">', page)
    assert images == ["skill_vs_memory.png", "case_maps.png"]
    assert "<figcaption>Skill vs memory</figcaption>" in page


def test_report_references_no_external_resource():
    page = render_report(**report_args())
    assert 'src="http' not in page and "href=" not in page and "<link" not in page
    assert "<script" not in page and "@import" not in page and "url(" not in page


def test_report_escapes_a_title_with_markup():
    page = render_report(**report_args(title="<script>alert(1)</script>"))
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_scores_table_has_a_row_per_score_with_baselines_and_verdict():
    scores = table(render_report(**report_args()), "scores")
    rows = re.findall(r"<tr>(.*?)</tr>", scores, re.S)
    assert len(rows) == 4  # header + three scores
    assert "90 % interval" in rows[0] and "better than both?" in rows[0]
    assert "SEEPS" in rows[1] and "[0.41, 0.45]" in rows[1] and ">yes<" in rows[1]
    assert ">within noise<" in rows[2]  # 0.5 beats 0.45, but its interval reaches down to 0.3
    assert rows[3].count(">–<") == 4  # interval, persistence, climatology (NaN), verdict


def test_numbers_have_four_significant_figures():
    page = render_report(**report_args())
    assert ">0.4321<" in page and ">0.0003123<" in page and ">8<" in page


def test_forgetting_table_highlights_a_variable_made_worse_by_more_than_five_percent():
    forgetting = table(render_report(**report_args()), "forgetting")
    assert "<tr><td>2t</td>" in forgetting
    assert "<tr class='worse'><td>z500</td>" in forgetting


def test_empty_sections_say_so_and_notes_are_listed():
    page = render_report(**report_args(recipe={}, scores=[], forgetting=[], figures={}))
    assert page.count("None recorded.") == 3 and "<img" not in page
    assert "<li>Intervals: block bootstrap over days.</li>" in page


def test_report_refuses_figure_bytes_that_are_not_png():
    with pytest.raises(ValueError, match="not a PNG"):
        render_report(**report_args(figures={"x.png": b"GIF89a"}))


def test_write_report_writes_utf8(tmp_path):
    path = write_report(tmp_path / "out" / "report.html", **report_args())
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "FSS ≥ 5 mm" in path.read_text(encoding="utf-8")


def test_a_forgetting_row_worse_at_a_later_lead_only_is_highlighted_and_leads_get_a_table():
    from aurora_sweep.report.tables import forgetting_rows, lead_rows

    scores = {"forget_10v_ratio": 1.02, "forget_10v_ratio_24h": 1.4, "forget_2t_ratio": 0.9}
    rows = forgetting_rows(scores, {"10v": 4.0, "2t": 1.0})
    assert rows[0]["ratio_24h"] == 1.4 and "ratio_24h" not in rows[1]
    per_lead = {"tp_seeps": 0.2, "tp_seeps_24h": 0.3}
    for sfx in ("", "_24h"):
        per_lead |= {f"tp_seeps_persistence{sfx}": 0.5, f"tp_seeps_climatology{sfx}": 1.0,
                     f"tp_skill_persistence{sfx}": 0.6, f"tp_skill_climatology{sfx}": 0.8}  # fmt: skip
    leads = lead_rows(per_lead | scores, SEEPS)
    assert [r["lead"] for r in leads] == ["6h", "24h"]
    assert leads[1]["worst forgetting"] == "10v ×1.40"
    page = render_report(**report_args(forgetting=rows, leads=leads))
    assert "By lead time" in page and "ratio at 24h" in page
    assert page.count("<tr class='worse'>") == 1  # 10v: fine at 6 h, ×1.4 at 24 h


def test_the_zero_shot_aurora15_baseline_has_its_columns_where_the_study_scored_it():
    from aurora_sweep.report.tables import lead_rows, report_rows

    scores = {"tp_seeps": 0.3, "tp_seeps_q05": 0.28, "tp_seeps_q95": 0.32,
              "tp_seeps_persistence": 0.5, "tp_seeps_climatology": 0.9,
              "tp_skill_persistence": 0.4, "tp_skill_climatology": 0.667}  # fmt: skip
    plain = render_report(**report_args(leads=lead_rows(scores, SEEPS)))
    assert "Aurora 1.5" not in plain
    scores |= {"tp_seeps_aurora15": 0.4, "tp_skill_aurora15": 0.25}
    rows = report_rows(scores, SEEPS)
    assert [r["score"] for r in rows if r["score"].startswith("tp_skill")][
        -1
    ] == "tp_skill_aurora15"
    page = render_report(**report_args(leads=lead_rows(scores, SEEPS)))
    leads = table(page, "leads")
    assert "<th>Aurora 1.5</th>" in leads and "<td>0.4000</td>" in leads and "+0.250" in leads


def test_each_lead_has_a_row_for_the_whole_box_and_one_for_its_interior():
    from aurora_sweep.report.tables import lead_rows

    scores = {"forget_2t_ratio": 1.01, "forget_2t_ratio_24h": 1.03}
    for region, value in (("", 0.30), ("_interior", 0.25)):
        for sfx in ("", "_24h"):
            scores |= {f"tp_seeps{region}{sfx}": value + len(sfx) / 100,
                       f"tp_seeps_persistence{region}{sfx}": 0.5,
                       f"tp_seeps_climatology{region}{sfx}": 0.9,
                       f"tp_skill_persistence{region}{sfx}": 0.4,
                       f"tp_skill_climatology{region}{sfx}": 0.7}  # fmt: skip
    rows = lead_rows(scores, SEEPS)
    assert [(r["lead"], r["region"]) for r in rows] == [
        ("6h", "whole box"), ("6h", "interior"), ("24h", "whole box"), ("24h", "interior")
    ]  # fmt: skip
    assert [r["objective"] for r in rows] == ["0.3000", "0.2500", "0.3400", "0.2900"]
    # the forgetting ratios are the whole box's: not repeated on the interior's rows
    assert rows[2]["worst forgetting"] == "2t ×1.03" and rows[3]["worst forgetting"] == ""
    page = render_report(**report_args(leads=rows))
    assert "<th>region</th>" in table(page, "leads") and "edge_margin" in page
    # a study without an edge margin: no region column
    whole = {k: v for k, v in scores.items() if "_interior" not in k}
    assert "<th>region</th>" not in table(
        render_report(**report_args(leads=lead_rows(whole, SEEPS))), "leads"
    )


def test_the_finalists_are_shown_when_the_study_had_them():
    lines = ["finalists, each trained with 3 seeds (tp_seeps: ...):", "  1. trial 24: 0.2048 <x>"]
    page = render_report(**report_args(finalists=lines))
    assert "The study's finalists" in page and "1. trial 24: 0.2048 &lt;x&gt;" in page
    assert "finalists" not in render_report(**report_args()).lower()
