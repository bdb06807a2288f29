"""The study end to end on the tiny demo: Optuna + MLflow + export + evaluate."""

import json
import re
import warnings

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from aurora_sweep import load_finetuned
from aurora_sweep.report.best import ranked_trials
from aurora_sweep.report.evaluate import evaluate_adapter, export_best
from aurora_sweep.sweep.records import TrialRecord
from aurora_sweep.sweep.run import run_study
from aurora_sweep.sweep.storage import open_study
from aurora_sweep.sweep.tracking import STUDY_RUN_TAG, tracking_uri

pytestmark = pytest.mark.filterwarnings("ignore")
METRICS = {
    "train_loss", "val_loss", "val_tp_seeps_subset", "peak_memory_mb", "trial_seconds",
    "loader_wait_fraction", "tp_rmse", "tp_rmse_persistence", "tp_rmse_climatology", "tp_mae", "tp_bias", "tp_seeps",
    "tp_seeps_persistence", "tp_seeps_climatology", "tp_seeps_q05", "tp_seeps_q95",
    "tp_csi_1", "tp_ets_5_climatology", "tp_fbias_0.1", "tp_fss_1_w5", "tp_fss_5_w11_persistence",
    "tp_skill_persistence", "tp_skill_climatology", "tp_skill_climatology_q05",
    "forget_2t_ratio", "forget_z500_ratio", "forget_q850_ratio", "forget_worst_ratio",
    "val_loss_tp", "val_loss_2t", "val_loss_z",
    "tp_seeps_12h", "tp_seeps_24h", "tp_rmse_persistence_24h", "tp_skill_climatology_24h",
    "forget_10v_ratio_24h", "forget_worst_ratio_24h",
    # on the box's interior (the default edge margin), for the model and the baselines
    "tp_seeps_interior", "tp_seeps_persistence_interior", "tp_skill_climatology_interior",
    "tp_seeps_q05_interior", "tp_rmse_interior_12h", "tp_seeps_climatology_interior_24h",
    "tp_skill_persistence_interior_24h", "tp_fss_1_w5_interior",
    # where the trial's time went
    "train_seconds", "check_seconds", "verify_seconds", "train_forwards", "check_forwards",
    "verify_forwards",
}  # fmt: skip
PARAMS = {"lora_rank", "lora_targets", "unfrozen_blocks", "batch_size", "precision"}


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, tiny_store):
    """2 trials, then a second invocation asking for 4."""
    from aurora_sweep.config.study_file import load_config
    from conftest import write_tiny_config

    workdir = tmp_path_factory.mktemp("study")
    config = load_config(write_tiny_config(workdir, store=tiny_store), workdir=workdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = run_study(config, trials=2)
        second = run_study(config, trials=4)
    return config, first, second


@pytest.mark.slow
def test_running_again_resumes_the_study_up_to_the_requested_total(finished_study):
    config, first, second = finished_study
    assert first.new_trials == 2 and second.new_trials == 2
    assert len(open_study(config, create=False).trials) == 4
    assert (config.workdir / "tiny.optuna.db").exists()


@pytest.mark.slow
def test_every_trial_is_a_child_run_with_its_params_and_metrics(finished_study):
    config, first, second = finished_study
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    # one parent run per study: the second invocation reopened the first one's
    assert first.parent_run_id == second.parent_run_id
    parents = {first.parent_run_id}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
    assert len(children) == 4 and len(runs) == 5
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
    completed = [r for r in children if r.data.tags.get("optuna.state") == "COMPLETE"]
    assert completed
    for run in completed:
        assert METRICS <= set(run.data.metrics)
        assert PARAMS <= set(run.data.params)
        m, p = run.data.metrics, run.data.params
        # the parts of the trial's time add up to at most its whole; training's forward passes
        # are its steps' samples, each through its rollout's model steps
        parts = m["train_seconds"] + m["check_seconds"] + m["verify_seconds"]
        assert 0 < parts <= m["trial_seconds"] and m["verify_seconds"] > 0
        rollout = int(p.get("rollout_steps", 1))
        samples = int(p["batch_size"]) * int(p.get("accumulate", 1))
        assert m["train_forwards"] == 4 * samples * rollout
        # every 6-hour sample once, those scored at 24 h three model steps further
        assert m["verify_forwards"] > m["check_forwards"] > 0
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(1, 5))
        artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in artifacts
        figures = {f.path for f in client.list_artifacts(run.info.run_id, "figures")}
        assert {"figures/loss_curves.png", "figures/cases.png"} <= figures


