"""microsoft/aurora's files a study reads: the bases' checkpoints (a given file, the packaged demo,
or the pinned file in the Hugging Face cache) and Aurora 1.5's static fields."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from aurora_sweep.config.bases import BASELINE_MODELS, BASES, HF_REPO
from aurora_sweep.errors import AuroraSweepError

#: The demo base: a tiny Aurora pretrained on the demo world, packaged with aurora-sweep.
DEMO_CHECKPOINT = Path(__file__).parents[1] / "demo" / "aurora-demo-base.ckpt"
#: The checkpoint microsoft/aurora publishes for Aurora 1.5 (pinned as the bases are).
V15 = BASELINE_MODELS["v1.5"]
#: Its 36 static fields on the global 0.25° grid (721 latitudes from 90° to -90°, 1440
#: longitudes from 0°), as microsoft/aurora publishes them beside the checkpoint: its example
#: loads them from this file rather than building them from the CDS (soil and vegetation types
#: one-hot, orography as the model was trained on), and so does aurora-sweep.
STATIC_FILE = "aurora-0.25-v1.5-static.pickle"


def resolve_checkpoint(base: str, checkpoint: Path | None) -> Path:
    """The checkpoint file for `base`: a given path, the packaged demo, or its pinned file in
    the Hugging Face cache (downloaded when the machine can reach the hub)."""
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise AuroraSweepError(
                f"no checkpoint file at {checkpoint}: check [model] checkpoint (or "
                f"[model.checkpoints] {base})"
            )
        return Path(checkpoint)
    if base == "demo":
        if not DEMO_CHECKPOINT.is_file():
            raise AuroraSweepError(
                f"the demo base checkpoint {DEMO_CHECKPOINT} is missing: reinstall aurora-sweep"
            )
        return DEMO_CHECKPOINT
    spec = (BASES | BASELINE_MODELS)[base]
    return hub_file(
        spec.checkpoint_name,
        spec.revision,
        f"copy the file here, then give it as [model.checkpoints] {base} = PATH (or "
        "--checkpoint PATH)",
    )


#: seconds to wait for huggingface.co to answer before a file not in the cache is refused
HUB_TIMEOUT = 3.0


def hub_file(name: str, revision: str, given_as: str) -> Path:
    """microsoft/aurora's file `name` at `revision`: from the Hugging Face cache when it is
    there; else downloaded, when huggingface.co answers within `HUB_TIMEOUT` seconds; else
    refused at once in one line saying how to fetch it elsewhere and give it (`given_as`), not
    after the hub client's own retries and messages."""
    import logging

    import huggingface_hub
    from huggingface_hub import constants

    cached = huggingface_hub.try_to_load_from_cache(HF_REPO, name, revision=revision)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    how = (
        f"on a machine with internet run `huggingface-cli download {HF_REPO} {name} --revision "
        f"{revision}` and {given_as}"
    )
    if constants.HF_HUB_OFFLINE or not _answers(constants.ENDPOINT):
        raise AuroraSweepError(
            f"{name} is not in the Hugging Face cache and huggingface.co cannot be reached: {how}"
        )
    quiet = logging.getLogger("huggingface_hub")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return Path(huggingface_hub.hf_hub_download(HF_REPO, name, revision=revision))
    except Exception as e:  # the hub refused, or the download broke off
        raise AuroraSweepError(
            f"cannot get {name} from huggingface.co/{HF_REPO} ({type(e).__name__}): {how}"
        ) from None
    finally:
        quiet.setLevel(level)


def _answers(endpoint: str) -> bool:
    """Whether `endpoint` (the hub's URL) accepts a connection within `HUB_TIMEOUT` seconds."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_TIMEOUT):
            return True
    except OSError:
        return False


def study_files(config) -> None:
    """Find, or refuse in one line, every file a study needs from outside it before anything
    of the study is made: each base's checkpoint, and Aurora 1.5's checkpoint and static fields
    where the study scores against it or adapts a base that reads its inputs."""
    from aurora_sweep.config.bases import reads_v15_inputs

    for base in config.bases:
        resolve_checkpoint(base, config.model.checkpoint_for(base))
    if "aurora-1.5" in config.baselines:
        resolve_checkpoint("v1.5", config.model.checkpoint_for("v1.5"))
    if "aurora-1.5" in config.baselines or any(map(reads_v15_inputs, config.bases)):
        resolve_statics(config.model.v15_static)


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB chunks (a base checkpoint is gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_statics(path: Path | None) -> Path:
    """The static file: a given path, or the pinned one in the Hugging Face cache."""
    if path is not None:
        if not Path(path).is_file():
            raise AuroraSweepError(f"no Aurora 1.5 static file at {path}")
        return Path(path)
    return hub_file(STATIC_FILE, V15.revision, "give the file as [model] v15_static = PATH")


#: the adapter folder's name among an exported adapter's MLflow model artifacts
#: (`report.registry`)
MODEL_ARTIFACT = "adapter"


def is_model_uri(ref: str | Path) -> bool:
    """Whether an adapter is named by its registered version, `models:/<name>/<version>`."""
    return isinstance(ref, str) and ref.startswith("models:/")


def local_adapter(ref: str | Path, *, tracking_uri: str | None = None) -> Path:
    """The folder of adapter `ref`: a folder as it is; `models:/<name>/<version>` fetched from
    the registry (`tracking_uri`, else MLflow's: `MLFLOW_TRACKING_URI` or `mlflow.db` here)
    into a temporary folder that lives as long as this process."""
    if not is_model_uri(ref):
        return Path(ref)
    import atexit
    import shutil
    import tempfile

    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _here()
    where = Path(tempfile.mkdtemp(prefix="aurora-sweep-model-"))
    atexit.register(shutil.rmtree, where, True)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{str(ref).rstrip('/')}/artifacts/{MODEL_ARTIFACT}",
            dst_path=str(where),
            tracking_uri=uri,
        )
    except Exception as e:
        message = getattr(e, "message", str(e)).splitlines()[0]
        raise AuroraSweepError(
            f"cannot fetch {ref} from the model registry at {uri} ({message}); give "
            "--tracking-uri (or MLFLOW_TRACKING_URI) for the study's tracking server, or run from "
            "the directory that holds its mlflow.db"
        ) from None
    return Path(local)


def _here() -> str:
    db = Path("mlflow.db").resolve()
    if not db.exists():
        raise AuroraSweepError(
            f"no MLflow store here ({db} does not exist) to find a models:/ URI in: run from the "
            "study's directory or give --tracking-uri"
        )
    return f"sqlite:///{db}"
