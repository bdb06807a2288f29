"""One trial's fine-tune: the steps, the pruner's checks and the final scores (`fit`), the
optimiser and its schedule (`optimiser`), and the tiles a micro-batch may train on (`tiles`).

May import `verify`, `model`, `data`, `config` and the shared leaves.
"""
