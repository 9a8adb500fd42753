"""Things in real micrographs that are not droplets, drawn onto simulated scenes.

An encoder trained only on droplets over a smooth background marks whatever else it meets:
on the shared microfluidic images the shipped models put circles on channel walls, and
users' frames carry burned-in scale bars and time stamps. Training scenes can therefore
carry clutter that is not in their ground truth, so that the encoder learns to leave it:

    lines   straight dark or bright lines across the frame, alone or as the two walls of a
            channel (microfluidic channels, fixtures, scratches)
    bars    a filled rectangle near a corner (a scale bar)
    text    a row of block glyphs on a 5 x 3 grid (time stamps, labels)
    fibres  thin curved dark strands (dust, fibres)
    vignette  darkening towards the corners

Every shape is drawn from a signed distance, antialiased over one pixel, and blended over
the rendered image in a colour near black or near white. Shapes are drawn one at a time in a
`fori_loop`, so memory stays at one image whatever their number. Jittable; the counts are
static.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from amortize.config import NuisanceConfig

#: Glyph grid (rows, columns) of the text clutter, and glyphs per line of text.
GLYPH_ROWS, GLYPH_COLS = 5, 3
GLYPHS = 8
#: Straight segments per curved fibre.
FIBRE_SEGMENTS = 4


def _coverage(sdf: jnp.ndarray) -> jnp.ndarray:
    """Fraction of a pixel inside a shape from its signed distance (px; < 0 inside)."""
    return jnp.clip(0.5 - sdf, 0.0, 1.0)


def segment_distance(xx, yy, x0, y0, x1, y1) -> jnp.ndarray:
    """Distance (px) of each pixel from the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = jnp.clip(((xx - x0) * dx + (yy - y0) * dy) / jnp.maximum(dx * dx + dy * dy, 1e-6), 0, 1)
    return jnp.hypot(xx - x0 - t * dx, yy - y0 - t * dy)


def box_distance(xx, yy, cx, cy, half_w, half_h) -> jnp.ndarray:
    """Signed distance (px) of each pixel from an axis-aligned box (< 0 inside)."""
    qx, qy = jnp.abs(xx - cx) - half_w, jnp.abs(yy - cy) - half_h
    outside = jnp.hypot(jnp.maximum(qx, 0.0), jnp.maximum(qy, 0.0))
    return outside + jnp.minimum(jnp.maximum(qx, qy), 0.0)


def _blend(image, mask, key):
    """Paint `mask` (H, W) over `image` (H, W, C) in a near-black or near-white colour."""
    k_side, k_level, k_alpha = jax.random.split(key, 3)
    bright = jax.random.bernoulli(k_side)
    level = jax.random.uniform(k_level, (), minval=0.0, maxval=0.2)
    colour = jnp.where(bright, 1.0 - level, level)
    alpha = jax.random.uniform(k_alpha, (), minval=0.5, maxval=1.0) * mask[..., None]
    return image * (1.0 - alpha) + colour * alpha


def _lines(key, xx, yy, shape, n):
    """Up to `n` straight lines across the frame; each may be a channel's pair of walls."""
    h, w = shape
    diag = math.hypot(h, w)

    def body(i, mask):
        k = jax.random.fold_in(key, i)
        k_on, k_ang, k_axis, k_c, k_w, k_pair, k_gap = jax.random.split(k, 7)
        axis = jax.random.bernoulli(k_axis, 0.6)  # microfluidic channels run along an axis
        angle = jnp.where(axis, jax.random.randint(k_ang, (), 0, 2) * (jnp.pi / 2),
                          jax.random.uniform(k_ang, (), maxval=jnp.pi))
        cx, cy = jax.random.uniform(k_c, (2,)) * jnp.array([w, h])
        ux, uy = jnp.cos(angle), jnp.sin(angle)
        width = jax.random.uniform(k_w, (), minval=0.8, maxval=4.0)
        gap = jax.random.uniform(k_gap, (), minval=20.0, maxval=0.6 * min(h, w) + 20.0)

        def wall(offset):
            ox, oy = cx - uy * offset, cy + ux * offset
            d = segment_distance(xx, yy, ox - ux * diag, oy - uy * diag, ox + ux * diag, oy + uy * diag)
            return _coverage(d - width / 2)

        line = jnp.maximum(wall(0.0), jnp.where(jax.random.bernoulli(k_pair), wall(gap), 0.0))
        return jnp.maximum(mask, jnp.where(jax.random.bernoulli(k_on, 0.6), line, 0.0))

    return jax.lax.fori_loop(0, n, body, jnp.zeros(shape))


