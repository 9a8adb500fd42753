import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize.errors import BadArgument
from amortize.looks import LOOKS, look_file, look_params
from amortize.optics import apply_optics, optics_features, sample_optics_inputs
from amortize.train import RunConfig, TrainConfig, _pick_look


@pytest.mark.parametrize("name", sorted(LOOKS))
def test_shipped_look_weights_reproduce_the_analytic_look(name):
    assert look_file(name).exists(), "run python train/fit_looks.py"
    feats = sample_optics_inputs(jax.random.PRNGKey(3), 4096, 3, 3)
    err = apply_optics(look_params(name), feats) - LOOKS[name](feats, 3, 3)
    assert float(jnp.mean(err**2)) < 0.01


def _centre_delta(look_fn):
    feats = optics_features(jnp.full((1, 3), 0.6), jnp.zeros(1), jnp.zeros(1), jnp.full(1, 10.0),
                            jnp.full((1, 3), 0.5))
    return np.asarray(look_fn(feats, 3, 3))[0]


def test_looks_differ_as_described():
    assert np.all(_centre_delta(LOOKS["glow"]) > 0)  # brighter than the background
    assert np.all(_centre_delta(LOOKS["disc"]) < 0)  # absorbing
    # The ring look is darkest at its rim, not in its middle.
    rim = optics_features(jnp.full((1, 3), 0.6), jnp.full(1, 0.86), jnp.zeros(1), jnp.full(1, 10.0),
                          jnp.full((1, 3), 0.5))
    assert np.all(np.asarray(LOOKS["ring"](rim, 3, 3))[0] < _centre_delta(LOOKS["ring"]))


def test_pick_look_mixes_in_the_recipe_looks(optics):
    def run_with(fraction):
        return dataclasses.replace(RunConfig(), train=TrainConfig(looks=("glow",), look_fraction=fraction))

    leaf = lambda p: np.asarray(jax.tree_util.tree_leaves(p)[0])  # noqa: E731
    for i in range(4):
        key = jax.random.PRNGKey(i)
        np.testing.assert_array_equal(leaf(_pick_look(key, optics, run_with(0.0))), leaf(optics))
        np.testing.assert_array_equal(leaf(_pick_look(key, optics, run_with(1.0))),
                                      leaf(look_params("glow")))


def test_unknown_look_is_rejected():
    with pytest.raises(BadArgument, match="looks"):
        TrainConfig(looks=("sparkle",))
    with pytest.raises(BadArgument, match="look_fraction"):
        TrainConfig(looks=("glow",), look_fraction=1.5)


def _delta_at(look, d, background=0.6):
    feats = optics_features(jnp.full((1, 3), background), jnp.full(1, d), jnp.zeros(1), jnp.full(1, 10.0),
                            jnp.full((1, 3), 0.5))
    return float(np.mean(np.asarray(LOOKS[look](feats, 3, 3))[0]))


@pytest.mark.parametrize("look, sign", [("rim", +1), ("outline", -1), ("foam", -1)])
def test_outline_looks_mark_the_radius_with_their_outer_edge(look, sign):
    # Their outline peaks just inside the radius and has fallen to under half of it by 1.05 r:
    # a circle fitted to the outer edge of the rim or dark outline has the droplet's radius.
    ds = np.linspace(0.0, 1.4, 141)
    profile = sign * np.array([_delta_at(look, d) for d in ds])
    peak = ds[np.argmax(profile)]
    assert 0.8 <= peak <= 0.97
    assert profile[ds.searchsorted(1.05)] < 0.5 * profile.max()
    assert profile[ds.searchsorted(peak)] > profile[0]  # the outline, not the middle, stands out


def test_halo_look_is_dark_inside_and_bright_just_outside():
    assert _delta_at("halo", 0.3) < 0 < _delta_at("halo", 1.1)
    assert abs(_delta_at("halo", 1.45)) < 0.2 * _delta_at("halo", 1.1)


def test_halo_fades_outward_unlike_the_rim_which_ends_sharply_at_the_edge():
    # The two looks must not be one profile at different radii: the halo is still bright a
    # quarter radius past its edge, the rim's light is gone a tenth of a radius past its own.
    assert _delta_at("halo", 1.25) > 0.3 * _delta_at("halo", 1.03)
    assert _delta_at("halo", 0.9) < 0
    assert _delta_at("rim", 0.92) > 0
    assert abs(_delta_at("rim", 1.1)) < 0.2 * _delta_at("rim", 0.92)


def test_a_look_first_asked_for_inside_a_jitted_step_is_cached_as_values(optics):
    run = dataclasses.replace(RunConfig(), train=TrainConfig(looks=("rim", "halo"), look_fraction=1.0))
    look_params.cache_clear()
    picked = jax.jit(lambda key: _pick_look(key, optics, run))(jax.random.PRNGKey(0))
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(picked))
    for name in ("rim", "halo"):  # outside the trace the cache gives arrays, not leaked tracers
        leaves = jax.tree_util.tree_leaves(look_params(name))
        assert all(isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) for a in leaves)
