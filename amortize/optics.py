"""The droplet optics: a small MLP from local droplet geometry to a change of pixel colour.

As in the original per-image notebooks, one MLP is shared by every droplet and image of a
corpus. For a pixel whose nearest droplet (in radius-normalised distance) is given, it maps

    (background colour [C], dx/r, dy/r, log r, composition [K])  ->  delta [C]

and the renderer composes pixel = sigmoid(logit(background) + fade(d) * presence * delta).
log r rather than r keeps the input well scaled for radii from 1 to 40 px.

Until a decoder is learned from real images (issue 4), `default_optics_params` ships weights
fitted once to `lens_droplet`, an analytic bright-field droplet: dye absorption that grows with
the optical path through the sphere, a darker refracting rim, and a bright yellowish caustic on
the lower side that spills just past the rim, as in ../shared/data/droplets.
"""

from __future__ import annotations

import functools
import pathlib
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from amortize.layers import LayerNorm

#: Hidden layer widths of the original notebooks' optics MLP.
HIDDEN = (32, 16, 8)
#: Where the shipped, pre-fitted optics weights live (K = 3 types, C = 3 channels).
DEFAULT_OPTICS_FILE = pathlib.Path(__file__).parent / "assets" / "default_optics.msgpack"
DEFAULT_FIT_SEED = 0
DEFAULT_FIT_STEPS = 6000


class OpticsMLP(nn.Module):
    """Dense -> LayerNorm -> ReLU for each hidden width, then Dense to C channels."""

    channels: int = 3
    hidden: tuple[int, ...] = HIDDEN

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        h = features
        for width in self.hidden:
            h = nn.relu(LayerNorm()(nn.Dense(width)(h)))
        return nn.Dense(self.channels)(h)


def n_features(channels: int, n_types: int) -> int:
    """Length of the MLP's input vector."""
    return channels + 3 + n_types


@functools.partial(jax.jit, static_argnums=(1, 2))
def init_optics(key: jax.Array, channels: int = 3, n_types: int = 3) -> dict:
    """Random optics parameters (flax variables dict; jitted, as `encoder.init_encoder`)."""
    module = OpticsMLP(channels=channels)
    return module.init(key, jnp.zeros((1, n_features(channels, n_types))))


