"""The trial worker's life: it never outlives the study process that started it."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).parent


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_the_worker_dies_with_a_study_process_killed_by_sigkill(tiny_config, tmp_path):
    marker = tmp_path / "training"
    script = tmp_path / "study.py"
    script.write_text(
        f"""
import functools, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
import faults
from aurora_sweep.config import load_config
from aurora_sweep.study import run_study

if __name__ == "__main__":
    config = load_config({str(tiny_config.path)!r}, workdir=Path({str(tmp_path)!r}))
    run_study(config, trials=1, fit=functools.partial(faults.train_forever, marker={str(marker)!r}))
"""
    )
    study = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() or not marker.read_text():
            assert study.poll() is None, "the study process ended before its trial started"
            assert time.monotonic() < deadline, "the trial never started"
            time.sleep(0.2)
        worker = int(marker.read_text())
        assert not _gone(worker)
        study.send_signal(signal.SIGKILL)  # as a scheduler's hard time limit does
        study.wait()
        deadline = time.monotonic() + 10
        while not _gone(worker):
            assert time.monotonic() < deadline, "the worker outlived its study process"
            time.sleep(0.2)
    finally:
        study.kill()
        if marker.exists() and marker.read_text():
            try:
                psutil.Process(int(marker.read_text())).kill()
            except psutil.NoSuchProcess:
                pass
