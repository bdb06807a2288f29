"""A trial worker process's own setup (`worker.serve` calls these first): it ends with its
parent, sees the GPU it was given, keeps no named semaphore a kill would leak, and exits on
SIGTERM. No torch: each concerns the process, not the trial."""

from __future__ import annotations

import os
import signal
import threading
import time

from aurora_sweep.errors import AuroraSweepError


def exit_with_parent(poll_seconds: float = 0.5) -> None:
    """End this process as soon as its parent is gone.

    A `run` killed with SIGKILL (a scheduler's time limit, the OOM killer) cannot stop its
    worker, which would go on training for nobody until its next message to the dead parent.
    A daemon thread notices the parent's death (this process is re-parented) and exits at once.
    """
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def cuda_visible(gpu: int, current: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a worker on GPU `gpu`, numbered as the study process sees them.

    A scheduler (SLURM, Kubernetes) may already restrict the process to some GPUs, say "2,3":
    GPU 1 is then physical GPU 3, and the worker must keep that restriction, not replace it.
    """
    if current is None or not current.strip():
        return str(gpu)
    visible = [d.strip() for d in current.split(",") if d.strip()]
    if gpu >= len(visible):
        raise AuroraSweepError(
            f"GPU {gpu} is not among the {len(visible)} visible ones (CUDA_VISIBLE_DEVICES="
            f"{current}): number --gpus from 0 as this process sees them"
        )
    return visible[gpu]


def blosc_thread_lock() -> bool:
    """Give numcodecs' Blosc a thread lock in place of the semaphore it makes on first use.

    numcodecs guards Blosc's global context with `multiprocessing.Lock()`, and the store's
    coordinates are Blosc-compressed. In a spawned process that lock is a named semaphore which
    the resource tracker (shared with the study process) must see unlinked: a worker killed
    mid-trial (SIGKILL, the OOM killer, its parent gone) cannot, and the tracker then prints
    "leaked semaphore objects" on the study's stderr after its last line. The context the lock
    guards is this process's own, so a thread lock guards it as well. True when it was set (an
    older or newer numcodecs without these names is left as it is).
    """
    try:
        from numcodecs import blosc
    except ImportError:
        return False
    if getattr(blosc, "_MUTEX_IS_INIT", None) is not False:
        return False  # already made, or not the numcodecs this was written for
    blosc._MUTEX, blosc._MUTEX_IS_INIT = threading.Lock(), True
    return True


def exit_on_sigterm(signum: int, frame: object) -> None:
    # once: a second SIGTERM (the scheduler's and the study's) must not break the exit itself
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)
