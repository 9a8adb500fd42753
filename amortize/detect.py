"""From per-cell distributions to a list of droplets: peak finding compiled with jit.

The set likelihood lets one droplet's presence spread over neighbouring cells (it sits on a
cell border). A cell is reported when its own presence is high, or when it is the local
maximum of its 3 x 3 neighbourhood and the neighbourhood's summed presence is high; the
reported presence is then that sum (capped at 1). This is DECODE's post-processing, and
costs a couple of pooling passes over the cell grid, independent of the droplet count.

A droplet's neighbouring cells also estimate it, each with its own noise, so a reported
droplet's centre, radius and composition are the consensus of the 3 x 3 cells around it:
each cell's estimate weighted by its presence, by its precision, and by how well its centre
agrees with the reporting cell's (see `neighbour_consensus`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from amortize.droplets import table_columns
from amortize.encoder import CellOutputs, cell_centres

#: A cell whose own presence reaches this is reported whatever its neighbours. High, because
#: on a 2 px grid one droplet often lights up two neighbouring cells above 0.6 (a duplicate),
#: while two close droplets get two 3 x 3 peaks anyway (validation set, seed 555).
CONFIDENT = 0.9
#: Added to the summed position variances (px^2) when judging whether two cells' centres
#: agree (`neighbour_consensus`).
AGREEMENT_VAR = 0.25
#: Default presence threshold: best F1 of the shipped model on the validation set (seed 555).
DEFAULT_THRESHOLD = 0.4


def _pool3(a: jnp.ndarray, op, init) -> jnp.ndarray:
    return jax.lax.reduce_window(a, init, op, (3, 3), (1, 1), "SAME")


def _shifted(a: jnp.ndarray, i: int, j: int, fill: float) -> jnp.ndarray:
    """`a` (Hc, Wc, ...) seen from neighbour (i - 1, j - 1): out[r, c] = a[r + i - 1,
    c + j - 1], `fill` beyond the grid."""
    hc, wc = a.shape[:2]
    pad = jnp.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
    return jax.lax.slice(pad, (i, j) + (0,) * (a.ndim - 2), (i + hc, j + wc) + a.shape[2:])


def neighbour_consensus(out: CellOutputs) -> dict[str, jnp.ndarray]:
    """Each cell's estimates pooled with those of its 3 x 3 neighbours that claim the same
    droplet: x, y (px), log radius and composition, all (Hc, Wc[, K]).

    A neighbour's weight is its presence times a Gaussian in the distance between its
    centre and this cell's, relative to their position scales (plus `AGREEMENT_VAR`, so that
    two cells a fraction of a pixel apart count as agreeing); each quantity is then a
    precision-weighted mean. Every cell is in its own neighbourhood, so an isolated cell
    keeps its own estimates. The reported standard deviations are not shrunk: neighbouring
    cells read the same pixels, so their errors are far from independent.
    """
    p = jax.nn.sigmoid(out.logit)
    xx, yy = cell_centres(p.shape, out.stride)
    x, y = xx + out.offset[..., 0], yy + out.offset[..., 1]
    var_xy = jnp.mean(out.offset_scale**2, axis=-1)
    estimates = {  # name: (value, its scale)
        "x": (x, out.offset_scale[..., 0]),
        "y": (y, out.offset_scale[..., 1]),
        "log_radius": (out.log_radius, out.log_radius_scale),
        "composition": (out.composition, out.composition_scale),
    }
    sums = {name: [jnp.zeros_like(v), jnp.zeros_like(v)] for name, (v, _) in estimates.items()}
    # Nine shifted views summed one at a time: stacking them is ten times slower on the CPU.
    for i in range(3):
        for j in range(3):
            d2 = (_shifted(x, i, j, 0.0) - x) ** 2 + (_shifted(y, i, j, 0.0) - y) ** 2
            spread = _shifted(var_xy, i, j, 1.0) + var_xy + AGREEMENT_VAR
            agree = _shifted(p, i, j, 0.0) * jnp.exp(-0.5 * d2 / spread)
            for name, (value, scale) in estimates.items():
                w = agree.reshape(agree.shape + (1,) * (value.ndim - 2))
                w = w / _shifted(scale, i, j, 1.0) ** 2
                sums[name][0] = sums[name][0] + w * _shifted(value, i, j, 0.0)
                sums[name][1] = sums[name][1] + w
    # No neighbour present at all (weights underflow): the cell's own estimate.
    return {
        name: jnp.where(sums[name][1] > 0, sums[name][0] / jnp.maximum(sums[name][1], 1e-30), value)
        for name, (value, _) in estimates.items()
    }


def cell_droplets(out: CellOutputs, threshold: float | jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Per-cell droplet estimates and a detection mask for one image, all (Hc, Wc[, K]).

    Args:
        out: one image's cell outputs (no batch axis).
        threshold: presence needed to report a droplet.
    """
    p = jax.nn.sigmoid(out.logit)
    is_peak = p >= _pool3(p, jax.lax.max, -jnp.inf)
    summed = jnp.minimum(_pool3(p, jax.lax.add, 0.0), 1.0)
    confident = p >= jnp.maximum(threshold, CONFIDENT)
    detected = confident | (is_peak & (summed >= threshold))
    presence = jnp.where(confident, p, jnp.maximum(p, summed))
    consensus = neighbour_consensus(out)
    radius = jnp.exp(consensus["log_radius"])
    return {
        "detected": detected,
        "x": consensus["x"],
        "y": consensus["y"],
        "radius": radius,
        "presence": presence,
        "composition": consensus["composition"],
        "x_std": out.offset_scale[..., 0],
        "y_std": out.offset_scale[..., 1],
        # log-normal: sd of r to first order, r * sd(log r)
        "radius_std": radius * out.log_radius_scale,
    }


