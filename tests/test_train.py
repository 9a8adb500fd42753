import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize import train as train_mod
from amortize.checkpoint import load_model
from amortize.errors import BadArgument, BadInput
from amortize.optics import default_optics_params
from amortize.train import NonFinite, RunConfig, init_state, load_recipe, make_train_step, train
from amortize.writers import NullWriter

RECIPES = pathlib.Path(__file__).resolve().parents[1] / "train"


class RecordingWriter(NullWriter):
    def __init__(self):
        self.scalar_names, self.images, self.histograms = set(), [], []

    def scalars(self, values, step):
        self.scalar_names.update(values)

    def image(self, name, image, step):
        self.images.append((name, np.asarray(image).shape))

    def histogram(self, name, values, step):
        self.histograms.append(name)


def test_recipes_parse():
    tiny = load_recipe(RECIPES / "tiny.toml")
    assert tiny.train.crop == (64, 64) and tiny.encoder.widths == (4, 8, 8, 8, 8)
    default = load_recipe(RECIPES / "default.toml")
    assert default.simulation.scene.radius_max >= 40
    assert not default.encoder.log_odds_input  # the shipped default reads intensity only
    log_odds = load_recipe(RECIPES / "logodds.toml")
    assert log_odds.encoder.log_odds_input
    # The log-odds recipe is the default one plus that switch, nothing else.
    assert log_odds == dataclasses.replace(
        default, encoder=dataclasses.replace(default.encoder, log_odds_input=True))


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    with pytest.raises(BadInput, match="stepz"):
        load_recipe(bad)
    bad.write_text("[train\n")
    with pytest.raises(BadInput, match="TOML"):
        load_recipe(bad)
    bad.write_text("[train]\ncrop = [50, 64]\n")
    with pytest.raises(BadInput, match="multiples of 32"):
        load_recipe(bad)
    with pytest.raises(BadInput, match="not found"):
        load_recipe(tmp_path / "nope.toml")


def test_step_is_finite_and_reports_grad_norm():
    run = RunConfig.tiny()
    step = make_train_step(run, default_optics_params())
    state, metrics = step(init_state(run), jax.random.PRNGKey(0))
    assert int(state["step"]) == 1
    for name in ("loss", "count", "mixture", "background", "grad_norm", "learning_rate"):
        assert np.isfinite(float(metrics[name])), name
    assert float(metrics["grad_norm"]) > 0


def test_blur_and_shading_jitter_vary_anchored_scenes_and_refuse_free_optics():
    base = RunConfig.tiny()
    run = dataclasses.replace(base, train=dataclasses.replace(base.train, blur_jitter=0.7, shading_jitter=0.2))
    anchored = default_optics_params(anchored=True)
    key = jax.random.PRNGKey(3)
    plain, truth, _ = train_mod.simulate_batch(key, base, anchored)
    jittered, truth_j, _ = jax.jit(lambda k: train_mod.simulate_batch(k, run, anchored))(key)
    assert np.all(np.isfinite(np.asarray(jittered)))
    # The same scenes (droplets), drawn with another edge blur and shading.
    np.testing.assert_array_equal(np.asarray(truth.x), np.asarray(truth_j.x))
    assert float(jnp.abs(jittered - plain).max()) > 1e-3
    with pytest.raises(BadArgument, match="anchored optics"):
        train_mod.simulate_batch(key, run, default_optics_params())


def test_train_resume_and_logs(tmp_path):
    run = RunConfig.tiny()
    writer = RecordingWriter()
    # "Crash" after 3 of 4 steps: a checkpoint at step 3 is kept.
    train(run, tmp_path, writer=writer, progress=False, stop_after=3)
    assert load_model(tmp_path)[2] == 3
    assert {"train/loss", "train/grad_norm", "train/learning_rate"} <= writer.scalar_names
    assert writer.images and writer.images[0][1] == (64, 64, 3)
    assert "radius/predicted" in writer.histograms
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["steps"] == 4
    # Resuming runs only the remaining step, from the same state.
    metrics = train(run, tmp_path, writer=NullWriter(), progress=False)
    assert metrics["step"] == 4
    params, config, step = load_model(tmp_path)
    assert step == 4 and config == saved


