"""Exported adapters in MLflow's model registry.

`best --export` logs the adapter folder to its trial's run as an MLflow model (a pyfunc whose
artifact is the folder, `AdapterModel`) and registers it under the study's name: a version per
export, tagged with its scores, recipe, base checkpoint and data (`register_adapter`).
`forecast`, `evaluate`, `report` and `aurora_sweep.load_finetuned` take
`models:/<name>/<version>` wherever they take a folder (`model.files.local_adapter` fetches
the folder).

    import mlflow
    model = mlflow.pyfunc.load_model("models:/demo/1")
    prediction = model.predict(batch)        # an aurora.Batch of the region: 6 hours on
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from aurora_sweep.errors import AuroraSweepError
from aurora_sweep.model.files import MODEL_ARTIFACT as ARTIFACT

#: what the model needs installed to load (its pip requirements, stated: not inferred, which
#: would load and run it)
REQUIREMENTS = ("aurora-sweep", "microsoft-aurora", "torch", "peft")


class AdapterModel(mlflow.pyfunc.PythonModel):
    """An exported adapter as an MLflow pyfunc model: loaded onto its base checkpoint (the
    packaged demo or the Hugging Face cache's, checked by its sha256); `predict` takes an
    `aurora.Batch` of the adapter's region and returns the forecast `params["steps"]` model
    steps (6 hours each, 1 by default) on."""

    def load_context(self, context) -> None:
        from aurora_sweep.model.adapter import load_finetuned

        self.model = load_finetuned(context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import torch

        from aurora_sweep.verify.rollout import model_steps

        steps = int((params or {}).get("steps", 1))
        with torch.inference_mode():
            *_, last = model_steps(self.model, model_input, steps)
        return last


def requirements() -> list[str]:
    """The pins of what the model needs, from this environment."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def register_adapter(
    folder: Path, *, run_id: str, name: str, tags: dict[str, str]
) -> tuple[str, str]:
    """Log `folder` to run `run_id` as an MLflow model and register it under `name` with `tags`
    (on the tracking URI set, `sweep.tracking.client_for`); its registry URI and version."""
    import mlflow

    client = mlflow.MlflowClient()
    ended = client.get_run(run_id).info  # logging reopens the run: its end is put back after
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT,
                python_model=AdapterModel(),
                artifacts={ARTIFACT: str(folder)},
                pip_requirements=requirements(),
                tags=tags,
            )
        client.set_terminated(run_id, status=ended.status, end_time=ended.end_time)
        registered = mlflow.register_model(info.model_uri, name, tags=tags)
        card = Path(folder) / "README.md"  # its title says what the adapter forecasts, where
        title = card.read_text().splitlines()[0].lstrip("# ") if card.exists() else ""
        if title:  # "<folder>: Aurora fine-tuned for ...", under the registered name
            what = title.split(": ", 1)[-1]
            client.update_model_version(name, registered.version, description=f"{name}: {what}")
    except mlflow.exceptions.MlflowException as e:
        raise AuroraSweepError(
            f"cannot register the adapter as model {name!r} in MLflow ({e.message.splitlines()[0]});"
            " the folder is exported: export again once the tracking server answers"
        ) from None
    return f"models:/{name}/{registered.version}", str(registered.version)
