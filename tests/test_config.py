import re
from pathlib import Path

import pytest

from aurora_sweep.config.settings import parse_memory
from aurora_sweep.config.study import DEMO_CONFIG
from aurora_sweep.config.study_file import load_config
from aurora_sweep.errors import AuroraSweepError

REPO = Path(__file__).parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


# the demo study with its objective written out, as the refusals below rewrite it
BASE = DEMO_CONFIG.read_text().replace('# objective = "tp_seeps"', 'objective = "tp_seeps"', 1)


def test_embedded_demo_is_the_default_study(tmp_path):
    config = load_config(None, workdir=tmp_path)
    assert config.name == "demo-tp"
    assert config.data.source == "demo"
    assert config.data.store == tmp_path / "data/demo-tp/store.zarr"
    assert config.storage == f"sqlite:///{tmp_path / 'demo-tp.optuna.db'}"
    assert config.data.train.start.year == 2022 and config.data.test.end.year == 2025


def test_repo_sweep_demo_is_the_packaged_demo():
    assert (REPO / "sweep" / "demo.toml").read_text() == DEMO_CONFIG.read_text()


def test_lora_targets_are_normalised_to_module_order(tmp_path):
    text = BASE.replace(
        'lora_targets = ["qkv", "qkv+proj", "qkv+proj+fc1+fc2"]', 'lora_targets = ["proj+qkv"]'
    )
    assert load_config(_write(tmp_path, text)).search.lora_targets == ("qkv+proj",)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("north = 62.0, south = 31.0", "north = 31.0, south = 62.0", "north"),
        ("north = 62.0", "north = 95.0", "outside"),
        ("levels = [500, 700, 850]", "levels = [500, 650]", "Aurora knows only"),
        ("levels = [500, 700, 850]", "levels = [500, 500]", "twice"),
        (
            'validation = ["2024-01-01", "2024-12-31"]',
            'validation = ["2023-06-01", "2024-12-31"]',
            "overlap",
        ),
        (
            'train = ["2022-01-01", "2023-12-31"]',
            'train = ["2022-13-01", "2023-12-31"]',
            "YYYY-MM-DD",
        ),
        (
            'lora_targets = ["qkv", "qkv+proj", "qkv+proj+fc1+fc2"]',
            'lora_targets = ["attn"]',
            "qkv",
        ),
        ('precision = ["fp32"]', 'precision = ["fp8"]', "fp8"),
        ('base = "demo"', 'base = "huge"', "small-pretrained"),
        ("[search]", "[serach]", r"unknown section \[serach\]; did you mean \[search\]\?"),
        # a typo in a key is refused with the nearest valid key, not silently ignored
        ("steps = 32", "step = 32", r"\[train\] step: unknown setting; did you mean steps\?"),
        ("lora_rank = [", "lora_ranks = [", "lora_ranks: unknown setting; did you mean lora_rank"),
        ("grid = 1.0", "grid = 1.0\ngird = 2", "gird: unknown setting; did you mean grid"),
        ("west = 4.0", "wst = 4.0", r"\[data.region\] wst: unknown setting; did you mean west"),
        ("west = 4.0, ", "", r"\[data.region\] lacks west"),
        ("north = 62.0", 'north = "62N"', r"\[data.region\] north must be a number"),
        # every value is checked
        ("val_samples = 32 ", "val_samples = 0 ", r"val_samples must be at least 1"),
        ("val_samples = 32 ", "val_samples = 2.5 ", r"val_samples must be a whole"),
        (
            "eval_every = 8",
            "eval_every = 8\nweight_decay = -0.1",
            r"weight_decay must be at least 0",
        ),
        (
            "eval_every = 8",
            'eval_every = 8\nweight_decay = "none"',
            r"weight_decay must be a number",
        ),
        ("learning_rate = 1e-3", "learning_rate = 0", r"learning_rate must be above 0"),
        ("steps = 32", "steps = 32.5", r"\[train\] steps must be a whole number"),
        ("seed = 0\n# a new", 'seed = "zero"\n# a new', r"\[study\] seed must be a whole"),
        ("grid = 1.0", 'grid = "1"', r"\[data\] grid must be a number"),
        # Europe with west and east swapped: a box 308° wide across 180°
        ("west = 4.0, east = 51.0", "west = 51.0, east = 4.0", "are west and east swapped"),
        ("steps = 32", "steps = 0", "at least 1"),
        ('objective = "tp_seeps"', 'objectives = ["tp_seeps", "memory"]', "peak_memory_mb"),
        ('objective = "tp_seeps"', 'objectives = ["peak_memory_mb"]', "tp_seeps"),
        (
            'objective = "tp_seeps"',
            'objective = "tp_seeps"\nobjectives = ["tp_rmse", "trial_seconds"]',
            "disagree",
        ),
    ],
)
def test_bad_settings_are_refused_with_a_message_naming_them(tmp_path, old, new, message):
    assert old in BASE
    with pytest.raises(AuroraSweepError, match=message):
        load_config(_write(tmp_path, BASE.replace(old, new)))


