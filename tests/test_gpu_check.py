"""The GPU check (bench/gpu_check.py) runs here on the CPU, quick, so that it cannot rot before a
GPU is lent."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_and_writes_its_figures(tmp_path, tiny_store):
    from conftest import write_tiny_config

    config = write_tiny_config(tmp_path, store=tiny_store)
    out = tmp_path / "gpu-check.json"
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    gpu_check.main(["--device", "cpu", "--quick", "--config", str(config), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["torch"] and result["command"].endswith(str(out))
    peaks = {row["method"]: row for row in result["peaks"]}
    assert set(peaks) == {"lora", "head"}
    for row in peaks.values():  # each predicted two ways and measured, with its step's time
        assert row["predicted_traced_mb"] > 0 and row["predicted_fitted_mb"] > 0
        assert row["measured_mb"] > 0 and row["step_seconds"] > 0
        assert row["traced_method"] == "traced"
    (scoring,) = result["scoring"]
    assert 1 <= scoring["eval_batch"] <= 32 and scoring["measured_pass_mb"] > 0
    assert scoring["predicted_pass_mb"] == pytest.approx(scoring["measured_pass_mb"], rel=0.25)
    (europe,) = result["europe_trial_seconds"]  # a Europe trial's share, from the times above
    assert 0 < europe["verify_share"] < 1 and europe["train_s"] > 0
    sweep = result["sweep"]
    # the recipe enqueued over the cap never trained; the study still ran its total
    assert sweep["enqueued_over_cap"]["infeasible"].startswith("predicted peak")
    assert not sweep["enqueued_over_cap"]["trained"]
    assert sweep["states"][0] == "PRUNED" and len(sweep["states"]) >= 2
    assert sweep["wall_seconds"] > 0
