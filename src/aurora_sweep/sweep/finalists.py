"""Finalists: the best distinct feasible recipes of the search, trained again with fresh seeds.

Every trial of the search trains with the study's seed, so two recipes a few thousandths apart
may differ by the draw of that seed rather than by the recipe. After the search, `run` trains
each of the `[study] finalists` best distinct feasible recipes with `[study] seeds` - 1 more seeds
(the study's seed + 1, + 2, ...). A seed changes everything random in a trial: the initial
adapter and new weights, the order of the data, the tiles. The re-trainings are trials of the
same study ("replicas": their finalist and seed in `TrialRecord.replica_of` and `.seed`, their
recipe in `.config`), enqueued once, shared out among the workers, retried after a kill like any
trial, and counted apart from `--trials`. `best` ranks the finalists by their mean over seeds.
"""

from __future__ import annotations

import optuna

from aurora_sweep.config.study import StudyConfig
from aurora_sweep.sweep.records import TrialRecord, attrs, ranked
from aurora_sweep.sweep.storage import FINISHED


def finalists(config: StudyConfig, trials: list[optuna.trial.FrozenTrial]) -> list:
    """The `[study] finalists` best feasible trials of the search with distinct recipes, best
    first; none when the study re-trains nothing (`finalists` or `seeds` at 1)."""
    if config.finalists < 2 or config.seeds < 2:
        return []
    chosen, seen = [], set()
    for t in ranked(trials):
        recipe = _recipe_key(TrialRecord.of(t).config)
        if recipe is None or recipe in seen:
            continue
        seen.add(recipe)
        chosen.append(t)
        if len(chosen) == config.finalists:
            break
    return chosen


def _recipe_key(recipe: dict | None) -> str | None:
    """A recipe with its seed left out: two trials of one key differ by their seed alone."""
    if recipe is None:
        return None
    return repr(sorted((k, repr(v)) for k, v in recipe.items() if k != "seed"))


def replica_seeds(config: StudyConfig) -> list[int]:
    """The seeds a finalist is trained with again: the study's seed + 1, + 2, ..."""
    return [config.train.seed + k for k in range(1, config.seeds)]


def wanted_replicas(config: StudyConfig, trials: list) -> list[tuple]:
    """Every replica the finalists have: (finalist's trial, seed), best finalist first."""
    return [(t, seed) for t in finalists(config, trials) for seed in replica_seeds(config)]


def _replicas_in(trials: list, states) -> set[tuple[int, int]]:
    """The (finalist, seed) of the replicas among `trials` in one of `states`."""
    records = (TrialRecord.of(t) for t in trials if t.state in states)
    return {(r.replica_of, r.seed) for r in records if r.replica_of is not None}


def enqueue_replicas(study: optuna.Study, config: StudyConfig) -> int:
    """Enqueue every replica of the finalists that is not in the study yet (waiting, running or
    finished; a failed one is enqueued again), and return how many replicas the finalists have
    in all: the total the finalist phase of `run` runs to."""
    trials = study.get_trials(deepcopy=False)
    present = _replicas_in(trials, set(optuna.trial.TrialState) - {optuna.trial.TrialState.FAIL})
    wanted = wanted_replicas(config, trials)
    for finalist, seed in wanted:
        if (finalist.number, seed) in present:
            continue
        recipe = dict(TrialRecord.of(finalist).config or {}, seed=seed)
        study.enqueue_trial(
            finalist.params, user_attrs=attrs(replica_of=finalist.number, seed=seed, config=recipe)
        )
    return len(wanted)


def is_replica(trial: optuna.trial.FrozenTrial) -> bool:
    return TrialRecord.of(trial).replica_of is not None


def seeds_of(finalist: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial]) -> list:
    """The finalist and its completed replicas: one completed trial per seed, the finalist's
    first (a retried replica counts once)."""
    by_seed = {}
    for t in trials:
        record = TrialRecord.of(t)
        if record.replica_of == finalist.number and t.state == optuna.trial.TrialState.COMPLETE:
            by_seed.setdefault(record.seed, t)
    return [finalist, *(by_seed[s] for s in sorted(by_seed))]


def replicas_to_run(study: optuna.Study, config: StudyConfig) -> int:
    """How many of the finalists' replicas the study does not hold finished yet."""
    trials = study.get_trials(deepcopy=False)
    wanted = {(t.number, seed) for t, seed in wanted_replicas(config, trials)}
    return len(wanted - _replicas_in(trials, FINISHED))
