"""An import's scratch folder: memory-mapped arrays the size of the store, owned by the process
that made it, removed when the import ends, and removed by the next import if a kill left it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import tempfile
import time
from pathlib import Path

from aurora_sweep.processes import alive, this_process

log = logging.getLogger(__name__)

SCRATCH_PREFIX = ".import-"


SCRATCH_OWNER = "owner.json"


def scratch_folder(parent: Path, stack: contextlib.ExitStack) -> Path:
    """A scratch folder for one import, removed when it ends; a killed import's is removed by
    the next one (its owner file names the process, so a running import's is left alone)."""
    remove_stale_scratch(parent)
    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=parent)))
    (path / SCRATCH_OWNER).write_text(json.dumps(this_process()))
    return path


def _owner_alive(folder: Path) -> bool:
    """Whether the import that made `folder` may still run: its process lives on this host, or
    it ran on another host (which cannot be asked) within the last day."""
    try:
        owner = json.loads((folder / SCRATCH_OWNER).read_text())
    except (OSError, ValueError):
        return time.time() - folder.stat().st_mtime < 60  # being created this moment
    if owner.get("host") != socket.gethostname():
        return time.time() - folder.stat().st_mtime < 86400
    return alive(owner.get("pid"), owner.get("pid_started"))


def remove_stale_scratch(parent: Path) -> list[tuple[Path, int]]:
    """Remove the scratch folders that killed imports left in `parent` (each the size of the
    store); returns what was removed and its size in bytes."""
    removed = []
    for folder in sorted(Path(parent).glob(f"{SCRATCH_PREFIX}*")):
        if not folder.is_dir() or _owner_alive(folder):
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        removed.append((folder, size))
        log.warning(
            "removed %s (%.1f GB), the scratch of an import that was killed",
            folder,
            size / 1e9,
        )
    return removed


def make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
