"""From per-cell distributions to a list of droplets: peak finding compiled with jit.

The set likelihood lets one droplet's presence spread over neighbouring cells (it sits on a
cell border). A cell is reported when its own presence is high, or when it is the local
maximum of its 3 x 3 neighbourhood and the neighbourhood's summed presence is high; the
reported presence is then that sum (capped at 1). This is DECODE's post-processing, and
costs a couple of pooling passes over the cell grid, independent of the droplet count.
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
#: Default presence threshold: best F1 of the shipped model on the validation set (seed 555).
DEFAULT_THRESHOLD = 0.4


def _pool3(a: jnp.ndarray, op, init) -> jnp.ndarray:
    return jax.lax.reduce_window(a, init, op, (3, 3), (1, 1), "SAME")


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
    xx, yy = cell_centres(p.shape, out.stride)
    radius = jnp.exp(out.log_radius)
    return {
        "detected": detected,
        "x": xx + out.offset[..., 0],
        "y": yy + out.offset[..., 1],
        "radius": radius,
        "presence": presence,
        "composition": out.composition,
        "x_std": out.offset_scale[..., 0],
        "y_std": out.offset_scale[..., 1],
        # log-normal: sd of r to first order, r * sd(log r)
        "radius_std": radius * out.log_radius_scale,
    }


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

    def to_input(v):
        return (v + 0.5) * scale - 0.5

    table = {
        "x": to_input(x[keep]),
        "y": to_input(y[keep]),
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

