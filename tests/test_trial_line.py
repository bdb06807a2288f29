"""The line `run` prints for a completed trial."""

from aurora_sweep.sweep.scheduler import _score_line

SCORES = {
    "tp_seeps": 0.186, "tp_seeps_q05": 0.178, "tp_seeps_q95": 0.193,
    "tp_skill_persistence": 0.579, "tp_skill_climatology": 0.820,
    "forget_2t_ratio": 1.01, "forget_10v_ratio": 6.87,
}  # fmt: skip


def test_a_trial_that_forgets_is_marked_as_best_marks_it(tiny_config):
    import dataclasses

    config = dataclasses.replace(tiny_config, max_forgetting=1.10)
    line = _score_line(SCORES, config)
    assert line.startswith("tp_seeps 0.186 [0.178, 0.193]  skill vs persistence +0.579")
    assert line.endswith("✗ forgets 10v ×6.87 (max ×1.1): never the answer")
    kept = _score_line({**SCORES, "forget_10v_ratio": 1.05}, config)
    assert "✗" not in kept and kept.endswith("vs climatology +0.820")
