"""Aurora 1.5's inputs in the data path: a study with the "aurora-1.5" baseline asks the CDS for
its other surface variables, imports them into the store, and refuses a store without them."""

from __future__ import annotations

import numpy as np
import pytest

from aurora_sweep.data import era5, store
from aurora_sweep.data.cube import store_mismatch
from aurora_sweep.errors import AuroraSweepError
from era5_fixtures import field_value, study_config, write_study_files

pytestmark = pytest.mark.filterwarnings("ignore")
V15 = 'baselines = ["persistence", "climatology", "aurora-1.5"]'


def _surface_variables(config) -> set[str]:
    return {
        v for r in era5.plan_requests(config) if r.target.startswith("sfc-")
        for v in r.request["variable"]
    }  # fmt: skip


def test_the_plan_asks_for_aurora15s_inputs_only_when_the_study_uses_it(tmp_path):
    plain = study_config(tmp_path, name="a")
    with_v15 = study_config(tmp_path, name="b", study=V15)
    assert not plain.data.v15_inputs and with_v15.data.v15_inputs
    assert _surface_variables(plain) == set(era5.SURFACE_REQUEST)
    extra = _surface_variables(with_v15) - _surface_variables(plain)
    assert extra == set(era5.plan.V15_SURFACE_REQUEST) and len(extra) == 14
    assert {"snow_depth", "sea_ice_cover", "2m_dewpoint_temperature"} <= extra
    assert era5.estimate_download(with_v15).store_bytes > era5.estimate_download(plain).store_bytes


def test_aurora15s_inputs_land_in_the_store_under_their_names(tmp_path):
    config = study_config(tmp_path, study=V15)
    files = write_study_files(config, tmp_path / "in")
    cube = store.open_store(era5.import_files(files, config.data, progress=False))
    times = cube["time"].values
    for name, short in [("2d", "d2m"), ("sd", "sd"), ("ci", "siconc"), ("100u", "u100")]:
        got = cube[name].isel(latitude=0, longitude=0).values
        np.testing.assert_allclose(got, field_value(short, times), rtol=1e-6)
    assert cube["sd"].attrs["units"] == "m of water equivalent"
    assert store_mismatch(cube, config.data) is None


def test_files_without_aurora15s_inputs_are_refused_in_one_line(tmp_path):
    config = study_config(tmp_path, study=V15)

    def drop_dewpoint(target, ds):
        return ds.drop_vars("d2m") if "d2m" in ds else ds

    files = write_study_files(config, tmp_path / "in", edit=drop_dewpoint)
    with pytest.raises(AuroraSweepError, match=r"lack 2d: download them from reanalysis-era5-s"):
        era5.import_files(files, config.data, progress=False)
    # a store built without them does not serve the study
    plain = study_config(tmp_path, name="p")
    cube = store.open_store(
        era5.import_files(write_study_files(plain, tmp_path / "p"), plain.data, progress=False)
    )
    assert "Aurora 1.5's inputs (2d, tcwv, tcc, 100u ...)" in store_mismatch(cube, config.data)


def test_a_bad_baseline_is_refused_in_one_line(tmp_path):
    with pytest.raises(AuroraSweepError, match=r"\[study\] baselines: 'aurora-2' is not one of"):
        study_config(tmp_path, study='baselines = ["aurora-2"]')
