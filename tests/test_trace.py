"""The traced peak: a trial's step on fake tensors against the same step on real ones."""

from __future__ import annotations

import dataclasses

import pytest

from aurora_sweep.config.study_file import load_config
from aurora_sweep.memory import estimate as memory
from aurora_sweep.memory import traced as trace
from aurora_sweep.memory.meta_model import build_meta_model
from synthetic import tiny_lora_trial

GRID = (40, 64)  # not the demo's 32 x 48: padded windows in both directions


def real_step_peak(trial, grid, levels) -> int:
    """The live-tensor peak of `trace`'s step on real CPU tensors (zeros), from nothing: the
    weights, the optimiser's state, the batch and the step, as the profiler counts them."""
    model = build_meta_model(trial)
    return memory.cpu_live_peak_bytes(
        lambda: trace._run_step(
            model, trial, grid=grid, levels=levels, cuda=False, counter=trace._LiveBytes(1)
        )
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"activation_checkpointing": True},
        {"method": "blocks", "unfrozen_blocks": 2, "accumulate": 2},
        {"method": "head", "optimizer": "adafactor", "rollout_steps": 2},
    ],
    ids=["lora", "checkpointed", "blocks-accumulated", "head-adafactor-rollout"],
)
def test_traced_peak_is_the_real_steps_peak(changes):
    trial = tiny_lora_trial(**changes)
    traced = trace.traced_peak(trial, grid=GRID, levels=3, device="cpu")
    real = real_step_peak(trial, GRID, 3)
    # checkpointing also keeps each unit's CPU random-number state (5 kB, outside the dispatcher
    # and, on a GPU, in host memory): 1 % of this tiny model's step
    assert traced.total_bytes == pytest.approx(real, rel=0.015)
    assert traced.parts["weights"] > 0 and traced.parts["activations"] > 0
    assert sum(traced.parts.values()) == traced.total_bytes


def test_cuda_trace_rounds_storages_and_runs_foreach():
    trial = tiny_lora_trial()
    cpu = trace.traced_peak(trial, grid=GRID, levels=3, device="cpu").total_bytes
    cuda = trace.traced_peak(trial, grid=GRID, levels=3, device="cuda")
    # 512-byte blocks only ever add, and by less than a block per live storage
    assert cpu < cuda.total_bytes < cpu * 1.05
    est = memory.estimate_peak(trial, grid=GRID, levels=3, how="traced")
    assert est.method == "traced" and not est.note
    assert est.total_bytes == cuda.total_bytes + est.parts["overhead"]
    assert est.parts["overhead"] >= memory.CUDA_WORKSPACE_BYTES


def test_one_trace_per_structure():
    trial = tiny_lora_trial(lora_rank=3)
    trace._traced.cache_clear()
    first = trace.traced_peak(trial, grid=GRID, levels=3, device="cuda")
    other = dataclasses.replace(trial, learning_rate=5e-3, seed=7, steps=100, target_weight=2.0)
    assert trace.traced_peak(other, grid=GRID, levels=3, device="cuda") == first
    assert trace._traced.cache_info().hits == 1
    bigger = dataclasses.replace(trial, batch_size=4)
    assert trace.traced_peak(bigger, grid=GRID, levels=3, device="cuda").total_bytes > (
        first.total_bytes
    )


def test_a_trace_leaves_no_fake_tensor_behind():
    """Aurora caches its window masks by shape and device: a real step after a trace on the
    same grid must not find a fake mask."""
    from aurora import Aurora
    from aurora.model.swin3d import compute_3d_shifted_window_mask

    trial = tiny_lora_trial(batch_size=1, lora_rank=5)
    trace.traced_peak(trial, grid=GRID, levels=3, device="cpu")
    assert compute_3d_shifted_window_mask.cache_info().currsize == 0
    model = build_meta_model(trial)
    peak = real_step_peak(trial, GRID, 3)  # raises on a fake tensor from the cache
    assert peak > 0 and isinstance(model, Aurora)


