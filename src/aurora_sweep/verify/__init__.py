"""Forecasts scored: a trial's forecasts of a split at every lead and their scores (`scoring`),
the score functions (`metrics`, `spatial`, `seeps`), intervals and paired differences
(`bootstrap`), the zero-shot Aurora 1.5 baseline (`zero_shot`) and a trial's figures (`plots`).

May import `model`, `data`, `config` and the shared leaves. It sits below `train`, whose pruner
checks and final scores call it.
"""