def test_two_objectives_make_a_skill_and_cost_study(tmp_path):
    text = BASE.replace('objective = "tp_seeps"', 'objectives = ["tp_rmse", "peak_memory_mb"]')
    config = load_config(_write(tmp_path, text))
    assert config.objective.name == "tp_rmse" and config.cost == "peak_memory_mb"
    assert config.objectives == ("tp_rmse", "peak_memory_mb")
    single = load_config(_write(tmp_path, BASE))
    assert single.objectives == ("tp_seeps",) and single.cost is None


def test_a_box_too_small_for_the_backbone_is_refused_before_any_trial(tmp_path):
    from aurora_sweep.sweep.space import check_search

    # 11 rows at 1°: too few for Aurora's backbone; 12 are enough
    small = BASE.replace("north = 62.0, south = 31.0", "north = 41.0, south = 31.0")
    with pytest.raises(AuroraSweepError, match="at least 12x12.*11° on each side"):
        check_search(load_config(_write(tmp_path, small)))
    check_search(load_config(_write(tmp_path, small.replace("north = 41.0", "north = 42.0"))))


def test_a_box_too_small_for_its_edge_margin_is_refused_before_any_trial(tmp_path):
    from aurora_sweep.sweep.space import check_search

    # the demo's box is scored on 32x48 points at 1°: 16 points in from each side leave no row
    assert "edge_margin = 5.0" in BASE
    margin = BASE.replace("edge_margin = 5.0", "edge_margin = 16")
    with pytest.raises(AuroraSweepError, match=r"edge_margin = 16°: the box is scored on 32x48"):
        check_search(load_config(_write(tmp_path, margin)))
    config = load_config(_write(tmp_path, margin.replace("edge_margin = 16", "edge_margin = 15")))
    check_search(config)
    assert config.edge_margin == 15.0
    assert load_config(_write(tmp_path, BASE.replace("edge_margin = 5.0", ""))).edge_margin == 5.0
    # an objective of the interior needs an interior; a negative margin is refused
    inner = margin.replace('objective = "tp_seeps"', 'objective = "tp_rmse_interior"')
    assert load_config(_write(tmp_path, inner)).objective.interior
    with pytest.raises(AuroraSweepError, match="scores the box's interior, but .*edge_margin = 0"):
        load_config(_write(tmp_path, inner.replace("edge_margin = 16", "edge_margin = 0")))
    with pytest.raises(AuroraSweepError, match=r"\[study\] edge_margin must be at least 0"):
        load_config(_write(tmp_path, margin.replace("edge_margin = 16", "edge_margin = -1")))


def test_a_tile_the_size_of_the_box_and_tiles_no_trial_can_use_are_refused(tmp_path):
    from aurora_sweep.sweep.space import check_search

    search = "rollout_steps = [1, 2]"
    assert search in BASE
    # the demo's box is 32 x 48 points: a tile of 400 would be all of it
    with pytest.raises(AuroraSweepError, match=r"tile 400: the box is \d+x\d+ points"):
        check_search(load_config(_write(tmp_path, BASE.replace(search, f"{search}\ntile = [400]"))))
    only_rollouts = BASE.replace(search, "rollout_steps = [2]\ntile = [16]")
    with pytest.raises(AuroraSweepError, match="a rollout trains on the whole region"):
        check_search(load_config(_write(tmp_path, only_rollouts)))
    check_search(load_config(_write(tmp_path, BASE.replace(search, f"{search}\ntile = [16]"))))