def test_a_failed_trace_falls_back_to_the_fit(monkeypatch):
    def broken(*a, **k):
        raise NotImplementedError("aten.some_op has no fake kernel")

    monkeypatch.setattr(trace, "_run_step", broken)
    trial = tiny_lora_trial(lora_rank=6)
    est = memory.estimate_peak(trial, grid=GRID, levels=3, how="traced")
    fitted = memory.estimate_peak(trial, grid=GRID, levels=3, how="fitted")
    assert est.method == "fitted" and est.total_bytes == fitted.total_bytes
    assert "NotImplementedError: aten.some_op has no fake kernel" in est.note


def study_with(tmp_path, name: str, resources: str) -> object:
    from importlib.resources import files

    text = files("aurora_sweep").joinpath("sweeps/demo.toml").read_text()
    path = tmp_path / f"{name}.toml"
    path.write_text(text + "\n[resources]\n" + resources + "\n")
    return load_config(path)


def test_the_study_traces_where_a_cap_decides(tmp_path):
    from aurora_sweep.errors import AuroraSweepError

    assert study_with(tmp_path, "capped", 'gpu_memory_cap = "8GB"').estimate_how == "traced"
    assert study_with(tmp_path, "free", "").estimate_how == "fitted"
    forced = study_with(tmp_path, "forced", 'memory_estimate = "traced"')
    assert forced.estimate_how == "traced"
    with pytest.raises(AuroraSweepError, match=r"memory_estimate = 'exact'.*\"traced\""):
        study_with(tmp_path, "bad", 'memory_estimate = "exact"')


def test_auto_checkpointing_takes_the_least_recomputation_that_fits():
    from aurora_sweep.config.recipe import AURORA_CHECKPOINTING, AUTO_CHECKPOINTING

    auto = tiny_lora_trial(activation_checkpointing="auto", batch_size=1)
    kw = dict(grid=GRID, levels=3, how="traced")
    peaks = []
    for modules in AUTO_CHECKPOINTING:
        tc = dataclasses.replace(
            auto, activation_checkpointing=bool(modules), checkpoint_modules=modules
        )
        peaks.append(memory.estimate_peak(tc, **kw).total_bytes)
    assert peaks == sorted(peaks, reverse=True)  # more checkpointing, less memory
    assert peaks[0] > peaks[1]  # checkpointing the blocks alone saves memory
    # no cap: nothing recomputed
    tc, est = memory.plan_checkpointing(auto, cap_bytes=None, **kw)
    assert (tc.activation_checkpointing, tc.checkpointed) == (False, ())
    # a cap just under the step without checkpointing: the blocks alone are enough
    tc, est = memory.plan_checkpointing(auto, cap_bytes=peaks[0] - 1, **kw)
    assert tc.checkpointed == AUTO_CHECKPOINTING[1] and est.total_bytes == peaks[1]
    # nothing fits: Aurora's whole set, which the cap refuses
    tc, est = memory.plan_checkpointing(auto, cap_bytes=peaks[-1] - 1, **kw)
    assert tc.checkpointed == AURORA_CHECKPOINTING and memory.check_cap(est, peaks[-1] - 1) > 0
    # the fit knows no checkpointing and Aurora's whole set only
    tc, _ = memory.plan_checkpointing(auto, cap_bytes=peaks[0] - 1, grid=GRID, levels=3)
    assert tc.checkpointed in ((), AURORA_CHECKPOINTING)
    # a trial that is not "auto" comes back as it is
    plain = tiny_lora_trial()
    assert memory.plan_checkpointing(plain, cap_bytes=1, **kw)[0] is plain


def test_the_search_takes_auto_checkpointing(tmp_path):
    from aurora_sweep.errors import AuroraSweepError

    text = 'activation_checkpointing = [false, "auto"]'
    path = tmp_path / "s.toml"
    from importlib.resources import files

    demo = files("aurora_sweep").joinpath("sweeps/demo.toml").read_text()
    path.write_text(demo.replace("activation_checkpointing = [false, true]", text))
    assert load_config(path).search.activation_checkpointing == (False, "auto")
    path.write_text(demo.replace("activation_checkpointing = [false, true]",
                                 'activation_checkpointing = ["sometimes"]'))  # fmt: skip
    with pytest.raises(AuroraSweepError, match="'sometimes' is not true, false or \"auto\""):
        load_config(path)