def input_px(v, scale: float):
    """Work-image px -> input-image px, where the work image is the input resized by 1 /
    `scale` (pixel-centre convention: the centre of the top-left pixel is 0)."""
    return (np.asarray(v) + 0.5) * scale - 0.5


#: Columns of a droplet table that are lengths in px (scaled, not shifted, between images).
LENGTH_COLUMNS = ("radius", "x_std", "y_std", "radius_std")


def to_work_table(table: dict, scale: float) -> dict:
    """A droplet table in input-image px mapped onto the work image (see `input_px`)."""
    out = {**table, "x": (np.asarray(table["x"]) + 0.5) / scale - 0.5,
           "y": (np.asarray(table["y"]) + 0.5) / scale - 0.5}
    for col in LENGTH_COLUMNS:
        if col in table:
            out[col] = np.asarray(table[col]) / scale
    return out


def to_droplet_table(cells: dict[str, np.ndarray], shape: tuple[int, int], scale: float = 1.0):
    """The CSV table of detected droplets centred inside an image of `shape` (H, W).

    Args:
        cells: `cell_droplets` output, as numpy arrays.
        shape: (H, W) of the image the encoder saw.
        scale: input-image px per encoder px (when the image was resized before encoding);
            coordinates are mapped back with the pixel-centre convention.
    """
    h, w = shape
    x, y = cells["x"], cells["y"]
    keep = cells["detected"] & (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)
    comp = cells["composition"][keep]
    k = comp.shape[-1]
    table = {
        "x": input_px(x[keep], scale),
        "y": input_px(y[keep], scale),
        "radius": cells["radius"][keep] * scale,
        "presence": cells["presence"][keep],
    }
    for i in range(k):
        table[f"comp_{i}"] = comp[:, i]
    table["x_std"] = cells["x_std"][keep] * scale
    table["y_std"] = cells["y_std"][keep] * scale
    table["radius_std"] = cells["radius_std"][keep] * scale
    order = np.lexsort((table["x"], table["y"]))  # reading order: stable, diffable CSVs
    cols = table_columns(k, with_std=True)
    return {c: np.asarray(table[c], np.float32)[order] for c in cols}

