import math

import pytest

from amortize.config import (
    RenderConfig,
    SceneConfig,
    SimulationConfig,
    from_dict,
    to_dict,
)
from amortize.errors import BadArgument


def test_round_trip_through_dict():
    config = SimulationConfig.tiny()
    assert from_dict(SimulationConfig, to_dict(config)) == config


def test_unknown_field_is_rejected():
    with pytest.raises(BadArgument, match="unknown field"):
        from_dict(SceneConfig, {"densty": 3.0})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"radius_min": 5.0, "radius_max": 2.0},
        {"density": 0.0},
        {"noise_min": 0.1, "noise_max": 0.01},
        {"channels": 2},
    ],
)
def test_bad_scene_values_name_the_field(kwargs):
    with pytest.raises(BadArgument):
        SceneConfig(**kwargs)


def test_radius_beyond_renderer_reach_is_rejected():
    with pytest.raises(BadArgument, match="largest radius"):
        SimulationConfig(scene=SceneConfig(radius_max=100.0), render=RenderConfig())


def test_log_radius_prior_spans_range():
    mean, sd = SceneConfig(radius_min=2.0, radius_max=32.0).log_radius_prior
    assert mean == pytest.approx(math.log(8.0))  # geometric centre of [2, 32]
    assert sd == pytest.approx(math.log(16.0) / 4)  # the range spans +-2 sd


def test_slots_cover_expected_count():
    scene = SceneConfig(density=10.0)
    assert scene.n_slots((100, 100)) > scene.expected_count((100, 100))


# ---------------------------------------------------------------------------------------
# Types and ranges of every recipe table, checked before anything is written (issue 34).

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from amortize.config import BadRecipe, NuisanceConfig, RefineConfig, check_types  # noqa: E402
from amortize.errors import BadInput  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "train"


@pytest.mark.parametrize(
    "data, words",
    [
        ({"scene": {"density": "30"}}, '[simulation.scene] density must be a number, got "30"'),
        ({"scene": {"channels": 3.0}}, "[simulation.scene] channels must be an integer, got 3.0"),
        ({"scene": {"n_types": True}}, "[simulation.scene] n_types must be an integer, got true"),
        ({"scene": {"composition_concentration": [1.0]}}, "composition_concentration must be a list of 2"),
        ({"scene": {"composition_concentration": [1.0, "2"]}}, "composition_concentration must be a list of 2"),
        ({"scene": {"radius_log_sd": "0.5"}}, "[simulation.scene] radius_log_sd must be a number"),
        ({"scene": {"noise_max": float("inf")}}, "noise_max must be a finite number, got inf"),
        ({"scene": {"slot_margin": -1.0}}, "[simulation.scene] slot_margin must be >= 0"),
        ({"scene": 3}, "[simulation] scene must be a table, got 3"),
        ({"render": {"tile": 4.0}}, "[simulation.render] tile must be an integer, got 4.0"),
        ({"nuisance": {"quantize": 1}}, "[simulation.nuisance] quantize must be true or false, got 1"),
        ({"nuisance": {"jpeg_probability": 2.0}}, "[simulation.nuisance] jpeg_probability must be in [0, 1]"),
        ({"render": {"tiel": 4}}, "[simulation.render] unknown field(s): tiel"),
    ],
)
def test_from_dict_checks_every_simulation_field(data, words):
    with pytest.raises(BadArgument) as err:
        from_dict(SimulationConfig, data, "simulation")
    assert words in f"{err.value.subject} {err.value.reason}"


def test_from_dict_accepts_what_the_types_allow():
    scene = from_dict(SceneConfig, {"density": 30, "radius_log_mean": None, "composition_concentration": [2, 3]})
    assert scene.density == 30.0 and isinstance(scene.density, float)
    assert scene.composition_concentration == (2.0, 3.0) and scene.radius_log_mean is None
    assert from_dict(NuisanceConfig, {"quantize": False}).quantize is False


