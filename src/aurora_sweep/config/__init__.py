"""The study's vocabulary, read and checked once: the targets (`targets`), the bases (`bases`),
a trial's recipe and the words it is written in (`recipe`), each value's check (`settings`), the
study's configuration (`study`) and the reading of its TOML file (`study_file`).

Imports only the shared leaves (`errors`, `devices`, `processes`); never torch.
"""
