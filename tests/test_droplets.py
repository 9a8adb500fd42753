"""The background's smooth correction field: bilinear between its knots, nothing when zero,
and differentiable."""

import jax
import jax.numpy as jnp
import numpy as np

from amortize.droplets import Background, background_logits, field_at, tent_matrix

COLOUR = jnp.asarray([0.6, 0.65, 0.55])


def test_the_field_interpolates_its_knots_bilinearly():
    knots = jnp.asarray([[[0.0, 1.0], [2.0, 3.0]]])  # one channel, 2 x 2 knots
    f = np.asarray(field_at(knots, (5, 9)))[..., 0]
    assert f.shape == (5, 9)
    np.testing.assert_allclose([f[0, 0], f[0, -1], f[-1, 0], f[-1, -1]], [0, 1, 2, 3], atol=1e-6)
    np.testing.assert_allclose(f[2, 4], 1.5, atol=1e-6)  # the centre: the knots' mean
    np.testing.assert_allclose(f[0], np.linspace(0, 1, 9), atol=1e-6)  # linear along an edge
    np.testing.assert_allclose(f[:, 0], np.linspace(0, 2, 5), atol=1e-6)


def test_tent_weights_sum_to_one_and_hit_every_knot():
    m = tent_matrix(4, 31)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    assert np.all(m.max(0) == 1.0)  # every knot sits on a pixel: 30 px / 3 intervals
    np.testing.assert_allclose(tent_matrix(3, 1), [[0.0, 1.0, 0.0]])  # one pixel: the middle knot


def test_a_zero_field_changes_nothing_and_a_constant_one_shifts_every_logit():
    bg = Background(COLOUR, jnp.full((3, 5), 0.1))
    base = background_logits(bg, (7, 6))
    zero = background_logits(bg.replace(field=jnp.zeros((3, 3, 4))), (7, 6))
    np.testing.assert_allclose(zero, base, atol=1e-6)
    shifted = background_logits(bg.replace(field=jnp.full((3, 3, 4), 0.25)), (7, 6))
    np.testing.assert_allclose(shifted - base, 0.25, atol=1e-6)


def test_the_field_gets_a_finite_gradient_at_every_knot():
    def loss(field):
        return jnp.sum(jax.nn.sigmoid(background_logits(Background(COLOUR, jnp.zeros((3, 5)), field), (9, 11))))

    g = np.asarray(jax.jit(jax.grad(loss))(jnp.zeros((3, 3, 4))))
    assert np.all(np.isfinite(g)) and np.all(g > 0)
