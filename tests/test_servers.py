"""The server fixtures give real servers: Optuna on PostgreSQL, MLflow over HTTP with proxied artifacts."""

from __future__ import annotations

import optuna
from mlflow.tracking import MlflowClient

from servers import PostgresServer


def test_postgres_url_is_a_fresh_empty_database(postgres_url):
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    try:
        assert engine.dialect.name == "postgresql"
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_optuna_trial_told_on_postgres_is_read_back_by_a_second_storage(postgres_url):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    writer = optuna.storages.RDBStorage(postgres_url, engine_kwargs={"pool_pre_ping": True})
    study = optuna.create_study(study_name="servers", storage=writer, direction="minimize")
    trial = study.ask()
    x = trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, x * 2)

    reader = optuna.storages.RDBStorage(postgres_url, engine_kwargs={"pool_pre_ping": True})
    try:
        loaded = optuna.load_study(study_name="servers", storage=reader)
        (stored,) = loaded.trials
        assert stored.state == optuna.trial.TrialState.COMPLETE
        assert stored.params == {"x": x}
        assert stored.value == x * 2
    finally:
        writer.engine.dispose()
        reader.engine.dispose()


def test_mlflow_server_logs_a_run_and_proxies_its_artifacts(mlflow_server, tmp_path):
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment("servers-run")
    experiment = client.get_experiment(experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")

    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_metric(run_id, "rmse", 0.25, step=3)
    notes = tmp_path / "notes.txt"
    notes.write_text("proxied through the tracking server\n")
    client.log_artifact(run_id, str(notes))
    client.set_terminated(run_id, "FINISHED")

    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    path = client.download_artifacts(run_id, "notes.txt", str(downloaded))
    assert open(path).read() == "proxied through the tracking server\n"

    stored = client.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.metrics == {"rmse": 0.25}
    (point,) = client.get_metric_history(run_id, "rmse")
    assert (point.value, point.step) == (0.25, 3)


def test_mlflow_server_keeps_its_runs_in_postgres(mlflow_server, postgres_server: PostgresServer):
    client = MlflowClient(tracking_uri=mlflow_server)
    client.create_experiment("servers-in-postgres")

    with postgres_server.connect() as conn:
        databases = [
            row[0]
            for row in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'mlflow\\_%'"
            )
        ]
    names: set[str] = set()
    for database in databases:
        with postgres_server.connect(database) as conn:
            names |= {row[0] for row in conn.execute("SELECT name FROM experiments")}
    assert "servers-in-postgres" in names
