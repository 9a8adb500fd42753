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
