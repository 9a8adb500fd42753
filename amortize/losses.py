"""The simulation (sleep) objective: a DECODE-style set likelihood that needs no matching.

For one image with true droplets t = 1..n and output cells k with presence p_k:

    count term    -log Normal(n | sum_k p_k, sum_k p_k (1 - p_k))
    mixture term  -sum_t log sum_k (p_k / sum_j p_j) N(x_t, y_t, log r_t, comp_t | cell k)
    background    mean squared error of the per-cell background colour

Each true droplet only looks at the 3 x 3 cells around its own cell: offsets are bounded to
one cell, so farther cells cannot put their mean on it and their share is negligible. This
keeps the cost at (droplets x 9), never (droplets x cells).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amortize.droplets import Background, Droplets, illumination_at
from amortize.encoder import CellOutputs, cell_centres

#: Standard deviation (image units) that scales the background's squared error.
BACKGROUND_SCALE = 0.05
_LOG_2PI = jnp.log(2.0 * jnp.pi)
#: Log weight of cells that do not count. Finite, unlike -inf, so that a window with no valid
#: cell (an absent slot far outside the image) still has finite gradients.
MASKED = -1e4


def _normal_logpdf(x, mean, scale):
    z = (x - mean) / scale
    return -0.5 * (z * z + _LOG_2PI) - jnp.log(scale)


def inside_image(x, y, shape: tuple[int, int]) -> jnp.ndarray:
    """Centres inside the image (the convention's pixel extent [-0.5, W - 0.5))."""
    h, w = shape
    return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def cell_mask(grid: tuple[int, int], stride: int, shape: tuple[int, int]) -> jnp.ndarray:
    """(Hc, Wc) True for cells whose centre lies inside an image of `shape`."""
    xx, yy = cell_centres(grid, stride)
    return inside_image(xx, yy, shape)


def background_at(background: Background, shape: tuple[int, int], xx, yy) -> jnp.ndarray:
    """True background colour (..., C) at pixel coordinates xx, yy of an image of `shape`."""
    colour = jnp.clip(background.colour, 1e-4, 1 - 1e-4)
    field = illumination_at(xx, yy, shape) @ background.illumination.T
    return jax.nn.sigmoid(jnp.log(colour) - jnp.log1p(-colour) + field)


def set_loss(
    out: CellOutputs, truth: Droplets, background: Background, shape: tuple[int, int]
) -> tuple[jnp.ndarray, dict]:
    """Loss of one image's cell outputs (no batch axis) against its true scene.

    Args:
        out: per-cell predictions on an (Hc, Wc) grid covering at least the image.
        truth: the scene's droplet slots (absent slots and centres outside the image ignored).
        background: the scene's true background.
        shape: (H, W) of the image.

    Returns:
        (loss, parts) where parts holds the count, mixture and background terms and the
        number of true droplets.
    """
    grid, stride = out.logit.shape, out.stride
    valid = cell_mask(grid, stride, shape)
    log_p = jnp.where(valid, jax.nn.log_sigmoid(out.logit), MASKED)
    p = jnp.exp(log_p)
    mean_count = jnp.sum(p)
    var_count = jnp.sum(p * (1.0 - p)) + 1e-3
    is_true = (truth.presence > 0.5) & inside_image(truth.x, truth.y, shape)
    n_true = jnp.sum(is_true)
    count = -_normal_logpdf(n_true, mean_count, jnp.sqrt(var_count))

    # The 3 x 3 window of cells around each true droplet's own cell.
    ci = jnp.floor((truth.y + 0.5) / stride).astype(jnp.int32)
    cj = jnp.floor((truth.x + 0.5) / stride).astype(jnp.int32)
    di, dj = jnp.meshgrid(jnp.arange(-1, 2), jnp.arange(-1, 2), indexing="ij")
    wi = ci[:, None] + di.reshape(-1)[None, :]  # (N, 9)
    wj = cj[:, None] + dj.reshape(-1)[None, :]
    in_grid = (wi >= 0) & (wi < grid[0]) & (wj >= 0) & (wj < grid[1])
    wi, wj = jnp.clip(wi, 0, grid[0] - 1), jnp.clip(wj, 0, grid[1] - 1)

    centre_x = (wj.astype(jnp.float32) + 0.5) * stride - 0.5
    centre_y = (wi.astype(jnp.float32) + 0.5) * stride - 0.5
    offset = out.offset[wi, wj]
    offset_scale = out.offset_scale[wi, wj]
    comp = out.composition[wi, wj]
    comp_scale = out.composition_scale[wi, wj]
    log_lik = (
        _normal_logpdf(truth.x[:, None], centre_x + offset[..., 0], offset_scale[..., 0])
        + _normal_logpdf(truth.y[:, None], centre_y + offset[..., 1], offset_scale[..., 1])
        + _normal_logpdf(
            jnp.log(truth.radius)[:, None], out.log_radius[wi, wj], out.log_radius_scale[wi, wj]
        )
        + jnp.sum(_normal_logpdf(truth.composition[:, None, :], comp, comp_scale), axis=-1)
    )
    log_w = jnp.where(in_grid, log_p[wi, wj], MASKED)
    per_droplet = jax.nn.logsumexp(log_w + log_lik, axis=-1) - jnp.log(mean_count + 1e-8)
    mixture = -jnp.sum(jnp.where(is_true, per_droplet, 0.0))

    xx, yy = cell_centres(grid, stride)
    bg_true = background_at(background, shape, xx, yy)
    bg_err = jnp.sum(((out.background - bg_true) / BACKGROUND_SCALE) ** 2, axis=-1)
    bg = 0.5 * jnp.sum(jnp.where(valid, bg_err, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    loss = count + mixture + bg
    return loss, {"count": count, "mixture": mixture, "background": bg, "n_true": n_true}


def batch_set_loss(
    out: CellOutputs, truth: Droplets, background: Background, shape: tuple[int, int]
) -> tuple[jnp.ndarray, dict]:
    """Mean of `set_loss` over a leading batch axis; parts are batch means too."""
    losses, parts = jax.vmap(lambda o, t, b: set_loss(o, t, b, shape))(out, truth, background)
    return jnp.mean(losses), jax.tree_util.tree_map(jnp.mean, parts)
