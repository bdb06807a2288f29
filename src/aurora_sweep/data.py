"""Open a study's data store, building the embedded demo's on first use.

The demo goes through the same road as real data: its generator writes files in the CDS layout,
and `era5.import_files` turns them into the store. Real studies build their store with
`aurora-sweep data download` or `aurora-sweep data import`.
"""

from __future__ import annotations

import xarray as xr
from rich.console import Console

from aurora_sweep.config import StudyConfig
from aurora_sweep.store import open_store


def build_demo_store(config: StudyConfig, *, console: Console | None = None) -> None:
    """Generate the demo's CDS-layout files and import them into the study's store."""
    from aurora_sweep import demo_data, era5

    console = console or Console(stderr=True)
    cds_dir = config.data.store.parent / "cds"
    console.print(f"generating the demo data (CDS layout) in {cds_dir} ...")
    paths = demo_data.write_cds_files(cds_dir, demo_data.world_for(config.data))
    console.print(f"importing {len(paths)} files into {config.data.store} ...")
    era5.import_files(paths, config.data, progress=False)


def open_cube(config: StudyConfig, *, console: Console | None = None) -> xr.Dataset:
    """The study's canonical cube; the demo's is made here when missing."""
    if config.data.source == "demo" and not config.data.store.exists():
        build_demo_store(config, console=console)
    return open_store(config.data.store)
