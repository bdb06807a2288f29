"""Finalists: the best distinct recipes trained again with fresh seeds, ranked by their mean."""

from __future__ import annotations

import dataclasses

import numpy as np
import optuna
import pytest

from aurora_sweep.config.recipe import TrialConfig
from aurora_sweep.sweep.finalists import (
    enqueue_replicas,
    finalists,
    replica_seeds,
    replicas_to_run,
    seeds_of,
)
from aurora_sweep.sweep.records import FORGET_WORST, TrialRecord
from aurora_sweep.verify.bootstrap import encode_terms, over_seeds, paired_difference
from synthetic import tiny_lora_trial

DAYS = np.repeat(np.arange("2024-01-01", "2024-02-20", dtype="datetime64[D]"), 4)
TP = optuna.distributions.CategoricalDistribution


def _config(tiny_config, finalists=2, seeds=3):
    return dataclasses.replace(tiny_config, finalists=finalists, seeds=seeds)


def _terms(value: float, noise: float, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    num = value + rng.normal(0, noise, DAYS.size)
    return encode_terms(num, np.ones(DAYS.size), DAYS)


def _add(study, value, recipe: TrialConfig, *, forgets=False, state=None, **user):
    """A finished trial of `recipe` scoring `value` (its per-sample terms around it)."""
    seed = user.get("seed", recipe.seed)
    attrs = {
        "config": dataclasses.replace(recipe, seed=seed).to_dict(),
        "objective_terms": _terms(value, 0.01, seed + 100 * len(study.trials)),
        **user,
    }
    state = state or optuna.trial.TrialState.COMPLETE
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            values=[value] if state == optuna.trial.TrialState.COMPLETE else None,
            params={"lora_rank": recipe.lora_rank},
            distributions={"lora_rank": TP([2, 4, 8, 16])},
            user_attrs=attrs,
            constraints={"memory_over_cap_mb": 0.0, "forgetting_over_max": 1.0 if forgets else 0.0},
        )
    )
    return study.trials[-1]


def _searched(study):
    """Four trials of the search: ranks 8 (forgets), 2, 2 (same recipe, worse), 4."""
    _add(study, 0.10, tiny_lora_trial(lora_rank=8), forgets=True)
    _add(study, 0.20, tiny_lora_trial(lora_rank=2))
    _add(study, 0.21, tiny_lora_trial(lora_rank=2))
    _add(study, 0.22, tiny_lora_trial(lora_rank=4))


def test_the_finalists_are_the_best_distinct_feasible_recipes(tiny_config):
    study = optuna.create_study()
    _searched(study)
    chosen = finalists(_config(tiny_config), study.trials)
    assert [t.number for t in chosen] == [1, 3]  # trial 0 forgets; trial 2 repeats trial 1
    assert finalists(_config(tiny_config, finalists=1), study.trials) == []
    assert finalists(_config(tiny_config, seeds=1), study.trials) == []
    assert replica_seeds(_config(tiny_config)) == [1, 2]  # the study's seed 0, then 1 and 2


def test_replicas_are_enqueued_once_and_a_failed_one_again(tiny_config):
    config = _config(tiny_config)
    study = optuna.create_study()
    _searched(study)
    assert enqueue_replicas(study, config) == 4 and replicas_to_run(study, config) == 4
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    records = [TrialRecord.of(t) for t in waiting]
    assert {(r.replica_of, r.seed) for r in records} == {(1, 1), (1, 2), (3, 1), (3, 2)}
    for r in records:  # the finalist's recipe, its seed the replica's
        assert TrialConfig.from_dict(r.config).seed == r.seed
        assert TrialConfig.from_dict(r.config).lora_rank == (2 if r.replica_of == 1 else 4)
    assert enqueue_replicas(study, config) == 4  # run again (a resumed study): nothing new
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 4

    # a replica killed with its process is failed and enqueued again, as what it was
    from aurora_sweep.sweep.storage import retry_once

    killed = study.ask()  # takes the oldest waiting replica
    study.tell(killed, state=optuna.trial.TrialState.FAIL)
    frozen = study.trials[killed.number]
    assert retry_once(study, frozen)
    again = TrialRecord.of(study.trials[-1])
    before = TrialRecord.of(frozen)
    assert (again.replica_of, again.seed, again.config) == (
        before.replica_of,
        before.seed,
        before.config,
    )
    assert again.retry_of == frozen.number