@pytest.mark.slow
def test_pruned_and_completed_trials_store_the_objective_in_the_same_units(finished_study):
    config, *_ = finished_study
    for trial in open_study(config, create=False).trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            # the pruner saw SEEPS on the fixed subset, never the normalised training loss
            assert all(0 <= v <= 2 for v in trial.intermediate_values.values())
            scores = TrialRecord.of(trial).scores
            assert trial.value == pytest.approx(scores["tp_seeps"])
            lo, hi = scores["tp_seeps_q05"], scores["tp_seeps_q95"]
            assert lo <= trial.value <= hi


@pytest.mark.slow
def test_the_base_models_scores_are_computed_once_per_study(finished_study):
    config, *_ = finished_study
    from aurora_sweep.config.recipe import BaseKey
    from aurora_sweep.sweep.records import BASE_MSE, TrialRecord

    study = open_study(config, create=False)
    by_precision = study.user_attrs[BASE_MSE]
    # the precisions the trials ran in (on their base), each scored once
    recipes = [r.config for r in map(TrialRecord.of, study.trials) if r.config]
    used = {str(BaseKey(c["base"], c["precision"])) for c in recipes}
    first = BaseKey(config.bases[0], config.search.precision[0])
    assert set(by_precision) == used | {str(first)}
    from aurora_sweep.verify.early_stop import DAILY, decode_daily

    for by_lead in by_precision.values():
        # the base model at every lead scored, and its errors by day at the study's lead
        assert set(by_lead) == {"6h", "12h", "24h", DAILY}
        days, names, sums = decode_daily(by_lead.pop(DAILY))
        assert len(np.unique(days)) == len(days) > 8 and sums.shape == (len(days), len(names))
        six = by_lead["6h"]
        assert sums.sum(axis=0) / sums.sum(axis=0)[0] == pytest.approx(
            [six[k] / six["2t"] for k in names], rel=1e-4
        )  # the days' sums are the split's, in proportion
        for base in by_lead.values():
            assert {"2t", "msl", "z500", "t850"} <= set(base) and all(v > 0 for v in base.values())


@pytest.mark.slow
def test_best_compares_each_trial_with_the_best_by_a_paired_difference(finished_study):
    from aurora_sweep.config.objective import Objective
    from aurora_sweep.report.best import distinguishable, paired_to
    from aurora_sweep.sweep.records import score

    config, *_ = finished_study
    trials = ranked_trials(config)
    deltas = paired_to(trials[0], trials, Objective.parse("tp_seeps"))
    assert deltas[0] == (0.0, 0.0, 0.0) and not distinguishable(deltas[0])
    for t, (delta, lo, hi) in zip(trials, deltas):
        # the per-sample terms kept with each trial give back its objective's difference
        assert delta == pytest.approx(score(t) - score(trials[0]), abs=1e-5)
        assert lo <= delta <= hi


@pytest.mark.slow
def test_every_completed_trial_carries_its_forgetting_as_a_constraint(finished_study):
    config, *_ = finished_study
    for t in open_study(config, create=False).trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            over = t.constraints["forgetting_over_max"]
            worst = TrialRecord.of(t).scores["forget_worst_ratio"]
            assert over == pytest.approx(worst - config.max_forgetting)
            assert ("infeasible" in t.user_attrs) == (over > 0)


