import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize.encoder import (
    ALIGN, OFFSET_REACH, STRIDE, EncoderConfig, cell_centres, encode, init_encoder,
    pad_to_align, standardise,
)
from amortize.errors import BadArgument


@pytest.fixture(scope="module")
def tiny():
    cfg = EncoderConfig.tiny()
    return cfg, init_encoder(jax.random.PRNGKey(0), cfg)


@pytest.mark.parametrize("h, w", [(32, 32), (50, 70), (64, 96)])
def test_output_grid_covers_padded_image(tiny, h, w):
    cfg, params = tiny
    image = jax.random.uniform(jax.random.PRNGKey(1), (2, h, w, 3))
    out = encode(params, cfg, image)
    hc, wc = -(-h // ALIGN) * ALIGN // STRIDE, -(-w // ALIGN) * ALIGN // STRIDE
    assert out.logit.shape == (2, hc, wc)
    assert out.offset.shape == (2, hc, wc, 2)
    assert out.composition.shape == (2, hc, wc, cfg.n_types)
    assert out.background.shape == (2, hc, wc, 3)


def test_heads_are_bounded_and_positive(tiny):
    cfg, params = tiny
    # Big random weights push every head to its limits.
    wild = jax.tree_util.tree_map(lambda a: a * 50.0, params)
    out = encode(wild, cfg, jax.random.uniform(jax.random.PRNGKey(2), (1, 64, 64, 3)))
    assert np.all(np.abs(out.offset) <= OFFSET_REACH * STRIDE + 1e-5)
    for scale in (out.offset_scale, out.log_radius_scale, out.composition_scale):
        assert np.all(scale > 0) and np.all(np.isfinite(scale))
    assert np.all((out.composition >= 0) & (out.composition <= 1))


def test_standardise_is_brightness_and_contrast_invariant():
    image = jax.random.uniform(jax.random.PRNGKey(3), (40, 40, 3)) * 0.5
    z1, stats1 = standardise(image)
    z2, _ = standardise(0.2 + 1.0 * image)
    np.testing.assert_allclose(z1, z2, atol=1e-4)
    assert stats1.shape == (2, 3)


def test_pad_to_align():
    assert pad_to_align(jnp.ones((1, 33, 65, 3))).shape == (1, 64, 96, 3)
    assert pad_to_align(jnp.ones((32, 32, 3))).shape == (32, 32, 3)


def test_cell_centres_follow_pixel_convention():
    xx, yy = cell_centres((2, 3))
    # Cell (0, 0) covers pixels 0..3; its centre is 1.5.
    assert float(xx[0, 0]) == 1.5 and float(yy[0, 0]) == 1.5
    assert float(xx[0, 2]) == 1.5 + 2 * STRIDE


def test_translation_by_a_cell_moves_outputs(tiny):
    """Shifting by 32 px (one deepest-level cell) shifts every interior output exactly."""
    cfg, params = tiny
    image = jax.random.uniform(jax.random.PRNGKey(4), (1, 512, 512, 3))
    shifted = jnp.roll(image, 32, axis=2)
    a = encode(params, cfg, image).logit[0]
    b = encode(params, cfg, shifted).logit[0]
    # The standardisation sees the same pixels; compare far from the wrap-around seam.
    np.testing.assert_allclose(a[:, 40:80], b[:, 48:88], atol=1e-4)


def test_gradients_are_finite(tiny):
    cfg, params = tiny
    image = jax.random.uniform(jax.random.PRNGKey(5), (1, 64, 64, 3))
    grads = jax.grad(lambda p: jnp.sum(encode(p, cfg, image).logit))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_bad_config():
    with pytest.raises(BadArgument, match="widths"):
        EncoderConfig(widths=(8, 8, 8))
