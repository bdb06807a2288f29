"""A trial's peak GPU memory, predicted before it runs: the estimate and the checkpointing plan
(`estimate`), the trial's model on the meta device (`meta_model`), its training step traced on
fake tensors (`traced`), and its scoring's peak with the largest scoring batch the cap allows
(`scoring_peak`).

May import `train`, `model`, `data`, `config` and the shared leaves (`traced` runs a training
step as `train` takes it).
"""
