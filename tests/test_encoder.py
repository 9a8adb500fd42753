import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize import encoder
from amortize.encoder import (
    ALIGN, LOG_ODDS_EPS, OFFSET_REACH, EncoderConfig, cell_centres, init_encoder,
    input_features, pad_to_align, standardise, unmirror_raw,
)
from amortize.errors import BadArgument

# Jitted, as every caller runs it: op by op the encoder compiled about a hundred one-operation
# programs per test and image shape.
encode = jax.jit(encoder.encode, static_argnums=1)


@pytest.fixture(scope="module", params=[(4, False), (2, False), (4, True)],
                ids=["stride4", "stride2", "log-odds"])
def tiny(request):
    stride, log_odds = request.param
    cfg = dataclasses.replace(EncoderConfig.tiny(), stride=stride, log_odds_input=log_odds)
    return cfg, init_encoder(jax.random.PRNGKey(0), cfg)


@pytest.mark.parametrize("h, w", [(32, 32), (50, 70), (64, 96)])
def test_output_grid_covers_padded_image(tiny, h, w):
    cfg, params = tiny
    image = jax.random.uniform(jax.random.PRNGKey(1), (2, h, w, 3))
    out = encode(params, cfg, image)
    s = cfg.stride
    hc, wc = -(-h // ALIGN) * ALIGN // s, -(-w // ALIGN) * ALIGN // s
    assert out.stride == s
    assert out.logit.shape == (2, hc, wc)
    assert out.offset.shape == (2, hc, wc, 2)
    assert out.composition.shape == (2, hc, wc, cfg.n_types)
    assert out.background.shape == (2, hc, wc, 3)


def test_heads_are_bounded_and_positive(tiny):
    cfg, params = tiny
    # Big random weights push every head to its limits.
    wild = jax.tree_util.tree_map(lambda a: a * 50.0, params)
    out = encode(wild, cfg, jax.random.uniform(jax.random.PRNGKey(2), (1, 64, 64, 3)))
    assert np.all(np.abs(out.offset) <= OFFSET_REACH * cfg.stride + 1e-5)
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
    xx, yy = cell_centres((2, 3), 4)
    # Cell (0, 0) covers pixels 0..3; its centre is 1.5.
    assert float(xx[0, 0]) == 1.5 and float(yy[0, 0]) == 1.5
    assert float(xx[0, 2]) == 1.5 + 2 * 4
    # At stride 2 it covers pixels 0..1.
    xx, yy = cell_centres((2, 3), 2)
    assert float(xx[0, 0]) == 0.5 and float(yy[1, 0]) == 2.5


def test_translation_by_a_cell_moves_outputs(tiny):
    """Shifting by 32 px (one deepest-level cell) shifts every interior output exactly."""
    cfg, params = tiny
    image = jax.random.uniform(jax.random.PRNGKey(4), (1, 512, 512, 3))
    shifted = jnp.roll(image, 32, axis=2)
    a = encode(params, cfg, image).logit[0]
    b = encode(params, cfg, shifted).logit[0]
    # The standardisation sees the same pixels; compare far from the wrap-around seam.
    lo, hi, shift = 160 // cfg.stride, 320 // cfg.stride, 32 // cfg.stride
    np.testing.assert_allclose(a[:, lo:hi], b[:, lo + shift : hi + shift], atol=1e-4)


def test_gradients_are_finite(tiny):
    cfg, params = tiny
    image = jax.random.uniform(jax.random.PRNGKey(5), (1, 64, 64, 3))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(encode(p, cfg, image).logit)))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_bad_config():
    with pytest.raises(BadArgument, match="widths"):
        EncoderConfig(widths=(8, 8, 8))
    with pytest.raises(BadArgument, match="stride"):
        EncoderConfig(stride=8)


def test_depth_to_space_puts_channel_blocks_on_sub_cells():
    from amortize.encoder import _depth_to_space

    n = 2
    x = jnp.arange(2 * 3 * 4 * 4 * n, dtype=jnp.float32).reshape(2, 3, 4, 4 * n)
    y = _depth_to_space(x, n)
    assert y.shape == (2, 6, 8, n)
    # Sub-cell (a, b) of cell (i, j) is pixel (2 i + a, 2 j + b), fed by block 2 a + b.
    for a in range(2):
        for b in range(2):
            np.testing.assert_array_equal(y[1, 2 * 2 + a, 2 * 3 + b], x[1, 2, 3, (2 * a + b) * n : (2 * a + b + 1) * n])


def test_input_features_add_finite_log_odds_only_when_asked():
    image = jnp.asarray([[[0.0, 0.5, 1.0], [0.25, 0.75, 0.5]]], jnp.float32)
    plain = EncoderConfig.tiny()
    assert input_features(image, plain) is image
    cfg = dataclasses.replace(plain, log_odds_input=True)
    assert cfg.input_channels == 6
    both = np.asarray(input_features(image, cfg))
    assert both.dtype == np.float32 and both.shape == (1, 2, 6)
    np.testing.assert_array_equal(both[..., :3], image)
    edge = np.log((1 - LOG_ODDS_EPS) / LOG_ODDS_EPS)
    np.testing.assert_allclose(both[0, 0, 3:], [-edge, 0.0, edge], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[0, 1, 3:], [-np.log(3), np.log(3), 0.0], rtol=1e-5, atol=1e-6)


def test_unmirror_raw_maps_a_mirrored_grid_back():
    raw = np.random.default_rng(0).normal(size=(2, 3, 4, 16)).astype(np.float32)
    back = unmirror_raw(raw[..., ::-1, :])  # a grid that already is a mirror image
    np.testing.assert_array_equal(back[..., 0], raw[..., 0])
    np.testing.assert_array_equal(back[..., 1], -raw[..., 1])  # x offset flips sign
    np.testing.assert_array_equal(back[..., 2:], raw[..., 2:])


def test_log_odds_encoder_reads_six_channels_and_returns_image_background():
    cfg = dataclasses.replace(EncoderConfig.tiny(), log_odds_input=True)
    params = init_encoder(jax.random.PRNGKey(0), cfg)
    assert params["params"]["Conv_0"]["kernel"].shape[2] == 6
    out = encode(params, cfg, jnp.full((1, 32, 32, 3), 0.6))
    assert out.background.shape == (1, 8, 8, 3)
    # A flat image: standardised to zero, so the background head returns the image mean.
    np.testing.assert_allclose(np.asarray(out.background), 0.6, atol=0.05)