@pytest.mark.parametrize(
    "table, field, value, words",
    [
        ("train", "weight_decay", '"1e-4"', 'weight_decay must be a number, got "1e-4"'),
        ("train", "steps", "4.5", "steps must be an integer, got 4.5"),
        ("train", "batch_size", "2.0", "batch_size must be an integer, got 2.0"),
        ("train", "crop", "[64]", "crop must be a list of 2 integers, got [64]"),
        ("train", "looks", '"ring"', 'looks must be a list of strings, got "ring"'),
        ("train", "weight_decay", "-1.0", "weight_decay must be >= 0"),
        ("train", "seed", "-1", "seed must be >= 0"),
        ("encoder", "head_width", '"8"', 'head_width must be an integer, got "8"'),
        ("encoder", "log_odds_input", "1", "log_odds_input must be true or false, got 1"),
        ("readout", "hidden", "[8.5]", "hidden must be a list of integers, got [8.5]"),
        ("readout", "holdout", "true", "holdout must be a number, got true"),
    ],
)
def test_training_recipe_fields_are_checked(tmp_path, table, field, value, words):
    from amortize.train import load_recipe

    recipe = tmp_path / "bad.toml"
    recipe.write_text(_with(RECIPES / "tiny.toml", table, field, value))
    with pytest.raises(BadRecipe) as err:
        load_recipe(recipe)
    assert isinstance(err.value, BadArgument) and isinstance(err.value, BadInput)
    assert str(err.value) == f"{recipe}: [{table}] {words}" or f"[{table}] {words}" in str(err.value)
    assert "\n" not in str(err.value)


def _with(recipe: Path, table: str, field: str, value: str) -> str:
    """The recipe's text with `field = value` set in its `[table]` (added if absent)."""
    lines = recipe.read_text().splitlines()
    header = f"[{table}]"
    if header not in lines:
        return "\n".join(lines + ["", header, f"{field} = {value}", ""])
    out, inside = [], False
    for line in lines:
        if line.startswith("["):
            if inside:
                out.append(f"{field} = {value}")
            inside = line.strip() == header
        if not (inside and line.split("=")[0].strip() == field):
            out.append(line)
    if inside:
        out.append(f"{field} = {value}")
    return "\n".join(out) + "\n"


def test_the_tiny_recipes_parse_after_the_edit_helper(tmp_path):
    from amortize.train import load_recipe

    recipe = tmp_path / "ok.toml"
    recipe.write_text(_with(RECIPES / "tiny.toml", "train", "steps", "7"))
    assert load_recipe(recipe).train.steps == 7


def test_refine_config_checks_types():
    for kwargs in ({"steps": 1.5}, {"learning_rate": "0.1"}, {"freeze_optics": 1}, {"fit_stop": 3},
                   {"samples": True}, {"tol": float("nan")}):
        with pytest.raises(BadArgument, match=next(iter(kwargs))):
            RefineConfig(**kwargs)
    assert RefineConfig(field_spacing=32, steps=10).field_spacing == 32  # ints in float fields


def test_a_config_built_in_code_is_checked_before_the_workdir_is_made(tmp_path):
    import dataclasses

    from amortize.train import RunConfig, train

    run = RunConfig.tiny()
    bad = dataclasses.replace(run, train=dataclasses.replace(run.train, batch_size=2.0))
    with pytest.raises(BadArgument, match=r"\[train\] batch_size: must be an integer, got 2.0"):
        check_types(bad)
    with pytest.raises(BadArgument, match="batch_size"):
        train(bad, tmp_path / "work", progress=False)
    assert not (tmp_path / "work").exists()


