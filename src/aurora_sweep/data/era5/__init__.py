"""ERA5 from the Climate Data Store, turned into the canonical store.

Fine-tuning Aurora for precipitation needs years of ERA5 over a region: tens of gigabytes that the
CDS hands out in requests it may queue for an hour, refuse as too large, or drop halfway. This
module plans those requests in chunks the CDS accepts, fetches them a few at a time with retries,
remembers finished chunks in a manifest so an interrupted download resumes where it stopped, and
turns whatever the CDS returned (NetCDF4, zips of NetCDF4 even under a `.nc` name, the odd legacy
NetCDF3 file) into the one cube that `store.py` defines.

Two facts shape the reading side (see DESIGN.md and shared/cds-real/PROVENANCE.md):

- ERA5 `tp` is the 1-hour accumulation ending at `valid_time`, even in files sampled every 6 h. A
  6-hour total ending at T is the sum of the six hourly values in (T-6h, T]; a series that is not
  hourly cannot give it and is refused.
- The same time can come twice, as final ERA5 (expver '0001') and as ERA5T ('0005'); the final
  value wins.

The cube is assembled in memory-mapped scratch arrays next to the store, so a multi-year import
needs disk, not RAM, and then written once with `store.write_store` (atomic).

One module per step: `plan` (what to request, in chunks the CDS accepts), `read` (a CDS file into
a normalised dataset), `assemble` (files into the store), `download` (requests, retries, the
manifest). The names below are the package's interface.
"""

from aurora_sweep.data.era5.assemble import check_hourly, import_files, region_indices
from aurora_sweep.data.era5.download import (
    DownloadInterrupted,
    classify_failure,
    download,
    download_folder,
    load_manifest,
)
from aurora_sweep.data.era5.plan import (
    ATMOS_REQUEST,
    PRESSURE_LEVELS,
    SINGLE_LEVELS,
    STATIC_REQUEST,
    SURFACE_REQUEST,
    Request,
    describe_plan,
    estimate_download,
    grid_shape,
    plan_requests,
    request_area,
)
from aurora_sweep.data.era5.read import CorruptFileError, normalise, read_cds_file

__all__ = [
    "DownloadInterrupted",
    "ATMOS_REQUEST",
    "CorruptFileError",
    "PRESSURE_LEVELS",
    "Request",
    "SINGLE_LEVELS",
    "STATIC_REQUEST",
    "SURFACE_REQUEST",
    "check_hourly",
    "classify_failure",
    "describe_plan",
    "download",
    "download_folder",
    "estimate_download",
    "grid_shape",
    "import_files",
    "load_manifest",
    "normalise",
    "plan_requests",
    "read_cds_file",
    "region_indices",
    "request_area",
]
