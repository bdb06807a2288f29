"""The Optuna study and its trials: running a study (`run`), the threads that claim and run trials
(`scheduler`), the worker process a trial runs in (`worker`), the search space (`space`), Optuna's
storage (`storage`), MLflow runs (`tracking`), what a worker sends back (`outcomes`), what the
study answers it (`link`), what `run` shows (`live`) and what a trial stores in Optuna
(`records`).

May import every stage below it: `memory`, `train`, `verify`, `model`, `data`, `config`.
"""