def module_for(params: dict) -> OpticsMLP:
    """The MLP whose shapes match `params` (widths are read off the kernels)."""
    layers = params["params"]
    dense = sorted((k for k in layers if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    widths = tuple(int(layers[k]["kernel"].shape[1]) for k in dense)
    return OpticsMLP(channels=widths[-1], hidden=widths[:-1])


def coarser_grid(params: dict, k: float) -> dict:
    """The same look drawn on a grid of pixels k times larger: a droplet of radius r there
    looks like one of radius k * r here.

    The MLP reads log r linearly in its first layer, so scaling every radius by k is a shift
    of that layer's bias by log(k) times the log-radius row of its kernel (exact, and it keeps
    the optics' parameter tree, so gradients to the optics still flow)."""
    if k == 1:
        return params
    layers = params["params"]
    first = layers["Dense_0"]
    row = module_for(params).channels + 2  # features: colour (C), dx / r, dy / r, log r, ...
    shifted = {**first, "bias": first["bias"] + jnp.log(jnp.float32(k)) * first["kernel"][row]}
    return {**params, "params": {**layers, "Dense_0": shifted}}


def n_types_of(params: dict) -> int:
    """K that the parameters were built for."""
    module = module_for(params)
    n_in = params["params"]["Dense_0"]["kernel"].shape[0]
    return int(n_in - module.channels - 3)


def optics_features(background_colour, dx_r, dy_r, radius, composition) -> jnp.ndarray:
    """Stack the MLP inputs; leading shapes broadcast, result (..., C + 3 + K)."""
    lead = jnp.broadcast_shapes(dx_r.shape, dy_r.shape, radius.shape)
    return jnp.concatenate(
        [
            jnp.broadcast_to(background_colour, lead + background_colour.shape[-1:]),
            dx_r[..., None],
            dy_r[..., None],
            jnp.log(radius)[..., None],
            jnp.broadcast_to(composition, lead + composition.shape[-1:]),
        ],
        axis=-1,
    )


def apply_optics(params: dict, features: jnp.ndarray) -> jnp.ndarray:
    """delta (..., C) for features (..., C + 3 + K)."""
    return module_for(params).apply(params, features)


# --- the analytic droplet the default optics are fitted to -------------------------------

#: Dye absorbance per composition type and channel (R, G, B): blue, magenta and yellow dyes.
DYE_ABSORBANCE = np.array([[1.4, 1.5, 0.1], [0.35, 1.9, 0.45], [0.15, 0.35, 1.7]], np.float32)


def dye_absorbance(n_types: int, channels: int) -> jnp.ndarray:
    """(K, C) absorbance; types beyond the three dyes cycle through them at lower strength."""
    rows = [DYE_ABSORBANCE[k % 3] * (0.7 ** (k // 3)) for k in range(n_types)]
    table = np.stack(rows)
    if channels == 1:
        table = table.mean(axis=1, keepdims=True)
    return jnp.asarray(table)


class DropletGeometry(NamedTuple):
    """What every analytic look reads from the MLP features (leading shapes kept)."""

    colour: jnp.ndarray  # background colour (..., C)
    u: jnp.ndarray  # dx / r
    v: jnp.ndarray  # dy / r
    d: jnp.ndarray  # distance from the centre / r
    inside: jnp.ndarray  # soft disc indicator
    thickness: jnp.ndarray  # path through a sphere, 1 at the centre, 0 at the rim
    size: jnp.ndarray  # small droplets are thin: grows with the radius, then saturates
    comp: jnp.ndarray  # composition (..., K)


def droplet_geometry(features: jnp.ndarray, channels: int) -> DropletGeometry:
    """Unpack optics features (..., C + 3 + K) into the quantities the analytic looks use."""
    u, v = features[..., channels], features[..., channels + 1]
    d2 = u**2 + v**2
    d = jnp.sqrt(d2 + 1e-12)
    return DropletGeometry(
        colour=features[..., :channels], u=u, v=v, d=d,
        inside=jax.nn.sigmoid((1.0 - d) * 12.0),  # soft disc edge
        thickness=jnp.sqrt(jnp.clip(1.0 - d2, 0.0, 1.0)),
        size=jax.nn.sigmoid(1.5 * (features[..., channels + 2] - 0.3)),
        comp=features[..., channels + 3 :],
    )


def lens_droplet(features: jnp.ndarray, n_types: int, channels: int) -> jnp.ndarray:
    """Analytic delta (logit units) of a lens-like droplet, same interface as the MLP."""
    colour, u, v, d, inside, thickness, size, comp = droplet_geometry(features, channels)
    absorb = (comp @ dye_absorbance(n_types, channels)) * (0.35 + 0.65 * thickness[..., None])
    delta = -inside[..., None] * size[..., None] * (0.25 + absorb)
    # Refraction darkens the rim, more on the upper side where the light is bent away.
    rim = jnp.exp(-(((d - 0.93) / 0.09) ** 2)) * (0.55 - 0.25 * v)
    delta = delta - (rim * size)[..., None]
    # Caustic: a bright spot focused on the lower side, spilling just past the rim.
    caustic_colour = jnp.asarray([1.0, 0.9, 0.15] if channels == 3 else [0.7])
    spot = jnp.exp(-(u**2 / (2 * 0.28**2) + (v - 0.72) ** 2 / (2 * 0.22**2)))
    delta = delta + (1.4 * spot * size)[..., None] * caustic_colour
    # Brighter backgrounds show the same transmittance as a larger logit change.
    return delta * (0.8 + 0.4 * colour)


def sample_optics_inputs(key: jax.Array, n: int, n_types: int, channels: int) -> jnp.ndarray:
    """Random MLP inputs covering what the renderer feeds it (d up to the render reach)."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    colour = jax.random.uniform(k1, (n, channels), minval=0.25, maxval=0.9)
    angle = jax.random.uniform(k2, (n,), maxval=2 * jnp.pi)
    d = 1.6 * jnp.sqrt(jax.random.uniform(k3, (n,)))
    log_r = jax.random.uniform(k4, (n,), minval=jnp.log(0.4), maxval=jnp.log(45.0))
    # Uniform compositions cover every mixture the Beta(1, 1) prior can draw.
    comp = jax.random.uniform(k5, (n, n_types))
    return optics_features(colour, d * jnp.cos(angle), d * jnp.sin(angle), jnp.exp(log_r), comp)


def fit_optics(
    target_fn,
    n_types: int = 3,
    channels: int = 3,
    steps: int = DEFAULT_FIT_STEPS,
    seed: int = DEFAULT_FIT_SEED,
    batch: int = 4096,
    learning_rate: float = 3e-3,
) -> tuple[dict, float]:
    """Fit the optics MLP to `target_fn(features) -> delta` by Adam on random inputs.

    Returns:
        (params, final mean squared error on a fresh batch).
    """
    key_init, key_data, key_eval = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = init_optics(key_init, channels, n_types)
    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.02)
    opt = optax.adam(schedule)

    def loss_fn(p, feats):
        return jnp.mean((apply_optics(p, feats) - target_fn(feats)) ** 2)

    @jax.jit
    def step(carry, i):
        p, state = carry
        feats = sample_optics_inputs(jax.random.fold_in(key_data, i), batch, n_types, channels)
        loss, grads = jax.value_and_grad(loss_fn)(p, feats)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    carry = (params, opt.init(params))
    carry, _ = jax.lax.scan(step, carry, jnp.arange(steps))
    params = carry[0]
    test = sample_optics_inputs(key_eval, 16384, n_types, channels)
    return params, float(loss_fn(params, test))


def fit_default_optics(n_types: int = 3, channels: int = 3, steps: int = DEFAULT_FIT_STEPS):
    """Fit the MLP to the analytic lens droplet; returns (params, mse)."""
    target = functools.partial(lens_droplet, n_types=n_types, channels=channels)
    return fit_optics(target, n_types, channels, steps=steps)


@functools.lru_cache(maxsize=8)
def _default_optics_cached(n_types: int, channels: int) -> dict:
    template = init_optics(jax.random.PRNGKey(0), channels, n_types)
    if (n_types, channels) == (3, 3) and DEFAULT_OPTICS_FILE.exists():
        loaded = serialization.from_bytes(template, DEFAULT_OPTICS_FILE.read_bytes())
        return jax.tree_util.tree_map(jnp.asarray, loaded)
    # Other K or C: fit once per process (about a minute on 2 cores at full length).
    return fit_default_optics(n_types, channels, steps=1500)[0]


def default_optics_params(n_types: int = 3, channels: int = 3) -> dict:
    """Built-in optics weights: the shipped fit for K = C = 3, otherwise fitted on demand."""
    return _default_optics_cached(int(n_types), int(channels))


def save_optics(params: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.to_bytes(params))