def test_a_replica_trains_the_finalists_recipe_with_its_own_seed(tiny_config):
    from aurora_sweep.sweep.space import sample_trial

    config = _config(tiny_config)
    study = optuna.create_study()
    _searched(study)
    enqueue_replicas(study, config)
    trial = study.ask()
    sampled = sample_trial(trial, config)
    record = TrialRecord.of(trial)
    assert sampled == dataclasses.replace(
        TrialConfig.from_dict(TrialRecord.of(study.trials[record.replica_of]).config),
        seed=record.seed,
    )


def test_one_seeds_interval_is_the_paired_bootstrap_and_more_seeds_spread_it():
    from aurora_sweep.config.objective import Objective

    objective = Objective.parse("tp_seeps")
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.3, DAYS.size)
    one = [(base, np.ones(DAYS.size))]
    other = [(base + 0.01, np.ones(DAYS.size))]
    assert over_seeds(objective, one, DAYS, other) == pytest.approx(
        paired_difference(objective, one[0], other[0], DAYS)
    )
    # seeds 0.02 apart: the mean's interval holds the seed spread, wider than one seed's
    spread = [(base + shift, np.ones(DAYS.size)) for shift in (-0.02, 0.0, 0.02)]
    mean, lo, hi = over_seeds(objective, spread, DAYS)
    single = over_seeds(objective, one, DAYS)
    assert mean == pytest.approx(single[0])
    assert hi - lo > 1.5 * (single[2] - single[1])


def test_best_ranks_the_finalists_by_their_mean_and_exports_the_typical_seed(tiny_config):
    from aurora_sweep.report.evaluate import _trial_to_export
    from aurora_sweep.report.finalists import finalist_lines, ranked_finalists

    config = _config(tiny_config)
    study = optuna.create_study()
    _searched(study)
    enqueue_replicas(study, config)
    # trial 1's recipe was lucky with the study's seed: its other seeds do worse than trial 3's
    scores = {(1, 1): 0.26, (1, 2): 0.25, (3, 1): 0.22, (3, 2): 0.225}
    for _ in range(4):
        trial = study.ask()
        r = TrialRecord.of(trial)
        trial.set_user_attr("objective_terms", _terms(scores[r.replica_of, r.seed], 0.01, r.seed))
        study.tell(trial, scores[r.replica_of, r.seed])
    trials = study.trials
    assert [len(seeds_of(t, trials)) for t in finalists(config, trials)] == [3, 3]
    ranked = ranked_finalists(config, trials)
    assert [f.number for f in ranked] == [3, 1]
    assert ranked[0].mean == pytest.approx(np.mean([0.22, 0.22, 0.225]))
    assert ranked[0].interval[0] < ranked[0].mean < ranked[0].interval[1]
    lines = finalist_lines(config, trials, recipe=lambda t: "recipe")
    assert "1. trial 3: 0.2217 ± 0.0029" in lines[1]
    # seeds of trial 1 spread by 0.03: the two means are a draw of the seeds, not apart
    assert lines[3].startswith("  trial 3 against trial 1: -0.01") and "not apart" in lines[3]
    assert lines[-1].endswith("the single-seed winner, trial 1, did not stay the winner")
    chosen, note = _trial_to_export(config, trials, None)
    assert chosen.number == 3  # seed 0 (0.22) is nearest the mean 0.2217, before seed 1 (0.22)
    assert "mean over 3 training seeds: 0.2217" in note and "trial 3" in note


