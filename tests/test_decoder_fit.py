import jax
import jax.numpy as jnp
import numpy as np

from amortize.decoder_fit import make_fit_step, squared_error, targets_from_tables
from amortize.droplets import Background
from amortize.reconstruct import render_table

SHAPE = (48, 48)


def _tables():
    return [
        {"x": np.array([12.0, 30.5, 20.0]), "y": np.array([14.0, 20.0, 36.0]),
         "radius": np.array([6.0, 8.0, 4.5]), "comp_0": np.array([0.9, 0.1, 0.5]),
         "comp_1": np.array([0.1, 0.8, 0.5]), "comp_2": np.array([0.2, 0.3, 0.9])},
        {"x": np.array([24.0]), "y": np.array([22.0]), "radius": np.array([10.0]),
         "comp_0": np.array([0.3]), "comp_1": np.array([0.6]), "comp_2": np.array([0.1])},
    ]


def _backgrounds():
    return [Background(jnp.array([0.6, 0.62, 0.55]), jnp.zeros((3, 5))),
            Background(jnp.array([0.4, 0.45, 0.5]), jnp.zeros((3, 5)))]


def _scene(optics, render_config):
    tables, backgrounds = _tables(), _backgrounds()
    images = np.stack([render_table(t, b, optics, SHAPE, render_config, 3) for t, b in zip(tables, backgrounds)])
    return tables, backgrounds, images


def _perturbed(optics, scale, seed=0):
    leaves, tree = jax.tree_util.tree_flatten(optics)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def test_the_fit_recovers_the_optics_that_drew_the_crops(optics, tiny_render):
    tables, backgrounds, images = _scene(optics, tiny_render)
    targets = targets_from_tables(images, tables, backgrounds, 3, border=4)
    assert targets.droplets.x.shape[0] == 2  # two tables of different lengths stack
    assert float(squared_error(optics, targets, tiny_render)) < 1e-10
    start = _perturbed(optics, 0.3)
    tx, step = make_fit_step(targets, tiny_render, learning_rate=1e-2)
    fitted, opt_state = start, tx.init(start)
    first = None
    for _ in range(60):
        fitted, opt_state, rmse = step(fitted, opt_state)
        first = float(rmse) if first is None else first
    assert np.isfinite(float(rmse)) and first > 0.02
    assert float(rmse) < 0.4 * first


def test_the_border_does_not_count(optics, tiny_render):
    tables, backgrounds, images = _scene(optics, tiny_render)
    spoiled = images.copy()
    spoiled[:, :4] = 0.0
    spoiled[:, :, -4:] = 1.0
    targets = targets_from_tables(spoiled, tables, backgrounds, 3, border=4)
    assert float(squared_error(optics, targets, tiny_render)) < 1e-10
    targets = targets_from_tables(spoiled, tables, backgrounds, 3, border=2)
    assert float(squared_error(optics, targets, tiny_render)) > 1e-3
