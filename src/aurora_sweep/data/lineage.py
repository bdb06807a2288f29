"""What a trial trained and was scored on, as MLflow dataset inputs: the study's store and the
train and evaluation splits cut from it (region, grid, levels, target, period).

A store's digest is the SHA-256 of its metadata (`.zmetadata`: variables, shapes, attributes)
and of its files' names and sizes: a year of Europe is gigabytes, read once per trial it would
cost more than the trial. Re-importing other data changes the sizes or the metadata, so the
digest tells two stores apart; it does not prove that two stores with the same digest hold the
same numbers.

A leaf: no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def store_digest(store: Path) -> str:
    """The store's fingerprint: its metadata and its files' names and sizes (hex SHA-256)."""
    h = hashlib.sha256()
    store = Path(store)
    for root, dirs, files in os.walk(store):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(store).as_posix()
            h.update(f"{rel}\0{path.stat().st_size}\n".encode())
            if name in (".zmetadata", ".zattrs", "zarr.json"):
                h.update(path.read_bytes())
    return h.hexdigest()


def split_datasets(config, store_sha: str, split: str = "validation") -> list[dict]:
    """The train split and the evaluation split `split` of the study's store, each as MLflow
    describes a dataset (name, digest, source, profile) with its context ("training",
    "evaluation")."""
    data = config.data
    out = []
    for context, name in (("training", "train"), ("evaluation", split)):
        period = getattr(data, name)
        profile = {
            "split": name,
            "period": f"{period.start}..{period.end}",
            "region": {k: getattr(data.region, k) for k in ("north", "south", "west", "east")},
            "grid_degrees": data.grid,
            "levels_hpa": list(data.levels),
            "target": data.target,
            "source": data.source,
        }
        digest = hashlib.sha256(f"{store_sha}\0{json.dumps(profile, sort_keys=True)}".encode())
        out.append(
            {
                "name": f"{config.name}-{name}",
                "digest": digest.hexdigest()[:16],
                "source_type": "local",
                "source": json.dumps({"uri": str(Path(data.store).resolve()), "sha256": store_sha}),
                "profile": json.dumps(profile),
                "context": context,
            }
        )
    return out
