"""Other droplet appearances, so that training does not lock onto one microscope's look.

The built-in optics (`optics.lens_droplet`) are a dyed droplet in bright field: absorption
growing with the path through the sphere, a dark rim and a yellow caustic. Other
microscopes show droplets quite differently, and an encoder that has only seen one look
misses the rest. Simulation training can therefore mix in these analytic looks, each fitted
once to the same optics MLP (so the renderer and the decoder are unchanged):

    ring   bright-field emulsion: a clear droplet whose refracting edge is a thick dark ring,
           with a faint tint inside and a thin bright halo just outside
    disc   silhouette: a flat, strongly absorbing disc with a soft edge
    glow   fluorescence: a disc brighter than the background, brightest in the middle,
           its colour set by the composition

All share `lens_droplet`'s interface: features (..., C + 3 + K) -> delta (..., C) in logit
units. Weights for K = C = 3 ship in `amortize/assets/look_<name>.msgpack` (recipe:
`train/fit_looks.py`); other K or C are fitted on first use.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from amortize.optics import DEFAULT_FIT_SEED, droplet_geometry, dye_absorbance, fit_optics, init_optics

ASSETS = pathlib.Path(__file__).parent / "assets"
#: Dye-like emission per composition type and channel for the fluorescent look.
EMISSION = np.array([[1.3, 0.25, 0.1], [0.15, 1.3, 0.3], [0.2, 0.35, 1.3]], np.float32)


def ring_droplet(features: jnp.ndarray, n_types: int, channels: int) -> jnp.ndarray:
    g = droplet_geometry(features, channels)
    tint = 0.35 * (g.comp @ dye_absorbance(n_types, channels)) * g.thickness[..., None]
    ring = jnp.exp(-(((g.d - 0.86) / 0.11) ** 2))
    halo = jnp.exp(-(((g.d - 1.12) / 0.08) ** 2))
    delta = -g.inside[..., None] * g.size[..., None] * (0.05 + tint)
    delta = delta + (g.size * (0.3 * halo - 1.4 * ring))[..., None]
    return delta * (0.8 + 0.4 * g.colour)


def disc_droplet(features: jnp.ndarray, n_types: int, channels: int) -> jnp.ndarray:
    g = droplet_geometry(features, channels)
    absorb = 0.4 + 0.6 * (g.comp @ dye_absorbance(n_types, channels))
    return -(g.inside * g.size)[..., None] * absorb * (0.8 + 0.4 * g.colour)


def glow_droplet(features: jnp.ndarray, n_types: int, channels: int) -> jnp.ndarray:
    g = droplet_geometry(features, channels)
    emission = np.stack([EMISSION[k % 3] * (0.7 ** (k // 3)) for k in range(n_types)])
    if channels == 1:
        emission = emission.mean(axis=1, keepdims=True)
    light = 0.3 + g.comp @ jnp.asarray(emission)
    profile = g.inside * (0.35 + 0.65 * g.thickness) * g.size
    return profile[..., None] * light * (1.2 - 0.4 * g.colour)


LOOKS = {"ring": ring_droplet, "disc": disc_droplet, "glow": glow_droplet}


def look_file(name: str) -> pathlib.Path:
    return ASSETS / f"look_{name}.msgpack"


def fit_look(name: str, n_types: int = 3, channels: int = 3, steps: int = 4000) -> tuple[dict, float]:
    """Fit the optics MLP to look `name`; returns (params, held-out mse)."""
    target = functools.partial(LOOKS[name], n_types=n_types, channels=channels)
    return fit_optics(target, n_types, channels, steps=steps, seed=DEFAULT_FIT_SEED)


@functools.lru_cache(maxsize=16)
def look_params(name: str, n_types: int = 3, channels: int = 3) -> dict:
    """Optics MLP weights of look `name`: the shipped fit for K = C = 3, else fitted now."""
    if name not in LOOKS:
        raise KeyError(name)
    template = init_optics(jax.random.PRNGKey(0), channels, n_types)
    path = look_file(name)
    if (n_types, channels) == (3, 3) and path.exists():
        loaded = serialization.from_bytes(template, path.read_bytes())
        return jax.tree_util.tree_map(jnp.asarray, loaded)
    return fit_look(name, n_types, channels, steps=1500)[0]