def test_a_trial_with_rollouts_trains_on_the_whole_region(tmp_path):
    import optuna

    from aurora_sweep.sweep.space import sample_trial

    search = "rollout_steps = [1, 2]"
    config = load_config(_write(tmp_path, BASE.replace(search, f"{search}\ntile = [0, 16]")))
    study = optuna.create_study()
    for rollout in (1, 2):
        study.enqueue_trial({"rollout_steps": rollout, "tile": 16})
    tiles = [sample_trial(study.ask(), config).tile for _ in range(2)]
    assert tiles == [16, 0]


def test_a_base_whose_training_period_is_not_published_is_warned_of_as_unknown(tmp_path):
    import warnings

    from aurora_sweep.sweep.run import _pretraining_overlap

    config = load_config(_write(tmp_path, BASE.replace('base = "demo"', 'base = "v1.5"', 1)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _pretraining_overlap(config) is None
    (message,) = [str(w.message) for w in caught]
    assert "the v1.5 base's training period is not published" in message
    assert "is unknown" in message


def test_broken_toml_is_one_clear_error(tmp_path):
    with pytest.raises(AuroraSweepError, match="not valid TOML"):
        load_config(_write(tmp_path, "[study\nname="))


def test_missing_config_file_says_how_to_pass_one(tmp_path):
    with pytest.raises(AuroraSweepError, match="--config"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10GiB", 10 * 2**30),
        ("512MiB", 512 * 2**20),
        ("8GB", 8 * 10**9),
        ("1.5GiB", 3 * 2**29),
        (1024, 1024),
    ],
)
def test_memory_sizes_parse_with_units(text, expected):
    assert parse_memory(text) == expected


def test_memory_size_without_number_is_refused():
    with pytest.raises(AuroraSweepError, match="10GiB"):
        parse_memory("lots")


def test_a_study_that_names_only_its_data_gets_the_declared_defaults(tmp_path):
    from aurora_sweep.config.study import ModelConfig, SearchSpace, StudyConfig, TrainConfig

    text = "[data]\nregion = { north = 62.0, south = 31.0, west = 4.0, east = 51.0 }\n"
    config = load_config(_write(tmp_path, text), workdir=tmp_path)
    assert config.search == SearchSpace()  # every [search] default is the field's
    assert config.model == ModelConfig()
    steps = TrainConfig().steps
    assert config.train == TrainConfig(eval_every=steps // 4)  # a quarter of the steps
    assert config.max_forgetting == StudyConfig.__dataclass_fields__["max_forgetting"].default
    assert config.lead_steps == 1 and config.reference and config.max_failures == 5
    assert config.data.source == "era5" and config.data.levels == (500, 700, 850)
    assert config.data.train.start.year == 2022 and config.data.test.end.year == 2025


@pytest.mark.parametrize(
    ("base", "splits", "said"),
    [
        ("small-pretrained", {}, None),
        ("demo", {"train": "2021-01-01"}, None),  # the demo base's pretraining is the demo world's
        (
            "small-pretrained",
            {"train": "2021-01-01"},
            "train from 2021-01-01: inside the small-pretrained base's training period "
            r"\(ERA5 up to 2021\).*not a test of adapt",
        ),
        (
            "small-pretrained",
            {"validation": "2021-01-01", "test": "2021-07-01"},
            "validation from 2021-01-01, test from 2021-07-01: .*validation and test scores are "
            "of data the base has learnt",
        ),
    ],
)
def test_a_split_inside_auroras_pretraining_is_warned_of_by_name(tmp_path, base, splits, said):
    import warnings

    from aurora_sweep.sweep.run import _pretraining_overlap

    text = BASE.replace('base = "demo"', f'base = "{base}"', 1)
    ends = {"train": "2023-12-31", "validation": "2021-06-30", "test": "2021-12-31"}
    for name, start in splits.items():
        line = next(x for x in text.splitlines() if x.startswith(f"{name} = ["))
        text = text.replace(line, f'{name} = ["{start}", "{ends[name]}"]', 1)
    config = load_config(_write(tmp_path, text))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _pretraining_overlap(config) == (said is not None)
    messages = [str(w.message) for w in caught]
    if said is None:
        assert not messages
    else:
        (message,) = messages
        assert re.search(said, message) and "from 2022 on" in message, message