def _bar(key, xx, yy, shape):
    """A scale bar: a filled rectangle near one of the corners."""
    h, w = shape
    k_len, k_th, k_corner, k_in = jax.random.split(key, 4)
    length = jax.random.uniform(k_len, (), minval=0.12, maxval=0.35) * w
    thick = jax.random.uniform(k_th, (), minval=2.0, maxval=8.0)
    right, bottom = jax.random.bernoulli(k_corner, 0.5, (2,))
    inset = jax.random.uniform(k_in, (2,), minval=4.0, maxval=0.12 * min(h, w) + 4.0)
    cx = jnp.where(right, w - inset[0] - length / 2, inset[0] + length / 2)
    cy = jnp.where(bottom, h - inset[1] - thick / 2, inset[1] + thick / 2)
    return _coverage(box_distance(xx, yy, cx, cy, length / 2, thick / 2))


def _text(key, xx, yy, shape):
    """A row of `GLYPHS` block glyphs, each a random pattern on a 5 x 3 grid of strokes."""
    h, w = shape
    k_size, k_pos, k_cells = jax.random.split(key, 3)
    height = jax.random.uniform(k_size, (), minval=7.0, maxval=18.0)
    cell = height / GLYPH_ROWS
    advance = cell * (GLYPH_COLS + 1)
    x0, y0 = jax.random.uniform(k_pos, (2,)) * jnp.array([jnp.maximum(w - GLYPHS * advance, 1.0),
                                                        jnp.maximum(h - height, 1.0)])
    on = jax.random.bernoulli(k_cells, 0.55, (GLYPHS * GLYPH_ROWS * GLYPH_COLS,))

    def body(i, mask):
        glyph, rest = i // (GLYPH_ROWS * GLYPH_COLS), i % (GLYPH_ROWS * GLYPH_COLS)
        row, col = rest // GLYPH_COLS, rest % GLYPH_COLS
        cx = x0 + glyph * advance + (col + 0.5) * cell
        cy = y0 + (row + 0.5) * cell
        stroke = _coverage(box_distance(xx, yy, cx, cy, cell / 2, cell / 2))
        return jnp.maximum(mask, jnp.where(on[i], stroke, 0.0))

    return jax.lax.fori_loop(0, GLYPHS * GLYPH_ROWS * GLYPH_COLS, body, jnp.zeros(shape))


def _fibres(key, xx, yy, shape, n):
    """Up to `n` thin curved strands, each a quadratic Bezier curve of a few segments."""
    h, w = shape

    def body(i, mask):
        k = jax.random.fold_in(key, i)
        k_on, k_p, k_len, k_w = jax.random.split(k, 4)
        start = jax.random.uniform(k_p, (2,)) * jnp.array([w, h])
        length = jax.random.uniform(k_len, (), minval=15.0, maxval=60.0)
        p = start + length * jax.random.uniform(jax.random.fold_in(k_p, 1), (3, 2), minval=-1.0)
        p = p.at[0].set(start)
        width = jax.random.uniform(k_w, (), minval=0.6, maxval=1.6)
        t = jnp.linspace(0.0, 1.0, FIBRE_SEGMENTS + 1)[:, None]
        pts = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]

        def seg(j, d):
            return jnp.minimum(d, segment_distance(xx, yy, pts[j, 0], pts[j, 1],
                                                   pts[j + 1, 0], pts[j + 1, 1]))

        d = jax.lax.fori_loop(0, FIBRE_SEGMENTS, seg, jnp.full(shape, jnp.inf))
        return jnp.maximum(mask, jnp.where(jax.random.bernoulli(k_on, 0.5),
                                           _coverage(d - width / 2), 0.0))

    return jax.lax.fori_loop(0, n, body, jnp.zeros(shape))


def add_clutter(key: jax.Array, image: jnp.ndarray, config: NuisanceConfig) -> jnp.ndarray:
    """Draw clutter over a rendered (H, W, C) image in [0, 1] with chance
    `config.clutter_probability`; each kind of clutter is present or not independently."""
    h, w = image.shape[:2]
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    keys = jax.random.split(key, 10)
    use = jax.random.bernoulli(keys[0], config.clutter_probability)
    out = image
    kinds = (
        (config.clutter_lines > 0, lambda k: _lines(k, xx, yy, (h, w), config.clutter_lines)),
        (True, lambda k: _bar(k, xx, yy, (h, w))),
        (True, lambda k: _text(k, xx, yy, (h, w))),
        (config.clutter_fibres > 0, lambda k: _fibres(k, xx, yy, (h, w), config.clutter_fibres)),
    )
    for i, (enabled, draw) in enumerate(kinds):
        if not enabled:
            continue
        k_on, k_draw, k_paint = jax.random.split(keys[1 + i], 3)
        mask = draw(k_draw) * jax.random.bernoulli(k_on, 0.5)
        out = _blend(out, mask, k_paint)
    # Vignetting: up to `vignette_max` darker in the corners than in the middle.
    u = (xx / max(w - 1, 1)) * 2 - 1
    v = (yy / max(h - 1, 1)) * 2 - 1
    depth = jax.random.uniform(keys[8], (), maxval=config.vignette_max)
    out = out * (1.0 - depth * 0.5 * (u * u + v * v))[..., None]
    return jnp.where(use, out, image)
