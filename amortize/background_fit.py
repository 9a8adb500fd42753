"""The background measured on the image itself: the pixels that no detected droplet covers.

The encoder reports a background map, and `wake.fit_background` fits the model's background
to it. That map is learned from simulated scenes, so it only knows the background colours of
its prior: a model adapted to a light slide reads the black gaps of a dark-field
condensation image as grey (0.47-0.83 where the gaps are about 0.05). Adaptation then
refits the prior to that grey, the sleep scenes keep it, and the decoder learns dark halos
around every droplet to paint the gaps.

`uncovered_background` reads the background off the image instead: a least-squares fit of
the same model (colour times a smooth illumination field, in logit units) to the pixels
farther than `MARGIN` radii from every detected droplet. Where too few such pixels are left
(a packed foam), it keeps the encoder's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from amortize.config import RenderConfig
from amortize.droplets import N_ILLUMINATION, Background, Droplets, illumination_basis
from amortize.render import from_tiles, nearest_droplet

#: Pixels count as background beyond this many radii from a droplet's centre: past the
#: rendered halo, which reaches 1.25 r.
MARGIN = 1.3
#: Below this share of uncovered pixels, the encoder's background is kept.
MIN_UNCOVERED = 0.03
#: Ridge on the illumination coefficients, as a share of the image's pixels: a field fitted
#: to a few gaps between packed droplets would otherwise swing wildly under the droplets.
ILLUMINATION_RIDGE = 0.1


def uncovered(droplets: Droplets, shape: tuple[int, int], config: RenderConfig,
              margin: float = MARGIN) -> jnp.ndarray:
    """(H, W) True where no present droplet lies within `margin` radii. Found from each
    pixel's nearest droplet (the renderer's tiles), not from a pixels x droplets array."""
    index, layout = nearest_droplet(droplets, shape, config)
    safe = jnp.maximum(index, 0)
    py, px = layout.pixel_coordinates()
    d2 = ((px - droplets.x[safe]) ** 2 + (py - droplets.y[safe]) ** 2) / droplets.radius[safe] ** 2
    free = (index < 0) | (d2 > margin**2)
    return from_tiles(free, layout)


@functools.partial(jax.jit, static_argnames=("shape", "config"))
def uncovered_background(image: jnp.ndarray, droplets: Droplets, fallback: Background,
                         shape: tuple[int, int], config: RenderConfig) -> Background:
    """The background fitted to `image` (H, W, C)'s pixels outside `droplets`, or `fallback`
    (the encoder's) when fewer than `MIN_UNCOVERED` of them are left."""
    weight = uncovered(droplets, shape, config).astype(jnp.float32).reshape(-1)
    basis = illumination_basis(shape).reshape(-1, N_ILLUMINATION)
    design = jnp.concatenate([jnp.ones((basis.shape[0], 1)), basis], -1)  # (P, 6)
    target = jnp.clip(image, 1e-3, 1 - 1e-3).reshape(-1, image.shape[-1])
    target = jnp.log(target) - jnp.log1p(-target)
    ridge = jnp.concatenate([jnp.full(1, 1e-3), jnp.full(N_ILLUMINATION, ILLUMINATION_RIDGE * weight.shape[0])])
    gram = (design * weight[:, None]).T @ design + jnp.diag(ridge)
    coef = jnp.linalg.solve(gram, (design * weight[:, None]).T @ target)  # (6, C)
    enough = jnp.mean(weight) >= MIN_UNCOVERED
    colour = jnp.where(enough, jax.nn.sigmoid(coef[0]), fallback.colour)
    illumination = jnp.where(enough, coef[1:].T, fallback.illumination)
    return Background(colour, illumination)
