"""The renderer: droplets + optics + background -> image, linear in pixels.

`render` is a pure, jittable, differentiable JAX function. It never forms a pixels x droplets
array. Instead (see `RenderConfig`):

1. *Binning.* Each present droplet goes to a level whose square cells are at least as large as
   its reach, and to the cell holding its centre on that level (a sort, no Python loops).
2. *Tile culling.* Each `tile` x `tile` block of pixels reads the 3 x 3 cells around it on
   every level, a fixed static gather, and keeps the `tile_candidates` droplets nearest to it.
3. *Compositing.* Each pixel takes the candidate nearest in radius-normalised distance
   d = |p - c| / r, as in the original notebooks. This lets larger droplets claim more of an
   overlap. The optics MLP is evaluated once per pixel, for that droplet only.

The choice of droplet is piecewise constant. Gradients flow through the winner's geometry,
composition and presence, and through the optics and the background, which is what the
encoder's training needs. They do not see a boundary between overlapping droplets move:
for SVI, `RenderConfig.overlap_softness` blends the two nearest droplets across it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from amortize.config import RenderConfig
from amortize.droplets import Background, Droplets, background_logits
from amortize.optics import optics_delta, optics_features
from amortize.program_store import stored_jit


#: Slots with a lower presence are not drawn at all. Drawn slots take part in the nearest-
#: droplet choice, so a mostly absent slot (a relaxed presence of 0.01, say, in SVI or the wake
#: ELBO) would otherwise win the pixels around its centre and hide the droplet under it.
#: Presence is 0 or 1 in simulated scenes, where this changes nothing.
DRAWN_PRESENCE = 0.5


class GridLayout:
    """Static geometry of the tile grid and of the padded cell grids of every level.

    Every level's grid has one cell of padding on each side, so that droplets centred just
    outside the image are still drawn. All levels live in one flat table of cell rows.

    Its per-tile arrays are computed inside the program (from iotas), not stored in it as
    constants: on the 507 x 380 stand-in at 2 x 2 points per pixel such constants made
    SVI's program 11 MB larger (pixel coordinates and cell rows), and every process paid
    for them again in lowering it and loading it from the compilation cache.
    """

    def __init__(self, shape: tuple[int, int], config: RenderConfig):
        h, w = shape
        t = config.tile
        self.shape = (h, w)
        self.tile = t
        self.tiles = (math.ceil(h / t), math.ceil(w / t))
        self.sides = [t * 2**level for level in range(config.levels)]
        self.cells = [(math.ceil(h / s) + 2, math.ceil(w / s) + 2) for s in self.sides]
        sizes = [ny * nx for ny, nx in self.cells]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
        self.n_rows = int(sum(sizes))
        self.levels = config.levels

    @property
    def n_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    def tile_indices(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(ty, tx) of each tile, each (n_tiles, 1) int32, in tile order."""
        i = jax.lax.broadcasted_iota(jnp.int32, (self.n_tiles, 1), 0)
        return i // self.tiles[1], i % self.tiles[1]

    def pixel_coordinates(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(y, x) of every pixel of every tile, each (n_tiles, tile**2) float32, in tile
        order (pixels past the image's edge included)."""
        t = self.tile
        ty, tx = self.tile_indices()
        o = jax.lax.broadcasted_iota(jnp.int32, (1, t * t), 1)
        return ((ty * t + o // t).astype(jnp.float32), (tx * t + o % t).astype(jnp.float32))

    def tile_rows(self) -> jnp.ndarray:
        """(n_tiles, levels * 9) rows of the cell table that each tile reads."""
        ty, tx = self.tile_indices()
        k = jax.lax.broadcasted_iota(jnp.int32, (1, 9), 1)
        dy, dx = k // 3 - 1, k % 3 - 1
        rows = []
        for level in range(self.levels):
            _, nx = self.cells[level]
            cy, cx = (ty >> level) + 1 + dy, (tx >> level) + 1 + dx
            rows.append(int(self.offsets[level]) + cy * nx + cx)
        return jnp.concatenate(rows, axis=1)


@functools.lru_cache(maxsize=64)
def grid_layout(shape: tuple[int, int], config: RenderConfig) -> GridLayout:
    return GridLayout(shape, config)


def droplet_reach(radius: jnp.ndarray, config: RenderConfig) -> jnp.ndarray:
    """How far each droplet is drawn, in its radii: `reach`, or further for droplets whose
    `edge_reach_px` past the rim lies beyond it."""
    return jnp.maximum(config.reach, 1.0 + config.edge_reach_px / radius)


def droplet_levels(radius: jnp.ndarray, config: RenderConfig) -> jnp.ndarray:
    """Level of each droplet: the smallest whose cell side covers its reach in px."""
    ratio = droplet_reach(radius, config) * radius / config.tile
    level = jnp.ceil(jnp.log2(jnp.maximum(ratio, 1e-6)))
    return jnp.clip(level, 0, config.levels - 1).astype(jnp.int32)


def _cell_keys(
    droplets: Droplets, layout: GridLayout, config: RenderConfig
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Row of the cell table each droplet belongs to, and whether it is drawn at all."""
    x, y, r = (jax.lax.stop_gradient(a) for a in (droplets.x, droplets.y, droplets.radius))
    level = droplet_levels(r, config)
    side = jnp.asarray(layout.sides, jnp.float32)[level]
    ny = jnp.asarray([c[0] for c in layout.cells], jnp.int32)[level]
    nx = jnp.asarray([c[1] for c in layout.cells], jnp.int32)[level]
    # Pixel i spans [i - 0.5, i + 0.5), so cell j of side s starts at j * s - 0.5.
    cx = jnp.floor((x + 0.5) / side).astype(jnp.int32) + 1
    cy = jnp.floor((y + 0.5) / side).astype(jnp.int32) + 1
    ok = (droplets.presence >= DRAWN_PRESENCE) & (cx >= 0) & (cx < nx) & (cy >= 0) & (cy < ny)
    ok &= jnp.isfinite(x) & jnp.isfinite(y) & (r > 0)
    key = jnp.where(ok, jnp.asarray(layout.offsets)[level] + cy * nx + cx, layout.n_rows)
    return key, ok


def bin_droplets(droplets: Droplets, layout: GridLayout, config: RenderConfig) -> jnp.ndarray:
    """Cell table: (n_rows, cell_capacity) droplet indices, -1 for empty places.

    Absent slots (presence < DRAWN_PRESENCE) and droplets too far outside the image are left out; a
    cell holding more than `cell_capacity` droplets keeps an arbitrary subset of them.
    """
    key, _ = _cell_keys(droplets, layout, config)
    order = jnp.argsort(key)
    sorted_key = key[order]
    rank = jnp.arange(key.shape[0]) - jnp.searchsorted(sorted_key, sorted_key, side="left")
    table = jnp.full((layout.n_rows + 1, config.cell_capacity), -1, jnp.int32)
    table = table.at[sorted_key, rank].set(order.astype(jnp.int32), mode="drop")
    return table[: layout.n_rows]


def overflow(droplets: Droplets, shape: tuple[int, int], config: RenderConfig) -> jnp.ndarray:
    """How many droplets that should be drawn do not fit the cell table (jittable; want 0)."""
    layout = grid_layout(tuple(shape), config)
    _, ok = _cell_keys(droplets, layout, config)
    return jnp.sum(ok) - jnp.sum(bin_droplets(droplets, layout, config) >= 0)


def tile_candidates(
    droplets: Droplets, table: jnp.ndarray, layout: GridLayout, config: RenderConfig
) -> jnp.ndarray:
    """(n_tiles, tile_candidates) droplet indices that may touch each tile, -1 for none."""
    t = config.tile
    cand = table[layout.tile_rows()].reshape(layout.n_tiles, -1)
    safe = jnp.maximum(cand, 0)
    x, y, r = (jax.lax.stop_gradient(a)[safe] for a in (droplets.x, droplets.y, droplets.radius))
    y0, x0 = ((o * t).astype(jnp.float32) for o in layout.tile_indices())
    # Distance from the droplet centre to the nearest pixel centre of the tile.
    gap_x = jnp.maximum(jnp.maximum(x0 - x, x - (x0 + t - 1)), 0.0)
    gap_y = jnp.maximum(jnp.maximum(y0 - y, y - (y0 + t - 1)), 0.0)
    dist = jnp.sqrt(gap_x**2 + gap_y**2) / r
    score = jnp.where((cand >= 0) & (dist < droplet_reach(r, config)), -dist, -jnp.inf)
    k = min(config.tile_candidates, cand.shape[1])
    best, where = jax.lax.top_k(score, k)
    return jnp.where(jnp.isfinite(best), jnp.take_along_axis(cand, where, axis=1), -1)


def fade(d: jnp.ndarray, config: RenderConfig, reach: jnp.ndarray | float | None = None) -> jnp.ndarray:
    """1 up to fade_start, smoothly down to 0 at reach (C1-continuous). A droplet's own
    `reach` (`droplet_reach`) scales both."""
    reach = config.reach if reach is None else reach
    start = config.fade_start * (reach / config.reach)
    s = jnp.clip((d - start) / (reach - start), 0.0, 1.0)
    return 1.0 - s * s * (3.0 - 2.0 * s)


def _from_tiles(a: jnp.ndarray, layout: GridLayout, tile: int) -> jnp.ndarray:
    """(n_tiles, tile * tile, ...) in tile order -> (H, W, ...) image layout."""
    nty, ntx = layout.tiles
    a = a.reshape((nty, ntx, tile, tile) + a.shape[2:])
    a = jnp.swapaxes(a, 1, 2).reshape((nty * tile, ntx * tile) + a.shape[4:])
    h, w = layout.shape
    return a[:h, :w]


def _nearest(droplets: Droplets, shape: tuple[int, int], config: RenderConfig,
             n: int) -> tuple[jnp.ndarray, GridLayout]:
    """The `n` (1 or 2) candidates nearest each pixel in radius-normalised distance, nearest
    first, (n_tiles, tile**2, n); -1 = none. Ties go to the earlier candidate.

    A running minimum over the K candidates, an unrolled loop of element-wise ops that XLA
    fuses into one pass, rather than argmin or top_k over a (n_tiles, tile**2, K) array:
    XLA's CPU argmin is a variadic reduce, and at 3.1 M pixels it took 142 ms against 8 ms.
    """
    layout = grid_layout(tuple(shape), config)
    table = bin_droplets(droplets, layout, config)
    cand = tile_candidates(droplets, table, layout, config)
    safe = jnp.maximum(cand, 0)
    x, y, r = (jax.lax.stop_gradient(a)[safe] for a in (droplets.x, droplets.y, droplets.radius))
    py, px = layout.pixel_coordinates()  # (n_tiles, t * t)
    best = [jnp.full(px.shape, jnp.inf, jnp.float32) for _ in range(n)]
    index = [jnp.full(px.shape, -1, jnp.int32) for _ in range(n)]
    for j in range(cand.shape[1]):
        c = cand[:, j : j + 1]
        d2 = ((px - x[:, j : j + 1]) ** 2 + (py - y[:, j : j + 1]) ** 2) / r[:, j : j + 1] ** 2
        d2 = jnp.where(c >= 0, d2, jnp.inf)
        closer = d2 < best[0]
        if n == 2:  # the old nearest moves to second place, or the candidate takes it
            second = d2 < best[1]
            best[1] = jnp.where(closer, best[0], jnp.where(second, d2, best[1]))
            index[1] = jnp.where(closer, index[0], jnp.where(second, c, index[1]))
        best[0] = jnp.where(closer, d2, best[0])
        index[0] = jnp.where(closer, c, index[0])
    return jnp.stack(index, axis=-1), layout


def nearest_droplet(
    droplets: Droplets, shape: tuple[int, int], config: RenderConfig
) -> tuple[jnp.ndarray, GridLayout]:
    """Index of the droplet each pixel shows, in tile layout (n_tiles, tile**2); -1 = none.

    Integer output, so no gradient flows through the choice itself.
    """
    index, layout = _nearest(droplets, shape, config, 1)
    return index[..., 0], layout


def nearest_two(
    droplets: Droplets, shape: tuple[int, int], config: RenderConfig
) -> tuple[jnp.ndarray, GridLayout]:
    """The two nearest droplets of each pixel, nearest first, (n_tiles, tile**2, 2); -1 = none."""
    return _nearest(droplets, shape, config, 2)


#: Pixels per chunk of the per-pixel stage. The MLP's activations for one chunk stay in cache
#: (XLA on the CPU does not fuse a matrix product with the ops around it), which made the
#: full-resolution render about twice as fast as one pass over all pixels.
PIXEL_CHUNK = 16384


def render_logits(
    droplets: Droplets,
    optics_params: dict,
    background: Background,
    shape: tuple[int, int],
    config: RenderConfig = RenderConfig(),
    pixel_chunk: int = PIXEL_CHUNK,
) -> jnp.ndarray:
    """Pixel logits (H, W, C); `render` is their sigmoid. The per-pixel stage runs in chunks
    of `pixel_chunk` pixels (the values do not depend on it)."""
    soft = config.overlap_softness > 0
    if soft:
        winner, layout = nearest_two(droplets, shape, config)
    else:
        winner, layout = nearest_droplet(droplets, shape, config)
    h, w = shape
    n_pix = h * w
    chunk = min(pixel_chunk, n_pix)
    n_chunks = -(-n_pix // chunk)
    pad = n_chunks * chunk - n_pix

    def chunked(a):
        a = a.reshape((n_pix,) + a.shape[2:])
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((n_chunks, chunk) + a.shape[1:])

    pixels = {
        "winner": chunked(_from_tiles(winner, layout, config.tile)),
        "start": chunk * jax.lax.iota(jnp.int32, n_chunks),  # the chunk's first pixel
        "bg_logit": chunked(background_logits(background, shape)),
    }

    def droplet_term(index, p):
        """(normalised distance, logit added by droplet `index` (-1: none)) at each pixel."""
        found = index >= 0
        idx = jnp.maximum(index, 0)
        r = droplets.radius[idx]
        dx_r = (p["x"] - droplets.x[idx]) / r
        dy_r = (p["y"] - droplets.y[idx]) / r
        d = jnp.sqrt(dx_r**2 + dy_r**2 + 1e-12)
        weight = jnp.where(found, fade(d, config, droplet_reach(r, config)) * droplets.presence[idx], 0.0)
        colour = jax.nn.sigmoid(p["bg_logit"])
        feats = optics_features(colour, dx_r, dy_r, r, droplets.composition[idx])
        delta = optics_delta(optics_params, feats, tail_flat=config.fade_start, tail_outer=config.reach)
        return d, weight[:, None] * delta

    def shade(p):
        # Pixel coordinates from the flat index (not stored; see `GridLayout`). Padding
        # pixels lie past the last row and are cut off below.
        flat = p["start"] + jax.lax.iota(jnp.int32, chunk)
        p = dict(p, x=(flat % w).astype(jnp.float32), y=(flat // w).astype(jnp.float32))
        if not soft:
            return p["bg_logit"] + droplet_term(p["winner"], p)[1]
        d1, term1 = droplet_term(p["winner"][:, 0], p)
        d2, term2 = droplet_term(p["winner"][:, 1], p)
        near = jax.nn.sigmoid((d2 - d1) / config.overlap_softness)
        near = jnp.where(p["winner"][:, 1] >= 0, near, 1.0)[:, None]
        return p["bg_logit"] + near * term1 + (1 - near) * term2

    # With several chunks, each chunk's forward pass is rerun in the backward pass instead
    # of stored. Stored, the MLP's activations filled buffers of up to 100 MB per layer on
    # the 507 x 380 stand-in (48 chunks x 16384 points x 32), and zero-filling and writing
    # them took longer than rerunning the MLP: SVI's step there 0.58 s -> 0.47 s (median of
    # 6, same process, on a slow hour of the VM).
    logits = jax.lax.map(jax.checkpoint(shade) if n_chunks > 1 else shade, pixels)
    return logits.reshape(n_chunks * chunk, -1)[:n_pix].reshape(h, w, -1)


@stored_jit(static_argnames=("shape", "config"))
def render(
    droplets: Droplets,
    optics_params: dict,
    background: Background,
    shape: tuple[int, int],
    config: RenderConfig = RenderConfig(),
) -> jnp.ndarray:
    """Render one scene.

    Args:
        droplets: N slots (no batch axes); x, y, radius in px.
        optics_params: optics MLP variables (see `amortize.optics`).
        background: colour (C,) and illumination (C, 5).
        shape: (H, W) of the image, static.
        config: spatial index and compositing settings, static.

    Returns:
        (H, W, C) float32 image in (0, 1).
    """
    return jax.nn.sigmoid(render_logits(droplets, optics_params, background, shape, config))