def test_a_finalist_that_forgets_with_one_seed_ranks_last_and_that_seed_is_never_exported(
    tiny_config,
):
    from aurora_sweep.report.evaluate import _trial_to_export
    from aurora_sweep.report.finalists import finalist_lines, ranked_finalists

    config = _config(tiny_config, seeds=2)
    study = optuna.create_study()
    _searched(study)
    enqueue_replicas(study, config)
    # trial 1's recipe has the better mean, but its second seed forgets beyond the limit
    scores = {1: 0.19, 3: 0.23}
    for _ in range(2):
        trial = study.ask()
        r = TrialRecord.of(trial)
        trial.set_user_attr("objective_terms", _terms(scores[r.replica_of], 0.01, r.seed))
        if r.replica_of == 1:
            trial.set_user_attr("scores", {"forget_2t_ratio": 1.15, "forget_worst_ratio": 1.15})
            trial.set_user_attr(FORGET_WORST, "2t")  # the worst variable at 6 h
            trial.set_constraint("forgetting_over_max", 0.05)
        study.tell(trial, scores[r.replica_of])
    trials = study.trials
    ranked = ranked_finalists(config, trials)
    assert [f.number for f in ranked] == [3, 1] and ranked[1].mean < ranked[0].mean
    lines = finalist_lines(config, trials, recipe=lambda t: "recipe")
    (marked,) = [line for line in lines if "✗" in line]
    assert "seed 1) forgets 2t ×1.15" in marked and "ranks after" in marked
    assert lines.index(marked) == 3  # under the second finalist, trial 1
    assert _trial_to_export(config, trials, None)[0].number == 3
    assert ranked[1].typical.number == 1  # the recipe's own whole seed, were it chosen


@pytest.mark.slow
def test_a_study_runs_its_finalists_replicas_apart_from_its_trials(
    tmp_path, tiny_store, monkeypatch
):
    """`run --trials 3` with 2 finalists of 2 seeds: three trials of the search, then the two
    replicas, each a child run of the study's run; `best` ranks them and exports the winner with
    a word on its seeds; run again, nothing is added."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from aurora_sweep.cli import app
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.sweep.storage import open_study
    from aurora_sweep.sweep.tracking import tracking_uri
    from conftest import write_tiny_config

    monkeypatch.chdir(tmp_path)
    path = write_tiny_config(tmp_path, store=tiny_store)
    path.write_text(path.read_text().replace("finalists = 1 ", "finalists = 2\nseeds = 2 ", 1))
    config = load_config(path, workdir=tmp_path)
    assert (config.finalists, config.seeds) == (2, 2)
    runner = CliRunner()
    result = runner.invoke(app, ["run", "-c", str(path), "--trials", "3"])
    assert result.exit_code == 0, result.output
    assert "(finalist " in result.output and "recipe wins on its mean over 2 seeds" in result.output
    trials = open_study(config, create=False).trials
    replicas = [t for t in trials if TrialRecord.of(t).replica_of is not None]
    assert len(trials) == 5 and len(replicas) == 2
    chosen = finalists(config, trials)
    assert {TrialRecord.of(t).replica_of for t in replicas} == {t.number for t in chosen}
    for t in replicas:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert TrialRecord.of(t).seed == 1 and TrialRecord.of(t).config["seed"] == 1
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(config.name).experiment_id
    parents = {r.data.tags.get("mlflow.parentRunId") for r in client.search_runs([experiment])}
    assert len(parents - {None}) == 1 and len(client.search_runs([experiment])) == 6

    result = runner.invoke(app, ["best", "-c", str(path), "--export", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert "finalists, each trained with 2 seeds" in result.output
    assert "## Seeds" in (tmp_path / "adapter" / "README.md").read_text()
    result = runner.invoke(app, ["run", "-c", str(path), "--trials", "3"])
    assert result.exit_code == 0 and "nothing to add" in result.output
    # --quiet: the final lines only
    result = runner.invoke(app, ["run", "-c", str(path), "--trials", "3", "--quiet"])
    assert result.exit_code == 0 and "nothing to add" not in result.output
    assert "recipe wins on its mean" in result.output and "MLflow: run" in result.output
    assert len(open_study(config, create=False).trials) == 5
