"""Imaging nuisances randomised in simulation: blur, pixel noise, JPEG-like compression.

They make simulated scenes look like real micrographs (DECODE's lesson: a model trained on
one clean look breaks on real data). They are pure JAX, so scenes can also be made inside a
jitted training step. None of them is part of the likelihood.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jax.scipy.signal
import numpy as np

from amortize.clutter import add_clutter
from amortize.config import NuisanceConfig


def gaussian_blur(image: jnp.ndarray, sigma: jnp.ndarray, max_sigma: float) -> jnp.ndarray:
    """Separable Gaussian blur of an (H, W, C) image with a traced sigma (px).

    The kernel's support is static (3 * max_sigma), its weights follow sigma; sigma -> 0 gives
    the identity. Edges are extended, not zero-padded, so borders keep their colour.
    """
    return _blur(image, jnp.asarray(sigma, jnp.float32), _support(max_sigma))


def fixed_gaussian_blur(image: jnp.ndarray, sigma: float) -> jnp.ndarray:
    """`gaussian_blur` of an (H, W) image by a fixed sigma, as two 1-D convolutions.

    `gaussian_blur` sums one shifted slice per tap, which suits its small, traced sigmas: for
    the 14 wide blurs of refinement's blob search (up to 193 taps each) XLA took 10 s to
    compile them that way.
    """
    half = _support(sigma)
    weights = _kernel(jnp.float32(sigma), half)
    padded = jnp.pad(image, half, mode="edge")
    rows = jax.scipy.signal.convolve(padded, weights[:, None], mode="valid")
    return jax.scipy.signal.convolve(rows, weights[None, :], mode="valid")


def _support(max_sigma: float) -> int:
    """Half-width (px) of the blur kernel for sigmas up to `max_sigma`."""
    return max(1, int(math.ceil(3 * max_sigma)))


def _kernel(sigma: jnp.ndarray, half: int) -> jnp.ndarray:
    """Normalised Gaussian weights at offsets -half..half."""
    offsets = jnp.arange(-half, half + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * (offsets / jnp.maximum(sigma, 1e-3)) ** 2)
    return weights / weights.sum()


def _correlate(a: jnp.ndarray, weights: jnp.ndarray, axis: int, pad: int, mode: str) -> jnp.ndarray:
    """sum_i weights[i] * a[n + i] along `axis`, after padding it by `pad` on each side."""
    widths = [(0, 0)] * a.ndim
    widths[axis] = (pad, pad)
    a = jnp.pad(a, widths, mode=mode)
    n = a.shape[axis] - weights.shape[0] + 1
    return sum(weights[i] * jax.lax.slice_in_dim(a, i, i + n, axis=axis) for i in range(weights.shape[0]))


def _blur_along(a: jnp.ndarray, weights: jnp.ndarray, axis: int) -> jnp.ndarray:
    return _correlate(a, weights, axis, weights.shape[0] // 2, "edge")


def _blur_along_adjoint(g: jnp.ndarray, weights: jnp.ndarray, axis: int) -> jnp.ndarray:
    """The transpose of `_blur_along` for symmetric weights: the same correlation of g padded
    with zeros, then what fell on the extended edges folded back onto the edge pixels."""
    half = weights.shape[0] // 2
    n = g.shape[axis]
    full = _correlate(g, weights, axis, 2 * half, "constant")  # the padded input's gradient
    inner = jax.lax.slice_in_dim(full, half, half + n, axis=axis)
    first = jnp.sum(jax.lax.slice_in_dim(full, 0, half, axis=axis), axis=axis, keepdims=True)
    last = jnp.sum(jax.lax.slice_in_dim(full, half + n, n + 2 * half, axis=axis), axis=axis, keepdims=True)
    if n == 1:
        return inner + first + last
    middle = jnp.zeros_like(jax.lax.slice_in_dim(inner, 1, n - 1, axis=axis))
    return inner + jnp.concatenate([first, middle, last], axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _blur(image: jnp.ndarray, sigma: jnp.ndarray, half: int) -> jnp.ndarray:
    """`gaussian_blur` with its derivative written out. As XLA derives it, every tap's slice
    becomes a padded copy of the whole image and every weight a pass over it: on
    refinement's 2x sample grid of the slide at 4x (760 x 676 x 3) the value and gradient
    took 145 ms, against 8 ms for the value alone."""
    return _blur_forward(image, sigma, half)[0]


def _blur_forward(image, sigma, half):
    weights = _kernel(sigma, half)
    rows = _blur_along(image, weights, 0)
    return _blur_along(rows, weights, 1), (image, rows, sigma)


def _blur_backward(half, saved, g):
    image, rows, sigma = saved
    weights, d_weights = jax.jvp(lambda s: _kernel(s, half), (sigma,), (jnp.ones_like(sigma),))
    g_rows = _blur_along_adjoint(g, weights, 1)
    g_image = _blur_along_adjoint(g_rows, weights, 0)
    # d out / d sigma = B'_x(B_y image) + B_x(B'_y image), B' correlating with d weights / d sigma.
    g_sigma = jnp.sum(g * _blur_along(rows, d_weights, 1)) + jnp.sum(g_rows * _blur_along(image, d_weights, 0))
    return g_image, g_sigma


_blur.defvjp(_blur_forward, _blur_backward)


# Standard JPEG quantisation tables (ITU T.81, Annex K).
_LUMA_Q = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    np.float32,
)
_CHROMA_Q = np.full((8, 8), 99.0, np.float32)
_CHROMA_Q[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _dct_matrix() -> np.ndarray:
    k, n = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    m = np.cos((2 * n + 1) * k * np.pi / 16) * np.sqrt(2 / 8)
    m[0] /= np.sqrt(2)
    return m.astype(np.float32)


_DCT = _dct_matrix()


def _quantise_blocks(plane: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """DCT-quantise-invert every 8x8 block of a 2-D plane (0..255 scale)."""
    h, w = plane.shape
    ph, pw = -h % 8, -w % 8
    p = jnp.pad(plane, ((0, ph), (0, pw)), mode="edge") - 128.0
    blocks = p.reshape(p.shape[0] // 8, 8, p.shape[1] // 8, 8).transpose(0, 2, 1, 3)
    coef = jnp.einsum("ij,abjk,lk->abil", _DCT, blocks, _DCT)
    coef = jnp.round(coef / table) * table
    blocks = jnp.einsum("ji,abjk,kl->abil", _DCT, coef, _DCT)
    p = blocks.transpose(0, 2, 1, 3).reshape(p.shape) + 128.0
    return p[:h, :w]


def jpeg_like(image: jnp.ndarray, quality: jnp.ndarray) -> jnp.ndarray:
    """Approximate JPEG compression of an (H, W, C) image in [0, 1] at a traced quality.

    YCbCr conversion, 4:2:0 chroma subsampling and 8x8 DCT quantisation with the standard
    tables scaled by quality, as libjpeg does. No entropy coding, which is lossless anyway.
    """
    q = jnp.clip(quality, 1.0, 100.0)
    scale = jnp.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q) / 100.0
    luma_q = jnp.clip(jnp.floor(_LUMA_Q * scale + 0.5), 1.0, 255.0)
    chroma_q = jnp.clip(jnp.floor(_CHROMA_Q * scale + 0.5), 1.0, 255.0)
    x = image * 255.0
    if image.shape[-1] == 1:
        return jnp.clip(_quantise_blocks(x[..., 0], luma_q)[..., None] / 255.0, 0.0, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    h, w = y.shape

    def subsampled(c):
        c = jnp.pad(c, ((0, h % 2), (0, w % 2)), mode="edge")
        small = c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2).mean(axis=(1, 3))
        small = _quantise_blocks(small, chroma_q)
        return jnp.repeat(jnp.repeat(small, 2, axis=0), 2, axis=1)[:h, :w]

    y = _quantise_blocks(y, luma_q)
    cb, cr = subsampled(cb) - 128.0, subsampled(cr) - 128.0
    rgb = jnp.stack(
        [y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1
    )
    return jnp.clip(rgb / 255.0, 0.0, 1.0)


def degrade(
    key: jax.Array, clean: jnp.ndarray, noise: jnp.ndarray, config: NuisanceConfig
) -> tuple[jnp.ndarray, dict]:
    """Maybe add clutter, then blur, add pixel noise, maybe JPEG-compress and quantise a
    rendered (H, W, C) image.

    Returns:
        (image in [0, 1], the drawn nuisance values as a dict of scalars).
    """
    k_blur, k_noise, k_jpeg, k_quality = jax.random.split(key, 4)
    sigma = jax.random.uniform(k_blur, (), maxval=config.blur_sigma_max)
    image = clean
    if config.clutter_probability > 0:  # its own stream: scenes without clutter stay as they were
        image = add_clutter(jax.random.fold_in(key, 1), image, config)
    if config.blur_sigma_max > 0:
        image = gaussian_blur(image, sigma, config.blur_sigma_max)
    image = jnp.clip(image + noise * jax.random.normal(k_noise, image.shape), 0.0, 1.0)
    use_jpeg = jax.random.bernoulli(k_jpeg, config.jpeg_probability)
    quality = jax.random.uniform(
        k_quality, (), minval=config.jpeg_quality_min, maxval=config.jpeg_quality_max
    )
    if config.jpeg_probability > 0:
        image = jnp.where(use_jpeg, jpeg_like(image, quality), image)
    if config.quantize:
        image = jnp.round(image * 255.0) / 255.0
    info = {"blur_sigma": sigma, "jpeg": use_jpeg, "jpeg_quality": quality, "noise": noise}
    return image, info