def test_a_config_json_without_a_checkpoint_does_not_block_the_corrected_recipe(tmp_path):
    import dataclasses

    from amortize.train import RunConfig, prepare_workdir

    run = RunConfig.tiny()
    other = dataclasses.replace(run, train=dataclasses.replace(run.train, steps=9))
    work = tmp_path / "work"
    prepare_workdir(work, other)  # a run that failed before its first checkpoint
    prepare_workdir(work, run)
    assert json.loads((work / "config.json").read_text())["train"]["steps"] == run.train.steps
    (work / "config.json").write_text("{not json")
    prepare_workdir(work, run)
    assert json.loads((work / "config.json").read_text())["train"]["steps"] == run.train.steps
    # Once a step is saved, the workdir holds that run.
    (work / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(BadArgument, match="different config"):
        prepare_workdir(work, other)


def _cli(args, capsys):
    from amortize.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


TRAIN_CASES = [
    ("train", "weight_decay", '"1e-4"'),
    ("train", "steps", "4.5"),
    ("train", "batch_size", "2.0"),
    ("simulation.scene", "density", '"30"'),
    ("simulation.render", "levels", "3.0"),
    ("simulation.nuisance", "quantize", '"yes"'),
    ("encoder", "head_depth", "1.0"),
    ("readout", "scenes", "4.0"),
]


@pytest.mark.parametrize("table, field, value", TRAIN_CASES)
@pytest.mark.parametrize("existing", [False, True])
def test_cli_train_bad_field_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, table, field, value,
                                                                   existing):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(_with(RECIPES / "tiny.toml", table, field, value))
    work = tmp_path / "work"
    if existing:
        work.mkdir()
    code, err = _cli(["train", "--config", recipe, "--workdir", work, "--quiet"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("amortize train: error: ")
    assert f"[{table}] {field} must be" in err[0] and str(recipe) in err[0]
    assert (list(work.iterdir()) == []) if existing else not work.exists()


ADAPT_CASES = [
    ("adapt", "cycles", "1.5"),
    ("adapt", "seed", "-1"),
    ("wake", "crop", "[64]"),
    ("wake", "augmentation", "3"),
    ("wake", "border", "4.0"),
    ("train", "batch_size", "2.0"),
    ("simulation.scene", "density", '"30"'),
]


@pytest.mark.parametrize("table, field, value", ADAPT_CASES)
def test_cli_adapt_bad_field_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, tiny_model_dir, table,
                                                                   field, value):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(_with(RECIPES / "adapt_tiny.toml", table, field, value))
    work, data = tmp_path / "work", tmp_path / "data"
    data.mkdir()  # no images: were the recipe accepted, the corpus would fail (exit 1)
    code, err = _cli(["train", "--config", recipe, "--data", data, "--init", tiny_model_dir,
                      "--workdir", work, "--quiet"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("amortize train: error: ")
    assert f"[{table}] {field} must be" in err[0] and str(recipe) in err[0]
    assert not work.exists()


@pytest.mark.parametrize(
    "text, words",
    [
        ('[simulation.scene]\ndensity = "30"\n', '[simulation.scene] density must be a number, got "30"'),
        ('[scene]\ndensity = "30"\n', '[scene] density must be a number, got "30"'),
        ("[simulation.render]\ntile = 4.5\n", "[simulation.render] tile must be an integer, got 4.5"),
        ("[simulation.nuisance]\nblur_sigma_max = false\n", "[simulation.nuisance] blur_sigma_max must be a number"),
        ("[simulation]\nscene = 1\n", "[simulation] scene must be a table, got 1"),
    ],
)
def test_cli_simulate_config_bad_field_is_one_line_exit_2(tmp_path, capsys, text, words):
    config = tmp_path / "sim.toml"
    config.write_text(text)
    out = tmp_path / "out"
    code, err = _cli(["simulate", "--out", out, "--n", "1", "--size", "24", "24", "--config", config], capsys)
    assert code == 2
    assert len(err) == 1 and err[0] == f"amortize simulate: error: {config}: {words}" or words in err[0]
    assert len(err) == 1 and err[0].startswith("amortize simulate: error: ")
    assert not out.exists()


@pytest.mark.parametrize(
    "verb, recipe, table, field, value",
    [
        ("train", "tiny.toml", "train", "weight_decay", '"1e-4"'),
        ("adapt", "adapt_tiny.toml", "wake", "batch_size", "2.0"),
        ("simulate", None, "simulation.scene", "density", '"30"'),
    ],
)
def test_console_script_reports_a_bad_recipe_in_one_line(tmp_path, tiny_model_dir, verb, recipe, table, field,
                                                         value):
    config = tmp_path / "bad.toml"
    config.write_text(_with(RECIPES / recipe, table, field, value) if recipe else f"[{table}]\n{field} = {value}\n")
    work = tmp_path / "work"
    args = {"train": ["train", "--config", config, "--workdir", work],
            "adapt": ["train", "--config", config, "--data", tmp_path, "--init", tiny_model_dir,
                      "--workdir", work],
            "simulate": ["simulate", "--config", config, "--out", work, "--n", "1", "--size", "24", "24"]}[verb]
    res = subprocess.run([sys.executable, "-m", "amortize.cli", *map(str, args)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    name = "simulate" if verb == "simulate" else "train"
    assert lines[0].startswith(f"amortize {name}: error: {config}: [{table}] {field} must be"), lines[0]
    assert not work.exists()


def test_saved_configs_of_earlier_versions_still_load():
    # Earlier versions accepted 200.0 for an integer field, and saved it so.
    from amortize.config import from_saved, to_dict
    from amortize.train import RunConfig

    saved = to_dict(RunConfig.tiny())
    saved["train"]["checkpoint_every"] = float(saved["train"]["checkpoint_every"])
    saved["simulation"]["scene"]["n_types"] = float(saved["simulation"]["scene"]["n_types"])
    run = from_saved(RunConfig, saved)
    assert run == RunConfig.tiny() and type(run.train.checkpoint_every) is int
    saved["train"]["steps"] = 4.5  # not a whole number: still an error
    with pytest.raises(BadArgument, match="steps"):
        from_saved(RunConfig, saved)