@pytest.mark.slow
def test_exported_adapter_reproduces_the_trials_validation_score(finished_study, tmp_path):
    config, *_ = finished_study
    best = ranked_trials(config)[0]
    out = export_best(config, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "trained_weights.safetensors",
            "aurora_sweep.json", "study.toml", "README.md"} <= {p.name for p in out.iterdir()}  # fmt: skip
    meta = json.loads((out / "aurora_sweep.json").read_text())
    assert meta["base"]["name"] == "demo" and len(meta["base"]["sha256"]) == 64
    scores = evaluate_adapter(out, split="validation", bootstrap=0)
    assert scores["tp_seeps"] == pytest.approx(best.value, rel=1e-4)
    stored = TrialRecord.of(best).scores
    assert scores["tp_rmse"] == pytest.approx(stored["tp_rmse"], rel=1e-4)
    assert scores["forget_z500_ratio"] == pytest.approx(stored["forget_z500_ratio"], rel=1e-4)
    assert scores["tp_seeps_24h"] == pytest.approx(stored["tp_seeps_24h"], rel=1e-4)
    for sfx in ("", "_12h", "_24h"):  # the worst forgetting, as the trial recorded it
        ratios = [v for k, v in scores.items() if re.fullmatch(rf"forget_\w+?_ratio{sfx}", k)
                  and not k.startswith("forget_worst")]  # fmt: skip
        assert scores[f"forget_worst_ratio{sfx}"] == max(ratios)
        assert scores[f"forget_worst_ratio{sfx}"] == pytest.approx(
            stored[f"forget_worst_ratio{sfx}"]
        )
    test_scores = evaluate_adapter(out, split="test", bootstrap=0, lead="24h")
    # one lead's scores under the 6-hour names
    assert test_scores["split"] == "test" and test_scores["lead"] == "24h"
    assert "tp_seeps" in test_scores and not any(k.endswith("_24h") for k in test_scores)
    assert "forget_worst_ratio" in test_scores
    assert test_scores["tp_seeps"] != scores["tp_seeps_24h"]  # another split


@pytest.mark.slow
def test_report_writes_one_page_with_its_figures_and_tables(finished_study, tmp_path):
    from typer.testing import CliRunner

    from aurora_sweep.cli import app

    config, *_ = finished_study
    out = export_best(config, tmp_path / "adapter")
    page = tmp_path / "report.html"
    result = CliRunner().invoke(
        app, ["report", str(out), "--split", "test", "--point", "55,10", "--out", str(page)]
    )
    assert result.exit_code == 0, result.output
    html = page.read_text()
    for figure in ("cases.png", "reliability.png", "point_series.png", "loss_curves.png"):
        assert f'alt="{figure}"' in html
    assert html.count("data:image/png;base64,") == 4
    assert "tp_csi_1" in html and "tp_fss_5_w11" in html and "z500" in html
    # scores and forgetting by lead, and the paired comparison with the references
    assert "By lead time" in html and "<td>24h</td>" in html and "ratio at 24h" in html
    assert 'src="http' not in html


@pytest.mark.slow
def test_report_refuses_a_point_outside_the_region(finished_study, tmp_path):
    from typer.testing import CliRunner

    from aurora_sweep.cli import app

    config, *_ = finished_study
    out = export_best(config, tmp_path / "adapter")
    result = CliRunner().invoke(app, ["report", str(out), "--point", "-30,150"])
    assert result.exit_code == 1 and "outside the region" in result.output


@pytest.mark.slow
def test_adapter_loads_with_plain_peft_onto_the_base_model(finished_study, tmp_path):
    from peft import PeftModel

    from aurora_sweep.model.build import build_base, load_base_checkpoint
    from aurora_sweep.model.files import DEMO_CHECKPOINT

    config, *_ = finished_study
    out = export_best(config, tmp_path / "adapter")
    meta = json.loads((out / "aurora_sweep.json").read_text())
    base = build_base(
        "demo", stats=(meta["target_stats"]["location"], meta["target_stats"]["scale"])
    )
    load_base_checkpoint(base, DEMO_CHECKPOINT)
    peft_model = PeftModel.from_pretrained(base, out)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    ready = load_finetuned(out)
    head = ready.get_base_model().decoder.surf_heads["tp"].weight
    assert head.abs().sum() > 0  # the trained tp head, not the zero it started from
    assert not any(p.requires_grad for p in ready.parameters()) or not ready.training