def test_a_finished_run_started_again_neither_steps_nor_simulates(tmp_path, monkeypatch):
    run = RunConfig.tiny()
    train(run, tmp_path, writer=NullWriter(), progress=False)

    def never(*args, **kwargs):
        raise AssertionError("a finished run simulated a scene")

    monkeypatch.setattr(train_mod, "simulate_scene", never)
    monkeypatch.setattr(train_mod, "simulate_batch", never)
    assert train(run, tmp_path, writer=NullWriter(), progress=False)["step"] == run.train.steps


def test_resume_is_reproducible(tmp_path):
    run = RunConfig.tiny()
    train(run, tmp_path / "a", writer=NullWriter(), progress=False)
    train(run, tmp_path / "b", writer=NullWriter(), progress=False, stop_after=1)
    train(run, tmp_path / "b", writer=NullWriter(), progress=False)
    pa, pb = load_model(tmp_path / "a")[0], load_model(tmp_path / "b")[0]
    for a, b in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_workdir_of_another_recipe_is_refused(tmp_path):
    run = RunConfig.tiny()
    train(run, tmp_path, writer=NullWriter(), progress=False, stop_after=1)
    other = RunConfig(run.simulation, run.encoder, train_mod.TrainConfig(crop=(64, 64), steps=9))
    with pytest.raises(BadArgument, match="different config"):
        train(other, tmp_path, writer=NullWriter(), progress=False)


def test_non_finite_stops_loudly(tmp_path, monkeypatch):
    real = train_mod.make_train_step

    def poisoned(run, optics):
        step = real(run, optics)

        def wrapped(state, key):
            state, metrics = step(state, key)
            return state, {**metrics, "loss": metrics["loss"] * np.nan}

        return wrapped

    monkeypatch.setattr(train_mod, "make_train_step", poisoned)
    with pytest.raises(NonFinite, match="non-finite loss at step 1"):
        train(RunConfig.tiny(), tmp_path, writer=NullWriter(), progress=False)


def test_the_flat_optimiser_is_the_same_arithmetic():
    # make_optimizer runs Adam on one flat vector (a smaller program); its updates must be
    # those of the same optimiser on the encoder's tree of arrays.
    import optax

    from amortize.train import make_optimizer

    run = RunConfig.tiny()
    params = init_state(run)["params"]
    flat, schedule = make_optimizer(run.train)
    tree = optax.chain(optax.clip_by_global_norm(run.train.grad_clip),
                       optax.adamw(schedule, weight_decay=run.train.weight_decay))
    grads = jax.tree_util.tree_map(lambda a: jnp.cos(a) + 0.5, params)
    s_flat, s_tree = jax.jit(flat.init)(params), jax.jit(tree.init)(params)
    # Jitted: op by op, each of the optimisers' operations on each leaf is a program to compile.
    flat_update, tree_update = jax.jit(flat.update), jax.jit(tree.update)
    for _ in range(3):
        u_flat, s_flat = flat_update(grads, s_flat, params)
        u_tree, s_tree = tree_update(grads, s_tree, params)
        for a, b in zip(jax.tree_util.tree_leaves(u_flat), jax.tree_util.tree_leaves(u_tree)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_init_starts_from_a_models_encoder_and_refuses_another_architecture(tmp_path):
    from amortize.checkpoint import save_model
    from amortize.config import to_dict
    from amortize.encoder import init_encoder

    run = RunConfig.tiny()
    trained = init_encoder(jax.random.PRNGKey(42), run.encoder)
    save_model(tmp_path / "m", trained, to_dict(run), step=5)
    tuned = dataclasses.replace(run, train=dataclasses.replace(run.train, init=str(tmp_path / "m")))
    start = init_state(tuned)["params"]
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), start, trained)
    assert all(jax.tree_util.tree_leaves(same))
    fresh = init_state(run)["params"]  # the seed's own random weights differ
    assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)), fresh, trained)))
    wider = dataclasses.replace(run.encoder, widths=tuple(2 * w for w in run.encoder.widths))
    other = dataclasses.replace(tuned, encoder=wider)
    with pytest.raises(BadInput, match="not the recipe's \\[encoder\\] architecture"):
        init_state(other)
