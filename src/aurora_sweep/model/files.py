"""microsoft/aurora's files a study reads: the bases' checkpoints (a given file, the packaged demo,
or the pinned file in the Hugging Face cache) and Aurora 1.5's static fields."""

from __future__ import annotations

import hashlib
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


def hub_file(name: str, revision: str, given_as: str) -> Path:
    """microsoft/aurora's file `name` at `revision`, from the Hugging Face cache (downloaded when
    the machine can reach the hub); refused in one line saying how to fetch it elsewhere and
    give it (`given_as`)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HF_REPO, name, revision=revision))
    except Exception as e:  # offline and not cached, or the hub refused
        raise AuroraSweepError(
            f"cannot get {name} from huggingface.co/{HF_REPO} ({type(e).__name__}): on a "
            f"machine with internet run `huggingface-cli download {HF_REPO} {name} --revision "
            f"{revision}` and {given_as}"
        ) from None


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
