import io

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from amortize.config import NuisanceConfig
from amortize.nuisance import degrade, gaussian_blur, jpeg_like


def smooth_image(h=32, w=40):
    yy, xx = np.mgrid[0:h, 0:w] / 10.0
    return np.stack([0.5 + 0.3 * np.sin(xx), 0.5 + 0.3 * np.cos(yy), 0.4 + 0.2 * np.sin(xx + yy)],
                    -1).astype(np.float32)


def test_blur_zero_sigma_is_identity_and_keeps_constants():
    img = jnp.asarray(smooth_image())
    np.testing.assert_allclose(gaussian_blur(img, jnp.asarray(0.0), 1.5), img, atol=1e-6)
    flat = jnp.full((10, 12, 3), 0.37)
    np.testing.assert_allclose(gaussian_blur(flat, jnp.asarray(1.2), 1.5), flat, atol=1e-6)


def test_blur_spreads_a_point_like_a_gaussian():
    img = jnp.zeros((21, 21, 1)).at[10, 10, 0].set(1.0)
    out = np.asarray(gaussian_blur(img, jnp.asarray(1.0), 1.0))[..., 0]
    assert out.sum() == np.float32(out.sum()) and abs(out.sum() - 1.0) < 1e-5
    assert out[10, 11] / out[10, 10] == np.float32(out[10, 11] / out[10, 10])
    np.testing.assert_allclose(out[10, 11] / out[10, 10], np.exp(-0.5), rtol=1e-3)


def test_jpeg_like_error_is_close_to_real_jpeg():
    img = smooth_image(48, 64)
    rng = np.random.default_rng(0)
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)
    for quality in (30, 90):
        ours = np.asarray(jpeg_like(jnp.asarray(img), jnp.asarray(float(quality))))
        buf = io.BytesIO()
        Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
        real = np.asarray(Image.open(buf), np.float32) / 255
        err_ours = np.sqrt(np.mean((ours - img) ** 2))
        err_real = np.sqrt(np.mean((real - img) ** 2))
        assert 0.4 * err_real < err_ours < 2.5 * err_real, (quality, err_ours, err_real)


def test_degrade_is_deterministic_and_quantised():
    clean = jnp.asarray(smooth_image())
    config = NuisanceConfig(jpeg_probability=1.0)
    a, info = degrade(jax.random.PRNGKey(0), clean, jnp.asarray(0.02), config)
    b, _ = degrade(jax.random.PRNGKey(0), clean, jnp.asarray(0.02), config)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.asarray(a) * 255, np.round(np.asarray(a) * 255), atol=1e-3)
    assert float(info["jpeg"]) == 1.0
    assert 0.0 <= float(info["blur_sigma"]) <= config.blur_sigma_max