def _once(name: str, tmp_path):
    """A fit (from tests/faults.py) that fails the first time, in whichever worker runs it."""
    import functools

    import faults

    return functools.partial(getattr(faults, name), marker=str(tmp_path / "failed-once"))


def _states(summary):
    return [t.state for t in summary.study.trials]


@pytest.mark.slow
def test_out_of_memory_is_recorded_as_infeasible_and_the_study_goes_on(tiny_config, tmp_path):
    summary = run_study(tiny_config, trials=2, fit=_once("oom_once", tmp_path))
    first, second = summary.study.trials
    assert first.state == optuna.trial.TrialState.PRUNED
    assert "out of memory" in first.user_attrs["infeasible"]
    assert first.user_attrs["memory_over_cap_mb"] > 0 and "measured_peak_mb" in first.user_attrs
    assert second.state == optuna.trial.TrialState.COMPLETE
    run = MlflowClient(tracking_uri(tiny_config)).get_run(first.user_attrs["mlflow_run_id"])
    assert run.data.tags["infeasible"].startswith("out of memory")


@pytest.mark.slow
def test_a_dead_worker_is_replaced_and_the_study_goes_on(tiny_config, tmp_path):
    # a failed trial does not use up the total: one finished trial is asked for, and made
    summary = run_study(tiny_config, trials=1, fit=_once("die_once", tmp_path))
    assert _states(summary) == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    client = MlflowClient(tracking_uri(tiny_config))
    run = client.get_run(summary.study.trials[0].user_attrs["mlflow_run_id"])
    assert "exit code 3" in run.data.tags["error"] and run.info.status == "FAILED"


