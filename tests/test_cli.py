import subprocess
import sys
import time

from typer.testing import CliRunner

from aurora_sweep.cli import app

runner = CliRunner()


def test_help_answers_without_importing_the_heavy_libraries():
    code = (
        "import sys, time; t = time.perf_counter(); from aurora_sweep.cli import app; "
        "print(time.perf_counter() - t); "
        "print(any(m in sys.modules for m in ('torch', 'aurora', 'peft', 'mlflow', 'optuna')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, heavy = out.stdout.split()
    assert heavy == "False"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "aurora_sweep.cli", "--help"], capture_output=True, check=True
    )
    assert time.perf_counter() - started < 2.0


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_missing_config_is_one_line_and_exit_1(tmp_path):
    line = _one_line_error(runner.invoke(app, ["run", "--config", str(tmp_path / "nope.toml")]))
    assert "--config" in line


def test_a_broken_config_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nregion = { north = 10, south = 20, west = 0, east = 5 }\n")
    line = _one_line_error(runner.invoke(app, ["best", "--config", str(bad)]))
    assert "[data.region] north" in line


def test_an_era5_study_without_its_store_says_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "era5.toml"
    cfg.write_text(
        '[data]\nsource = "era5"\nregion = { north = 60, south = 40, west = 0, east = 20 }\n'
    )
    line = _one_line_error(runner.invoke(app, ["run", "--config", str(cfg), "--trials", "1"]))
    assert "aurora-sweep data download" in line


def test_evaluating_a_directory_that_is_no_adapter_is_one_line(tmp_path):
    line = _one_line_error(runner.invoke(app, ["evaluate", str(tmp_path)]))
    assert "not an aurora-sweep adapter" in line


def test_best_before_any_run_says_to_run_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "aurora-sweep run" in _one_line_error(runner.invoke(app, ["best"]))


def test_an_impossible_search_is_refused_before_anything_is_recorded(tmp_path, monkeypatch):
    from conftest import write_tiny_config

    monkeypatch.chdir(tmp_path)
    path = write_tiny_config(tmp_path)
    for old, new, key in (
        ("unfrozen_blocks = [0, 1]", "unfrozen_blocks = [0, 99]", "unfrozen_blocks"),
        ("unfrozen_blocks = [0, 1]", 'method = ["blocks"]\nblocks = [99]', "blocks"),
    ):
        bad = tmp_path / f"{key}.toml"
        bad.write_text(path.read_text().replace(old, new))
        line = _one_line_error(runner.invoke(app, ["run", "--config", str(bad), "--trials", "1"]))
        assert f"[search] {key} asks for 99 blocks" in line and "has 8" in line
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "mlruns").exists()
