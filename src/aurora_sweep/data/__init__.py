"""The data a study trains and scores on: the CDS download and import (`era5/`), the embedded
demo's world (`demo`), the canonical zarr store (`store`) and its chunk reader (`store_reader`),
opening or building a study's store (`cube`), the samples a model reads (`samples`), the climates
of the train split (`climates`) and what every trial of a study shares (`trial_data`).

May import `config` and the shared leaves.
"""