@pytest.mark.slow
def test_a_worker_killed_from_outside_is_retried_once_with_the_same_parameters(
    tiny_config, tmp_path
):
    # the OOM killer or `kill -9` of the trial process: not the config's fault, so retried
    summary = run_study(tiny_config, trials=1, fit=_once("killed_once", tmp_path))
    killed, retry = summary.study.trials
    assert killed.state == optuna.trial.TrialState.FAIL
    assert killed.user_attrs["killed_by"] == "SIGKILL"
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.user_attrs["retry_of"] == 0 and retry.params == killed.params
    run = MlflowClient(tracking_uri(tiny_config)).get_run(killed.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_a_trial_that_raises_is_recorded_as_failed_and_the_study_goes_on(tiny_config, tmp_path):
    summary = run_study(tiny_config, trials=1, fit=_once("nan_once", tmp_path))
    assert _states(summary) == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
def test_a_study_whose_trials_keep_failing_stops_in_one_line(tiny_config):
    import dataclasses

    import faults
    from aurora_sweep.errors import AuroraSweepError

    config = dataclasses.replace(tiny_config, max_failures=2)
    with pytest.raises(AuroraSweepError, match="2 trials failed in a row.*tp_seeps is nan"):
        run_study(config, trials=1, fit=faults.nan_objective)
    trials = open_study(config, create=False).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2  # then it stopped
    assert all("objective tp_seeps is nan" in t.user_attrs["error"] for t in trials)


@pytest.mark.slow
def test_a_config_predicted_over_a_tiny_cap_never_trains(tiny_config):
    import dataclasses

    # 1 MiB: nothing fits (the fit decides as well as a trace; the traced estimate in a capped
    # study is tested in test_levers.py)
    capped = dataclasses.replace(tiny_config, gpu_memory_cap=2**20, memory_estimate="fitted")
    summary = run_study(capped, trials=2)
    client = MlflowClient(tracking_uri(capped))
    for trial in summary.study.trials:
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert (
            trial.user_attrs["predicted_peak_mb"] > 1 and trial.user_attrs["memory_over_cap_mb"] > 0
        )
        assert trial.user_attrs["infeasible"].startswith("predicted peak")
        run_id = trial.user_attrs["mlflow_run_id"]
        assert "train_loss" not in client.get_run(run_id).data.metrics  # it never trained
        assert not client.list_artifacts(run_id)
    assert ranked_trials(capped) == []


def test_the_space_is_conditional_on_the_method():
    """No LoRA rank or targets for the methods without LoRA; `blocks` has its own count."""
    import dataclasses

    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.sweep.space import sample_trial
    from aurora_sweep.sweep.storage import sampler

    config = load_config(None)
    config = dataclasses.replace(
        config,
        search=dataclasses.replace(
            config.search, method=("lora", "dora", "head", "blocks", "full")
        ),
    )
    study = optuna.create_study(sampler=sampler(0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        tc = sample_trial(trial, config)
        seen.add(tc.method)
        has_lora = {"lora_rank", "lora_targets"} <= set(trial.params)
        assert has_lora == (tc.method in ("lora", "dora"))
        assert ("blocks" in trial.params) == (tc.method == "blocks")
        if tc.method == "full":
            assert tc.activation_checkpointing and tc.learning_rate == 3e-4
            assert "learning_rate" not in trial.params and "precision" not in trial.params
        study.tell(trial, 1.0)
    assert seen == {"lora", "dora", "head", "blocks", "full"}


@pytest.mark.slow
def test_a_new_study_starts_with_the_reference_recipes(tmp_path, tiny_store):
    from aurora_sweep.config.study_file import load_config
    from conftest import write_tiny_config

    path = write_tiny_config(tmp_path, steps=2, store=tiny_store)
    text = path.read_text().replace("reference = false", "reference = true")
    path.write_text(text.replace('precision = ["fp32", "bf16"]', 'precision = ["fp32"]'))
    config = load_config(path, workdir=tmp_path)
    summary = run_study(config, trials=2)
    full, lora = summary.study.trials
    assert full.user_attrs["reference"] == "full" and lora.user_attrs["reference"] == "lora"
    client = MlflowClient(tracking_uri(config))
    params = client.get_run(full.user_attrs["mlflow_run_id"]).data.params
    assert params["method"] == "full" and params["activation_checkpointing"] == "True"
    assert float(params["learning_rate"]) == 3e-4
    assert client.get_run(lora.user_attrs["mlflow_run_id"]).data.params["method"] == "lora"
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
               for t in (full, lora))  # fmt: skip
    from aurora_sweep.sweep.space import enqueue_references

    assert enqueue_references(summary.study, config) == []  # a resumed study gets none again
    # the export carries the comparison with the references, for its model card and report
    adapter = export_best(config, tmp_path / "adapter")
    lines = json.loads((adapter / "aurora_sweep.json").read_text())["references"]
    assert any(line.startswith("reference Aurora's full fine-tune (trial 0)") for line in lines)
    assert "Against the study's reference recipes" in (adapter / "README.md").read_text()


def test_the_pareto_front_keeps_the_trials_nothing_beats_in_both():
    from aurora_sweep.report.best import pareto_front

    def trial(number, value, mb):
        t = optuna.trial.create_trial(value=value, user_attrs={"peak_memory_mb": mb})
        t.number = number
        return t

    trials = [
        trial(0, 0.30, 100.0),  # cheapest
        trial(1, 0.25, 300.0),  # more skill for more memory: on the front
        trial(2, 0.28, 400.0),  # beaten by 1 in both
        trial(3, 0.20, 900.0),  # most skilful
        trial(4, 0.30, 150.0),  # as skilful as 0, more memory: dominated
        trial(5, 0.25, 300.0),  # ties 1 exactly: neither beats the other
    ]
    front = pareto_front(trials, "peak_memory_mb")
    assert [t.number for t in front] == [0, 1, 5, 3]
    assert pareto_front(trials, "trial_seconds") == []  # no trial carries that cost


@pytest.mark.slow
def test_a_skill_and_memory_study_answers_with_its_pareto_front(tmp_path, tiny_store, monkeypatch):
    """Two objectives: no pruning, `best --pareto` lists the front, any member exports, the
    parent run gets the front as a figure, and the study refuses other objectives later."""
    from typer.testing import CliRunner

    from aurora_sweep.cli import app
    from aurora_sweep.config.study_file import load_config
    from aurora_sweep.report.best import pareto_front
    from conftest import write_tiny_config

    monkeypatch.chdir(tmp_path)  # the CLI's working directory holds the study and mlruns/
    path = write_tiny_config(tmp_path, steps=2, store=tiny_store)
    text = path.read_text().replace(
        "seed = 0",
        # the front's mechanics, whatever two short trials forget (the tiny study's max_forgetting)
        'seed = 0\nobjectives = ["tp_seeps", "predicted_peak_mb"]',
        1,
    )
    path.write_text(
        text.replace("lora_rank = [2, 4]", 'method = ["lora", "head"]\nlora_rank = [2, 4]')
    )
    config = load_config(path, workdir=tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["run", "-c", str(path), "--trials", "2"])
    assert result.exit_code == 0, result.output
    study = open_study(config, create=False)
    assert study.metric_names == ["tp_seeps", "predicted_peak_mb"] and len(study.directions) == 2
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(not t.intermediate_values for t in done)  # never pruned
    assert all(t.values[1] == t.user_attrs["predicted_peak_mb"] for t in done)
    front = pareto_front(ranked_trials(config), "predicted_peak_mb")
    assert front and {t.number for t in study.best_trials} == {t.number for t in front}

    result = runner.invoke(app, ["best", "-c", str(path), "--pareto"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert "Pareto front of tp_seeps against predicted_peak_mb" in result.output
    for method in {t.user_attrs["config"]["method"] for t in done}:  # each method's best
        assert f"best {method}: trial" in result.output
    member = front[-1].number
    out = tmp_path / "member"
    result = runner.invoke(
        app, ["best", "-c", str(path), "--export", str(out), "--trial", str(member)]
    )
    assert result.exit_code == 0, result.output
    assert f"trial {member} of study" in (out / "README.md").read_text()
    result = runner.invoke(app, ["best", "-c", str(path), "--export", str(out), "--trial", "99"])
    assert result.exit_code == 1 and "not a completed trial" in result.output

    client = MlflowClient(tracking_uri(config))
    # `run` logs the study's figures to its parent run once the sweep ends
    experiment = client.get_experiment_by_name(config.name).experiment_id
    study_tag = f"tags.`{STUDY_RUN_TAG}` = '{config.name}'"
    (parent,) = client.search_runs([experiment], filter_string=study_tag)
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/skill_vs_memory.png"} <= figures

    path.write_text(text.replace('objectives = ["tp_seeps", "predicted_peak_mb"]', "", 1))
    result = runner.invoke(app, ["run", "-c", str(path), "--trials", "3"])
    assert result.exit_code == 1 and "minimises tp_seeps, predicted_peak_mb" in result.output


def test_the_pruner_never_judges_a_trial_on_its_first_evaluation(tiny_config):
    from aurora_sweep.sweep.storage import study_pruner

    every = tiny_config.train.eval_every
    study = optuna.create_study(pruner=study_pruner(tiny_config))
    for _ in range(6):  # enough finished trials for the median to count
        t = study.ask()
        for step in (every, 2 * every):
            t.report(0.1, step)
        study.tell(t, 0.1)
    slow_starter = study.ask()
    slow_starter.report(5.0, every)
    assert not slow_starter.should_prune()  # far worse at the first evaluation: kept
    slow_starter.report(5.0, 2 * every)
    assert slow_starter.should_prune()


def test_a_trial_that_forgets_is_never_the_best_unless_asked_for(tiny_config, tmp_path):
    from optuna.distributions import FloatDistribution

    from aurora_sweep.errors import AuroraSweepError
    from aurora_sweep.report.evaluate import export_best
    from aurora_sweep.sweep.records import completed, forgets, ranked

    def trial(number, value, over):
        t = optuna.trial.create_trial(
            value=value, params={"x": 0.0}, distributions={"x": FloatDistribution(0, 1)},
            system_attrs={"constraints:forgetting_over_max": over},
        )  # fmt: skip
        t.number = number
        return t

    forgetful, whole = trial(0, 0.1, 0.4), trial(1, 0.3, -0.05)
    assert forgets(forgetful) and not forgets(whole)
    assert ranked([forgetful, whole]) == [whole]
    assert completed([forgetful, whole]) == [forgetful, whole]
    with pytest.raises(AuroraSweepError, match="keeps the model whole.*--trial N"):
        export_best(tiny_config, tmp_path / "adapter", trials=[forgetful])


@pytest.mark.slow
def test_best_export_registers_a_version_that_forecasts_what_the_folder_does(
    finished_study, tmp_path, monkeypatch
):
    """`best --export` logs the adapter to its trial's run as an MLflow model and registers a
    version under the study's name, tagged; `models:/<study>/<version>` then loads (our loader
    and MLflow's pyfunc) and forecasts exactly what the folder forecasts."""
    import mlflow
    import torch
    import xarray as xr
    from typer.testing import CliRunner

    from aurora_sweep.cli import app
    from aurora_sweep.sweep.tracking import tracking_uri

    config, *_ = finished_study
    monkeypatch.chdir(config.workdir)  # mlflow.db here: the registry a models:/ URI is read from
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = CliRunner()
    out = tmp_path / "adapter"
    client = MlflowClient(tracking_uri(config))
    best_run = TrialRecord.of(ranked_trials(config)[0]).mlflow_run_id
    before = client.get_run(best_run).info
    result = runner.invoke(app, ["best", "-c", str(config.path), "--export", str(out)])
    assert result.exit_code == 0, result.output
    assert "registered in MLflow as models:/tiny/1" in result.output
    after = client.get_run(best_run).info  # the trial's run ends when it ended, not at export
    assert (after.status, after.end_time) == (before.status, before.end_time)
    version = client.get_model_version("tiny", "1")
    best = ranked_trials(config)[0]
    assert version.run_id == TrialRecord.of(best).mlflow_run_id
    tags = version.tags
    assert tags["trial"] == str(best.number) and len(tags["base_sha256"]) == 64
    assert float(tags["tp_seeps"]) == pytest.approx(best.value, rel=1e-5)
    assert tags["recipe"] and tags["data.region"]
    assert version.description.startswith("tiny: Aurora fine-tuned for")  # the card's title

    day = str(config.data.test.start)
    for name, ref in (("folder", str(out)), ("uri", "models:/tiny/1")):
        result = runner.invoke(
            app, ["forecast", ref, "--start", day, "--end", day, "--out", f"{tmp_path}/{name}.nc"]
        )
        assert result.exit_code == 0, result.output
    folder, uri = (xr.open_dataset(tmp_path / f"{n}.nc") for n in ("folder", "uri"))
    assert folder["tp"].size and np.array_equal(folder["tp"].values, uri["tp"].values)
    assert uri.attrs["adapter"] == "models:/tiny/1"

    # MLflow's own loader: the pyfunc forecasts a batch as our loader's model does
    from aurora_sweep.model.adapter import open_adapter
    from aurora_sweep.model.build import unwrap
    from aurora_sweep.verify.prepare import trial_data

    opened = open_adapter(out)
    data = trial_data(opened.config, torch.device("cpu")).for_trial(
        opened.meta.trial.base, opened.meta.trial.levels
    )
    batch, _ = data.validation.batch([0, 1])
    pyfunc = mlflow.pyfunc.load_model("models:/tiny/1")
    ours = unwrap(load_finetuned("models:/tiny/1"))
    with torch.inference_mode():
        expected = ours(batch)
    got = pyfunc.predict(batch)
    assert torch.equal(got.surf_vars["tp"], expected.surf_vars["tp"])

    result = runner.invoke(app, ["forecast", "models:/tiny/9", "--start", day, "--end", day])
    assert result.exit_code == 1 and "cannot fetch models:/tiny/9" in result.output
