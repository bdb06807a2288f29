"""Does stopping the scoring of hopeless trials change what a study selects, and what does it save?

Replays the scoring pruner (`verify.early_stop`, `[study] scoring_pruner`) on a study whose
trials were all scored on the whole validation split (run with `scoring_pruner = 0`): each trial
keeps its per-sample objective terms, so which trials the pruner would have stopped, after how
many blocks of days, and against which best trial, can be worked out exactly, in the order the
trials ended. Reports:

- the winner under full scoring, the winner among the trials the pruner lets through, and
  whether the first is one of those, or else not told apart from the second (the paired 90 %
  interval of their difference contains 0);
- the share of the completed trials' verification forward passes (and seconds, in proportion)
  the stops save.

The replay judges each trial against the best trial scored whole before it, as the study does;
what it cannot replay is the search itself (a stopped trial is pruned, so the sampler and the
median pruner see another history): `aurora-sweep run` with and without the pruner, timed side by
side, measures that.

    .venv/bin/python bench/bench_scoring.py --workdir DIR [--config study.toml] [--p 0.1]

where DIR holds a study run with `[study] scoring_pruner = 0` (the demo's, by default). Saves
JSON to bench/results/scoring-pruner-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import numpy as np
from _results import save

from aurora_sweep.config.study_file import load_config
from aurora_sweep.data.cube import open_cube
from aurora_sweep.data.trial_data import TrialData
from aurora_sweep.sweep.records import TrialRecord, completed, forgets, score
from aurora_sweep.sweep.storage import open_study
from aurora_sweep.verify.bootstrap import decode_terms, paired_difference
from aurora_sweep.verify.early_stop import block_count, cannot_win, scoring_blocks
from aurora_sweep.verify.scoring import _lead_slots


def replay(config, trials, data, p: float, batch_size: int) -> dict:
    """Which completed trials the pruner would stop, in the order they ended."""
    longest, slot = _lead_slots(data.leads)
    one = data.leads[1]
    blocks = scoring_blocks(one.target_days(), block_count(len(one), batch_size))
    lead, objective = data.objective_steps, config.objective.at(config.lead_steps)
    scored_whole, stopped = [], {}
    for t in sorted(completed(trials), key=lambda t: t.datetime_complete):
        record = TrialRecord.of(t)
        mine = decode_terms(record.objective_terms)
        best = next((b for b in sorted(scored_whole, key=score) if not forgets(b)), None)
        if best is not None and record.reference is None:
            theirs = decode_terms(TrialRecord.of(best).objective_terms)
            done = np.zeros(0, int)
            for k, block in enumerate(blocks[:-1], 1):
                positions = slot[lead][block]
                done = np.concatenate([done, positions[positions >= 0]])
                stop, pvalue, days = cannot_win(
                    objective, (mine[0][done], mine[1][done]),
                    (theirs[0][done], theirs[1][done]), mine[2][done], p_threshold=p,
                )  # fmt: skip
                if stop:
                    rolled = sum(longest[b].sum() for b in blocks[:k])
                    stopped[t.number] = {
                        "after_blocks": k, "days": days, "p": pvalue, "against": best.number,
                        "forwards_saved": 1 - rolled / longest.sum(),
                    }  # fmt: skip
                    break
        if t.number not in stopped:
            scored_whole.append(t)
    return {"stopped": stopped, "scored_whole": [t.number for t in scored_whole]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument(
        "--batch",
        type=int,
        default=32,
        help="samples a scoring pass (32: a CPU's, eval_batch_size)",
    )
    args = parser.parse_args()
    config = load_config(args.config, workdir=args.workdir.resolve())
    trials = open_study(config, create=False).get_trials(deepcopy=False)
    data = TrialData.prepare(open_cube(config), config)
    result = replay(config, trials, data, args.p, args.batch)
    done = completed(trials)
    feasible = [t for t in done if not forgets(t)]
    full_winner = feasible[0]
    survivors = [t for t in feasible if t.number in result["scored_whole"]]
    cheap_winner = survivors[0]
    a, b = (decode_terms(TrialRecord.of(t).objective_terms) for t in (full_winner, cheap_winner))
    delta = paired_difference(config.objective.at(config.lead_steps), a[:2], b[:2], a[2])
    seconds = {t.number: TrialRecord.of(t).value("verify_seconds") for t in done}
    verify_total = sum(v for v in seconds.values() if v)
    saved = sum(s["forwards_saved"] * (seconds.get(n) or 0.0) for n, s in result["stopped"].items())
    summary = {
        "command": f"bench/bench_scoring.py --workdir {args.workdir} --p {args.p} --batch {args.batch}",
        "blocks": block_count(len(data.leads[1]), args.batch),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": dt.date.today().isoformat(),
        "completed_trials": len(done),
        "stopped": result["stopped"],
        "full_winner": full_winner.number,
        "cheap_winner": cheap_winner.number,
        "full_winner_scored_whole": full_winner.number in result["scored_whole"],
        "difference_full_minus_cheap": list(map(float, delta)),
        "verify_seconds_completed": verify_total,
        "verify_seconds_saved_estimate": saved,
    }
    print(json.dumps(summary, indent=2))
    save(summary, "scoring-pruner")


if __name__ == "__main__":
    main()
