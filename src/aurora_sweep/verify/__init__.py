"""Forecasts scored: a trial's forecasts of a split at every lead and their scores (`scoring`),
the rollout over a lead they and every forecast run (`rollout`), the score functions
(`metrics`, `spatial`, `seeps`), intervals and paired differences (`bootstrap`), the zero-shot
Aurora 1.5 baseline (`zero_shot`), the study's data made whole for its trials (`prepare`) and a
trial's figures (`plots`).

May import `model`, `data`, `config` and the shared leaves. It sits below `train`, whose pruner
checks and final scores call it.
"""
