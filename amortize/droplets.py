"""The scene's latent state as JAX pytrees: a fixed-capacity set of droplets and a background.

Coordinates follow the project convention: input-image pixels, the centre of the top-left
pixel is (0, 0), x grows to the right and y grows down; radii are in the same pixels.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Droplets:
    """N droplet slots; a slot with presence >= 0.5 is drawn with opacity = its presence.

    Attributes:
        x, y: centre, shape (..., N), px.
        radius: shape (..., N), px, > 0 (empty slots still need a positive radius).
        composition: shape (..., N, K), each value in [0, 1].
        presence: shape (..., N), in [0, 1].
    """

    x: jnp.ndarray
    y: jnp.ndarray
    radius: jnp.ndarray
    composition: jnp.ndarray
    presence: jnp.ndarray

    @property
    def n_slots(self) -> int:
        return self.x.shape[-1]

    @property
    def n_types(self) -> int:
        return self.composition.shape[-1]

    @classmethod
    def empty(cls, n_slots: int, n_types: int) -> "Droplets":
        """All slots absent (radius 1 so that normalised distances stay finite)."""
        zeros = jnp.zeros((n_slots,), jnp.float32)
        return cls(
            x=zeros,
            y=zeros,
            radius=jnp.ones((n_slots,), jnp.float32),
            composition=jnp.zeros((n_slots, n_types), jnp.float32),
            presence=zeros,
        )

    @classmethod
    def from_arrays(cls, x, y, radius, composition, presence=None) -> "Droplets":
        """Build from array-likes; presence defaults to 1 for every slot."""
        x = jnp.asarray(x, jnp.float32)
        composition = jnp.asarray(composition, jnp.float32)
        if composition.ndim == x.ndim:  # one type given as a flat vector
            composition = composition[..., None]
        presence = jnp.ones_like(x) if presence is None else jnp.asarray(presence, jnp.float32)
        return cls(
            x=x,
            y=jnp.asarray(y, jnp.float32),
            radius=jnp.asarray(radius, jnp.float32),
            composition=composition,
            presence=presence,
        )


@struct.dataclass
class Background:
    """Per-channel background colour times a smooth, low-order illumination field.

    In logit space: logit(bg(u, v, c)) = logit(colour[c]) + sum_k illumination[c, k] * phi_k(u, v)
    [+ field(u, v, c)], with u, v in [-1, 1] across the image and phi = (u, v, u^2 - 1/3, u v,
    v^2 - 1/3), so that the coefficients are (roughly) uncorrelated and 0 means a flat field.

    Attributes:
        colour: shape (..., C), in (0, 1).
        illumination: shape (..., C, 5), logit units.
        field: None, or shape (..., C, Gy, Gx): a smooth correction in logit units, its values
            at a Gy x Gx grid of knots spanning the image, interpolated bilinearly
            (`field_at`). Refinement fits it on enlarged copies (wide fields of tiny droplets),
            whose illumination one quadratic cannot follow; the scene model and the
            simulator leave it out.
    """

    colour: jnp.ndarray
    illumination: jnp.ndarray
    field: jnp.ndarray | None = None

    @classmethod
    def flat(cls, colour) -> "Background":
        colour = jnp.asarray(colour, jnp.float32)
        return cls(colour=colour, illumination=jnp.zeros(colour.shape + (N_ILLUMINATION,)))


#: Number of illumination basis functions (see `Background`).
N_ILLUMINATION = 5


def illumination_at(xx, yy, shape: tuple[int, int]) -> jnp.ndarray:
    """The basis phi_k at pixel coordinates xx, yy of an (H, W) image, shape (..., 5)."""
    h, w = shape
    xx, yy = jnp.asarray(xx, jnp.float32), jnp.asarray(yy, jnp.float32)
    # A one-pixel-wide axis sits at the centre of the field.
    u = -1.0 + 2.0 * xx / (w - 1) if w > 1 else jnp.zeros_like(xx)
    v = -1.0 + 2.0 * yy / (h - 1) if h > 1 else jnp.zeros_like(yy)
    return jnp.stack([u, v, u**2 - 1 / 3, u * v, v**2 - 1 / 3], axis=-1)


def illumination_basis(shape: tuple[int, int]) -> jnp.ndarray:
    """The basis phi_k over the pixel grid, shape (H, W, 5)."""
    h, w = shape
    yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    return illumination_at(xx, yy, shape)


def tent_matrix(n_knots: int, length: int) -> np.ndarray:
    """(length, n_knots) weights of linear interpolation between `n_knots` evenly spaced
    knots, the first at pixel 0 and the last at pixel length - 1 (the span of u or v)."""
    t = np.linspace(0.0, n_knots - 1.0, length) if length > 1 else np.full(1, (n_knots - 1) / 2)
    return np.maximum(0.0, 1.0 - np.abs(t[:, None] - np.arange(n_knots)[None])).astype(np.float32)


def field_at(field: jnp.ndarray, shape: tuple[int, int]) -> jnp.ndarray:
    """A knot grid (C, Gy, Gx) interpolated bilinearly onto an (H, W) image, (H, W, C).

    Two small matrix products (separable tents), not a gather: its gradient is as cheap."""
    _, gy, gx = field.shape
    h, w = shape
    return jnp.einsum("yi,cij,xj->yxc", tent_matrix(gy, h), field, tent_matrix(gx, w))


def background_logits(background: Background, shape: tuple[int, int]) -> jnp.ndarray:
    """Logit of the background at every pixel, shape (H, W, C)."""
    colour = jnp.clip(background.colour, 1e-4, 1 - 1e-4)
    field = jnp.einsum("hwk,ck->hwc", illumination_basis(shape), background.illumination)
    if background.field is not None:
        field = field + field_at(background.field, shape)
    return jnp.log(colour) - jnp.log1p(-colour) + field


#: CSV columns that every droplet table starts with (composition columns follow).
BASE_COLUMNS = ("x", "y", "radius", "presence")
#: Optional uncertainty columns, written where known.
STD_COLUMNS = ("x_std", "y_std", "radius_std")


def table_columns(n_types: int, with_std: bool = False) -> list[str]:
    """Column names of a droplet table with K = n_types composition columns."""
    cols = list(BASE_COLUMNS) + [f"comp_{k}" for k in range(n_types)]
    return cols + list(STD_COLUMNS) if with_std else cols


def to_table(
    droplets: Droplets, shape: tuple[int, int] | None = None, min_presence: float = 0.5
) -> dict[str, np.ndarray]:
    """A droplet table (column name -> 1-D numpy array) of one scene's present droplets.

    Args:
        droplets: one scene (no batch axes).
        shape: (H, W); if given, only droplets whose centre lies inside the image are kept.
        min_presence: slots with presence below this are left out.
    """
    x, y = np.asarray(droplets.x), np.asarray(droplets.y)
    keep = np.asarray(droplets.presence) >= min_presence
    if shape is not None:
        h, w = shape
        keep &= (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)
    comp = np.asarray(droplets.composition)[keep]
    table = {
        "x": x[keep],
        "y": y[keep],
        "radius": np.asarray(droplets.radius)[keep],
        "presence": np.asarray(droplets.presence)[keep],
    }
    for k in range(comp.shape[-1]):
        table[f"comp_{k}"] = comp[:, k]
    return {key: value.astype(np.float32) for key, value in table.items()}
