"""The shared LayerNorm: flax's values, gradients and parameter names, on encoder-shaped
features (tests/test_optics.py checks it inside the optics MLP)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amortize.layers import LayerNorm


def test_layer_norm_is_flaxs_on_feature_maps():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 8))
    ours, flax = LayerNorm(), nn.LayerNorm()
    params = flax.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree_util.tree_structure(params)
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jnp.arange(a.size, dtype=a.dtype).reshape(a.shape), params)
    np.testing.assert_allclose(ours.apply(params, x), flax.apply(params, x), atol=1e-5)

    def loss(layer):
        return lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)) * jnp.arange(8.0))

    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(flax), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
