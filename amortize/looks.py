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
    rim    dark field or dropwise condensation: a dark disc with a bright rim (the rim's
           outer edge is the radius) and often a small bright spot in the middle; fitted on
           backgrounds from near black to near white, as dark fields are dark
    halo   phase contrast: a dark disc with a diffuse bright halo that starts at its edge
           and fades outward over about a fifth of a radius
    outline  bright-field clear droplet in an emulsion: a dark refracting outline whose outer
           edge is the radius, a lens-bright middle and a faint tint
    foam   a bubble in a foam or a packed emulsion: bright inside, a thick dark border

Each look's radius is the droplet's physical outline, as a user would measure it: the outer
edge of a dark outline or of a bright rim, not the halo beyond it.

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


def emission(n_types: int, channels: int) -> jnp.ndarray:
    """(K, C) emission of each composition type: `EMISSION`, dimmer for types beyond three,
    averaged over the channels of a grey image."""
    table = np.stack([EMISSION[k % 3] * (0.7 ** (k // 3)) for k in range(n_types)])
    return jnp.asarray(table.mean(axis=1, keepdims=True) if channels == 1 else table)


def glow_droplet(features: jnp.ndarray, n_types: int, channels: int) -> jnp.ndarray:
    g = droplet_geometry(features, channels)
    light = 0.3 + g.comp @ emission(n_types, channels)
    profile = g.inside * (0.35 + 0.65 * g.thickness) * g.size
    return profile[..., None] * light * (1.2 - 0.4 * g.colour)


def _light(g, n_types: int, channels: int) -> jnp.ndarray:
    """A light colour set by the composition: white-ish, tinted towards its dyes' emission."""
    return 0.7 + 0.3 * (g.comp @ emission(n_types, channels)) / 1.3


def rim_droplet(features: jnp.ndarray, n_types: int, channels: int) -> jnp.ndarray:
    g = droplet_geometry(features, channels)
    rim = jnp.exp(-(((g.d - 0.92) / 0.09) ** 2))
    spot = jnp.exp(-((g.d / 0.14) ** 2))
    light = (3.2 * rim + 0.8 * spot)[..., None] * _light(g, n_types, channels)
    return g.size[..., None] * (light - 0.5 * g.inside[..., None])


def halo_droplet(features: jnp.ndarray, n_types: int, channels: int) -> jnp.ndarray:
    g = droplet_geometry(features, channels)
    tint = 0.4 * (g.comp @ dye_absorbance(n_types, channels))
    dark = -g.inside[..., None] * (1.0 + tint) * (0.5 + 0.5 * g.thickness[..., None])
    # The halo starts at the edge and fades outward over about a fifth of a radius: diffuse,
    # unlike the rim look's thin bright ring *inside* a sharp outer edge. Drawn as a thin
    # ring just outside the edge, the two were one profile at radii 1.2x apart, and a model
    # trained on both put dark-field droplets' edges on the inner side of their rims.
    outside = jax.nn.sigmoid((g.d - 1.0) / 0.02)
    halo = 1.3 * outside * jnp.exp(-((jnp.maximum(g.d - 1.0, 0.0) / 0.22) ** 2))
    return g.size[..., None] * (dark + halo[..., None]) * (0.8 + 0.4 * g.colour)


def outline_droplet(features: jnp.ndarray, n_types: int, channels: int) -> jnp.ndarray:
    g = droplet_geometry(features, channels)
    tint = 0.3 * (g.comp @ dye_absorbance(n_types, channels)) * g.thickness[..., None]
    band = -1.9 * jnp.exp(-(((g.d - 0.91) / 0.085) ** 2))
    lens = 0.35 * jnp.exp(-((g.d / 0.5) ** 2))
    delta = (band + lens)[..., None] - g.inside[..., None] * tint
    return g.size[..., None] * delta * (0.8 + 0.4 * g.colour)


def foam_droplet(features: jnp.ndarray, n_types: int, channels: int) -> jnp.ndarray:
    g = droplet_geometry(features, channels)
    band = -2.2 * jnp.exp(-(((g.d - 0.9) / 0.1) ** 2))
    bright = 0.7 * g.inside * jnp.clip(1.0 - g.d / 0.85, 0.0, 1.0) ** 0.5
    tint = 0.25 * (g.comp @ dye_absorbance(n_types, channels))
    delta = (band + bright)[..., None] - g.inside[..., None] * tint
    return g.size[..., None] * delta * (0.8 + 0.4 * g.colour)


LOOKS = {"ring": ring_droplet, "disc": disc_droplet, "glow": glow_droplet, "rim": rim_droplet,
         "halo": halo_droplet, "outline": outline_droplet, "foam": foam_droplet}
#: Background colour values each look is fitted on (`optics.sample_optics_inputs`); the
#: first three looks keep the range their shipped weights were fitted on.
COLOUR_RANGE = {"rim": (0.05, 0.95), "halo": (0.05, 0.95), "outline": (0.05, 0.95),
                "foam": (0.05, 0.95)}


def look_file(name: str) -> pathlib.Path:
    return ASSETS / f"look_{name}.msgpack"


def fit_look(name: str, n_types: int = 3, channels: int = 3, steps: int = 4000) -> tuple[dict, float]:
    """Fit the optics MLP to look `name`; returns (params, held-out mse)."""
    target = functools.partial(LOOKS[name], n_types=n_types, channels=channels)
    return fit_optics(target, n_types, channels, steps=steps, seed=DEFAULT_FIT_SEED,
                      colour_range=COLOUR_RANGE.get(name, (0.25, 0.9)))


@functools.lru_cache(maxsize=16)
def look_params(name: str, n_types: int = 3, channels: int = 3) -> dict:
    """Optics MLP weights of look `name`: the shipped fit for K = C = 3, else fitted now.

    Evaluated eagerly even when first asked for inside a jitted step (the cache must hold
    values, not that trace's tracers).
    """
    if name not in LOOKS:
        raise KeyError(name)
    with jax.ensure_compile_time_eval():
        template = init_optics(jax.random.PRNGKey(0), channels, n_types)
        path = look_file(name)
        if (n_types, channels) == (3, 3) and path.exists():
            loaded = serialization.from_bytes(template, path.read_bytes())
            return jax.tree_util.tree_map(jnp.asarray, loaded)
        return fit_look(name, n_types, channels, steps=1500)[0]
