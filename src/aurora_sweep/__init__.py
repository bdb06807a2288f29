"""aurora-sweep: search parameter-efficient fine-tuning recipes for Aurora inside a GPU memory cap."""

__version__ = "0.1.0"


def load_finetuned(directory, **kwargs):
    """Load an exported adapter directory, or its registered version `models:/<study>/<version>`,
    as a ready model (see `aurora_sweep.model.adapter`)."""
    from aurora_sweep.model.adapter import load_finetuned as _load

    return _load(directory, **kwargs)


__all__ = ["load_finetuned", "__version__"]
