"""One trial's fine-tune: the optimiser steps, the pruner's checks and the final scores (`fit`),
and the tiles a micro-batch may train on (`tiles`).

May import `verify`, `model`, `data`, `config` and the shared leaves.
"""
