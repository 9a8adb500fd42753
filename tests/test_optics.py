import jax
import jax.numpy as jnp
import numpy as np

from amortize.optics import (
    HIDDEN,
    apply_optics,
    default_optics_params,
    fit_optics,
    init_optics,
    lens_droplet,
    module_for,
    n_types_of,
    sample_optics_inputs,
)


def test_parameter_count_matches_original_notebooks(optics):
    n = sum(leaf.size for leaf in jax.tree_util.tree_leaves(optics))
    assert 1000 < n < 1500  # "about 1.3k"
    assert module_for(optics).hidden == HIDDEN
    assert n_types_of(optics) == 3


def test_shipped_default_fits_the_analytic_droplet(optics):
    feats = sample_optics_inputs(jax.random.PRNGKey(123), 8192, 3, 3)
    target = lens_droplet(feats, 3, 3)
    mse = float(jnp.mean((apply_optics(optics, feats) - target) ** 2))
    assert mse < 0.05 * float(jnp.var(target))


def test_analytic_droplet_looks_like_a_lens():
    def delta(u, v, comp):
        f = jnp.asarray([0.6, 0.6, 0.6, u, v, np.log(8.0), *comp])
        return np.asarray(lens_droplet(f, 3, 3))

    blue = (1.0, 0.0, 0.0)
    centre, caustic, far = delta(0, 0, blue), delta(0, 0.72, blue), delta(0, -1.4, blue)
    assert centre.sum() < -0.5  # the dye darkens the body
    assert centre[2] > centre[0]  # a blue droplet passes blue light
    assert caustic[:2].mean() > centre[:2].mean() + 0.5  # bright lower caustic
    assert np.abs(far).max() < 0.05  # nothing far above the droplet


def test_fit_lowers_the_loss_quickly():
    target = lambda f: lens_droplet(f, 2, 3)  # noqa: E731
    _, mse_short = fit_optics(target, n_types=2, channels=3, steps=5, batch=256)
    _, mse_long = fit_optics(target, n_types=2, channels=3, steps=150, batch=256)
    assert np.isfinite(mse_long) and mse_long < mse_short


def test_other_channel_and_type_counts_build():
    params = init_optics(jax.random.PRNGKey(0), channels=1, n_types=2)
    out = apply_optics(params, jnp.zeros((5, 1 + 3 + 2)))
    assert out.shape == (5, 1)
    assert n_types_of(params) == 2


def test_default_params_are_cached(optics):
    assert default_optics_params(3, 3) is optics


def test_coarser_grid_draws_a_droplet_k_times_larger(optics):
    from amortize.optics import coarser_grid, optics_features

    rng = np.random.default_rng(0)
    n = 64
    colour = jnp.asarray(rng.uniform(0.3, 0.9, (n, 3)), jnp.float32)
    dx, dy = (jnp.asarray(rng.uniform(-1.2, 1.2, n), jnp.float32) for _ in range(2))
    radius = jnp.asarray(rng.uniform(1.0, 10.0, n), jnp.float32)
    comp = jnp.asarray(rng.uniform(0, 1, (n, 3)), jnp.float32)
    here = apply_optics(optics, optics_features(colour, dx, dy, 4.0 * radius, comp))
    there = apply_optics(coarser_grid(optics, 4.0), optics_features(colour, dx, dy, radius, comp))
    np.testing.assert_allclose(there, here, atol=1e-5)
    assert coarser_grid(optics, 1) is optics
    # The same tree (so a fine-tuned look still gets gradients through it).
    assert jax.tree_util.tree_structure(coarser_grid(optics, 2.0)) == jax.tree_util.tree_structure(optics)


def test_optics_layer_norm_is_flaxs_with_its_gradients(optics):
    # Our LayerNorm has a hand-derived backward pass; the MLP's values and gradients (to the
    # inputs and to every weight) must be those of the same MLP built with flax's LayerNorm.
    import flax.linen as nn

    class FlaxOpticsMLP(nn.Module):
        @nn.compact
        def __call__(self, h):
            for width in HIDDEN:
                h = nn.relu(nn.LayerNorm()(nn.Dense(width)(h)))
            return nn.Dense(3)(h)

    feats = sample_optics_inputs(jax.random.PRNGKey(7), 256, 3, 3)
    reference = FlaxOpticsMLP().apply
    np.testing.assert_allclose(apply_optics(optics, feats), reference(optics, feats), atol=1e-5)

    def loss(apply):
        return lambda p, x: jnp.sum(jnp.sin(apply(p, x)))

    ours = jax.jit(jax.grad(loss(apply_optics), argnums=(0, 1)))(optics, feats)
    flax = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(optics, feats)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(flax)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3)
