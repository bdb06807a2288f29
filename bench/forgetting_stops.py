"""Does stopping the scoring of a trial that forgets change what a study selects, and what does
it save?

Runs a study (the demo's by default) with every completed trial scored on the whole split
(`[study] scoring_pruner = 0`), and asks the forgetting test (`verify.early_stop.forgets`, at
`--p`) after each block exactly what the study asks it when the pruner is on
(`sweep.link.stops_scoring`, wrapped here to record its answer and go on). Each completed trial
then has both: the block at which the test would have stopped it, and its forgetting over the
whole split, judged as the study judges it (`[study] max_forgetting`, at the study's lead).
Reports:

- the trials the test would stop, and whether any of them keeps Aurora whole over the whole
  split (a wrong stop: the only way the test could change what the study selects, since a
  trial that forgets is never the answer);
- the trials that forget over the whole split but that the test lets through (scored whole,
  as before: a cost, not an error);
- the completed trials' verification seconds, and the share the stops would save (each stopped
  trial's seconds in proportion to the forward passes it would not run).

    .venv/bin/python bench/forgetting_stops.py [--config study.toml] [--trials 30] [--p 0.1]

Runs in a fresh temporary directory (the demo: about 3 minutes on 2 cores). Saves JSON to
bench/results/forgetting-stops-<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from _results import save

from aurora_sweep.config.recipe import lead_suffix
from aurora_sweep.config.study_file import load_config
from aurora_sweep.sweep import link
from aurora_sweep.sweep.records import TrialRecord, completed, forgets
from aurora_sweep.sweep.run import run_study
from aurora_sweep.verify.early_stop import forgets as forgetting_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--p", type=float, default=0.1)
    args = parser.parse_args()
    given = args.config.resolve() if args.config else None
    workdir = Path(tempfile.mkdtemp(prefix="forgetting-stops-"))
    os.chdir(workdir)
    config = load_config(given, workdir=workdir)
    config = dataclasses.replace(config, scoring_pruner=0.0)
    asked: dict[int, list[dict]] = {}

    def record_and_go_on(config_, trial, message) -> bool:
        state = message.state
        found = state and forgetting_test(state, config.max_forgetting, p_threshold=args.p)
        days = len(state.mine) if state is not None else 0
        asked.setdefault(trial.number, []).append(
            {"days": days, "forgets": list(found[:2]) if found else None, "of": message.of}
        )
        return False

    link.stops_scoring = record_and_go_on
    summary = run_study(config, trials=args.trials, quiet=True)
    trials = summary.study.get_trials(deepcopy=False)
    rows, verify_total, saved = [], 0.0, 0.0
    for t in completed(trials):
        record = TrialRecord.of(t)
        if record.reference is not None or record.replica_of is not None:
            continue  # always scored whole
        seconds = record.value("verify_seconds") or 0.0
        verify_total += seconds
        checks = asked.get(t.number, [])
        hit = next((k for k, c in enumerate(checks) if c["forgets"]), None)
        blocks = len(checks) + 1
        if hit is not None:
            saved += seconds * (1 - (hit + 1) / blocks)  # blocks are about equal in size
        worst = record.worst_forgetting(lead_suffix(config.lead_steps))
        rows.append(
            {
                "trial": t.number,
                "stopped_after_days": checks[hit]["days"] if hit is not None else None,
                "stopped_for": checks[hit]["forgets"] if hit is not None else None,
                "whole_split_worst": list(worst) if worst else None,
                "forgets_over_whole_split": forgets(t),
                "verify_seconds": seconds,
            }
        )
    wrong = [r["trial"] for r in rows if r["stopped_for"] and not r["forgets_over_whole_split"]]
    let_through = [
        r["trial"] for r in rows if r["forgets_over_whole_split"] and not r["stopped_for"]
    ]
    result = {
        "command": "bench/forgetting_stops.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "date": dt.date.today().isoformat(),
        "max_forgetting": config.max_forgetting,
        "search_trials_completed": len(rows),
        "trials": rows,
        "stopped": [r["trial"] for r in rows if r["stopped_for"]],
        "wrong_stops": wrong,
        "forgetting_but_scored_whole": let_through,
        "verify_seconds_completed": verify_total,
        "verify_seconds_saved_estimate": saved,
        "saved_share": saved / verify_total if verify_total else float("nan"),
        "median_days_at_stop": float(
            np.median([r["stopped_after_days"] for r in rows if r["stopped_for"]] or [np.nan])
        ),
    }
    print(json.dumps(result, indent=2))
    save(result, "forgetting-stops")


if __name__ == "__main__":
    main()
