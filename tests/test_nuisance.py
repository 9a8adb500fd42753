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


def _blur_as_jax_derives_it(image, sigma, max_sigma):
    """The blur written out tap by tap, for jax.grad to differentiate on its own."""
    half = max(1, int(np.ceil(3 * max_sigma)))
    offsets = jnp.arange(-half, half + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (offsets / jnp.maximum(sigma, 1e-3)) ** 2)
    weights = weights / weights.sum()

    def along(a, axis):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (half, half)
        a = jnp.pad(a, widths, mode="edge")
        n = a.shape[axis] - 2 * half
        return sum(weights[i] * jax.lax.slice_in_dim(a, i, i + n, axis=axis) for i in range(2 * half + 1))

    return along(along(image, 0), 1)


def test_blur_gradients_match_automatic_differentiation():
    # Edge pixels get the extended border's share; an image narrower than the kernel too.
    for shape, max_sigma in (((9, 7, 2), 1.0), ((3, 2, 1), 0.4)):
        image = jax.random.uniform(jax.random.PRNGKey(0), shape)
        weights = jax.random.uniform(jax.random.PRNGKey(1), shape)

        def grads(blur):
            return jax.jit(jax.grad(lambda im, s: jnp.sum(weights * blur(im, s, max_sigma) ** 2), argnums=(0, 1)))

        ours_at, want_at = grads(gaussian_blur), grads(_blur_as_jax_derives_it)
        for sigma in (0.7, 0.0):
            ours, want = ours_at(image, jnp.float32(sigma)), want_at(image, jnp.float32(sigma))
            np.testing.assert_allclose(ours[0], want[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ours[1], want[1], rtol=1e-4, atol=1e-6)
            assert np.isfinite(ours[1])
    # Batched, as simulation blurs a batch of scenes with their own sigmas.
    images = jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 8, 3))
    sigmas = jnp.array([0.5, 1.0])
    batched = jax.vmap(lambda im, s: gaussian_blur(im, s, 1.0))(images, sigmas)
    np.testing.assert_allclose(batched[1], _blur_as_jax_derives_it(images[1], sigmas[1], 1.0), atol=1e-6)


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
