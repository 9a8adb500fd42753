"""The decoder's rendering of an encoder's answer: reconstructions and their residuals.

A reconstruction renders the detected droplets (presence 1) over the background fitted to the
encoder's background map, with the model's optics. Its RMSE against the image says how much
of the image the droplet list explains, without any labels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from amortize.config import RenderConfig
from amortize.detect import DEFAULT_THRESHOLD, cell_droplets, to_droplet_table
from amortize.droplets import Background, Droplets
from amortize.encoder import EncoderConfig, encode
from amortize.render import render
from amortize.wake import fit_background

#: Droplet slots are padded to a multiple of this, so that frames with similar droplet
#: counts share one compiled renderer.
SLOT_BUCKET = 256


def slot_count(n: int) -> int:
    """Slots for n droplets: n rounded up to a multiple of `SLOT_BUCKET`."""
    return max(SLOT_BUCKET, -(-n // SLOT_BUCKET) * SLOT_BUCKET)


def droplets_from_table(table: dict[str, np.ndarray], n_types: int, slots: int = 0) -> Droplets:
    """Droplets of a table, padded with absent slots to `slot_count` (or to `slots`, when
    that is more, so that several tables stack)."""
    n = len(table["x"])
    size = max(slot_count(n), slots)

    def padded(v, fill):
        out = np.full((size,) + np.shape(v)[1:], fill, np.float32)
        out[:n] = v
        return out

    comp = np.stack([table[f"comp_{k}"] for k in range(n_types)], -1) if n else np.zeros((0, n_types))
    return Droplets(
        x=jnp.asarray(padded(table["x"], 0.0)),
        y=jnp.asarray(padded(table["y"], 0.0)),
        radius=jnp.asarray(padded(table["radius"], 1.0)),
        composition=jnp.asarray(padded(comp, 0.0)),
        presence=jnp.asarray(padded(np.ones(n), 0.0)),
    )


def render_table(table: dict[str, np.ndarray], background: Background, optics: dict,
                 shape: tuple[int, int], config: RenderConfig, n_types: int) -> np.ndarray:
    """(H, W, C) rendering of the table's droplets (all present) over `background`."""
    droplets = droplets_from_table(table, n_types)
    return np.asarray(render(droplets, optics, background, tuple(shape), config))


def reconstruct_cells(params: dict, encoder: EncoderConfig, optics: dict, image: np.ndarray,
                      config: RenderConfig, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Encode one (H, W, C) image (H, W multiples of 32) and render what it found."""
    cells, background = jax.device_get(_encode_cells(params, jnp.asarray(image), encoder=encoder,
                                                     threshold=float(threshold)))
    table = to_droplet_table(cells, image.shape[:2])
    return render_table(table, background, optics, image.shape[:2], config, encoder.n_types)


@functools.partial(jax.jit, static_argnames=("encoder", "threshold"))
def _encode_cells(params, image, *, encoder, threshold):
    """(cell estimates, background) of one image, as one program: op by op, the encoder and
    the background fit compiled about a hundred small programs in a fresh process."""
    out = encode(params, encoder, image[None])
    background = fit_background(out, image.shape[:2])
    cells = cell_droplets(jax.tree_util.tree_map(lambda a: a[0], out), threshold)
    return cells, Background(background.colour[0], background.illumination[0])


def rmse(image: np.ndarray, recon: np.ndarray) -> float:
    """Root mean squared error per channel value, both in [0, 1]."""
    return float(np.sqrt(np.mean((np.asarray(image, np.float64) - recon) ** 2)))
