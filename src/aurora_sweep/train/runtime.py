"""What runs beside a trial's training loop: its peak memory (`PeakMemory`) and the thread that
reads its batches ahead (`Prefetcher`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch


class PeakMemory:
    """Peak memory of a trial: CUDA peak allocated, or on a CPU the peak resident set size.

    On Linux the kernel keeps the process's peak RSS (VmHWM), and writing 5 to
    /proc/self/clear_refs resets it: the trial's peak is read once at the end, exactly, with no
    thread. Elsewhere (or where that file cannot be written) a thread samples the RSS every
    20 ms; its wake-ups take the GIL from the training loop (8 % of a demo trial's time).
    """

    CLEAR_REFS = Path("/proc/self/clear_refs")
    STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self.reserved: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel_peak = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        proc = psutil.Process()
        self.peak = proc.memory_info().rss
        self._kernel_peak = self._reset_kernel_peak()
        if not self._kernel_peak:

            def sample() -> None:
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
            return
        self._stop.set()
        if self._thread:
            self._thread.join()
        kernel = self._read_kernel_peak() if self._kernel_peak else None
        self.peak = max(self.peak, kernel or 0, psutil.Process().memory_info().rss)

    def _reset_kernel_peak(self) -> bool:
        try:
            self.CLEAR_REFS.write_text("5")
        except OSError:  # not Linux, or a kernel or sandbox that refuses it
            return False
        return self._read_kernel_peak() is not None

    def _read_kernel_peak(self) -> int | None:
        try:
            for line in self.STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            return None
        return None

    @property
    def megabytes(self) -> float:
        return self.peak / 2**20


class Prefetcher:
    """Makes `read(indices)` for each entry of `plan`, in order, a few ahead of the consumer in a
    thread: reading from the store (file reads and copies, which release the GIL) overlaps the
    training step. An error in the reader is raised by `next`."""

    def __init__(self, read: Callable[[Any], Any], plan: list, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(read, plan), name="prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, read: Callable[[Any], Any], plan: list) -> None:
        for item in plan:
            try:
                value = (True, read(item))
            except BaseException as e:  # noqa: BLE001 - raised in the consumer
                value = (False, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(value, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or not value[0]:
                return

    def next(self) -> Any:
        ok, value = self._queue.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
