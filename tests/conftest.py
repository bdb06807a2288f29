"""Shared fixtures: a tiny demo study (16x16 points, three years) whose store is built once."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

# No test reaches huggingface.co: the hub's address is a closed loopback port, in this process
# and in the trial workers it starts (set before huggingface_hub reads it at import)
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"

from aurora_sweep.config.study import StudyConfig  # noqa: E402
from aurora_sweep.config.study_file import load_config  # noqa: E402
from servers import mlflow_server, postgres_server, postgres_url  # noqa: E402, F401

TINY_STUDY = """
[study]
name = "tiny"
seed = 0
finalists = 1  # no re-training with more seeds: the finalists' tests turn it on
scoring_pruner = 0  # every trial scored whole; the scoring pruner's own test turns it on
system_metrics = 0  # no sampler thread per trial; the live test turns it on
reference = false   # the tests that need the reference recipes turn them on
# four steps at up to 5e-3 with tp's input trained: plumbing, not recipes worth keeping; against
# the demo base they forget past 1.1, and the tests that export need a feasible best. The
# constraint itself is tested on studies of its own (test_study.py)
max_forgetting = 100.0

[data]
source = "demo"
store = "data/tiny/store.zarr"
region = {{ north = 62.0, south = 47.0, west = 4.0, east = 19.0 }}
levels = [500, 700, 850]
grid = 1.0
period = ["2022-01-01", "2024-12-31"]
train = ["2022-01-01", "2022-12-31"]
validation = ["2023-01-01", "2023-04-30"]  # four months: every trial is scored at three leads
test = ["2024-01-01", "2024-12-31"]

[model]
base = "demo"

[train]
steps = {steps}
eval_every = 2
val_samples = 16
learning_rate = 3e-3

[search]
lora_rank = [2, 4]
lora_targets = ["qkv+proj", "qkv+proj+fc1+fc2"]
unfrozen_blocks = [0, 1]
batch_size = [2]
precision = ["fp32", "bf16"]
learning_rate = [1e-3, 5e-3]
activation_checkpointing = [false, true]
"""


def _one_core_per_xdist_worker() -> None:
    """Pin each pytest-xdist worker to a core of its own: two test processes on two cores, each
    with torch's threads (and its trial workers', which inherit the affinity and size their
    threads by it, `study.usable_cores`) on every core, thrash instead of overlapping."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
        import torch

        torch.set_num_threads(1)


_one_core_per_xdist_worker()


def write_tiny_config(directory: Path, *, steps: int = 4, store: Path | None = None) -> Path:
    text = TINY_STUDY.format(steps=steps)
    if store is not None:
        text = text.replace('"data/tiny/store.zarr"', f'"{store}"')
    path = directory / "tiny.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """The tiny demo study's store, generated in the CDS layout and imported once per session."""
    from aurora_sweep.data.cube import open_cube

    root = tmp_path_factory.mktemp("tiny-store")
    config = load_config(write_tiny_config(root), workdir=root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        open_cube(config)
    return config.data.store


@pytest.fixture
def tiny_config(tmp_path, tiny_store) -> StudyConfig:
    """A tiny demo study in its own working directory, sharing the session's store."""
    return load_config(write_tiny_config(tmp_path, store=tiny_store), workdir=tmp_path)


#: The longest modules, longest first (seconds in one run, 2 cores): pytest-xdist hands whole
#: modules to its two workers in collection order (--dist loadscope, and --no-loadscope-reorder:
#: by default it would order them by their number of tests, and the long modules, which have
#: few, would start last on one worker while the other waits), so these start first and the
#: short ones fill in around them.
HEAVY_FIRST = (
    "test_scale_out.py", "test_study.py", "test_target_studies.py", "test_grids.py",
    "test_early_stop.py", "test_worker.py", "test_levers.py", "test_aurora15.py",
    "test_gpu_check.py", "test_finalists.py", "test_bases.py", "test_live.py", "test_trace.py",
    "test_model.py", "test_real_region.py", "test_era5.py", "test_evaluation.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list) -> None:
    order = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))
