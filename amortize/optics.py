"""The droplet optics: a small MLP from local droplet geometry to a change of pixel colour.

As in the original per-image notebooks, one MLP is shared by every droplet and image of a
corpus. For a pixel whose nearest droplet (in radius-normalised distance) is given, it maps

    (background colour [C], dx/r, dy/r, log r, composition [K])  ->  delta [C]

and the renderer composes pixel = sigmoid(logit(background) + fade(d) * presence * delta).
log r rather than r keeps the input well scaled for radii from 1 to 40 px.

`default_optics_params` ships weights fitted once to `lens_droplet`, an analytic bright-field
droplet: dye absorption that grows with the optical path through the sphere, a darker refracting
rim, and a bright yellowish caustic on the lower side that spills just past the rim, as in
../shared/data/droplets.

Two geometries (`optics_delta` tells them apart by the parameters' tree):

* *free* (`init_optics`): the MLP's C outputs are the delta itself, anywhere out to the
  renderer's reach. Fitted to a real corpus, the MLP is free to paint a droplet's appearance
  off centre or larger than its disc, and then the latents x, y, r no longer mean centre and
  radius (on ../shared/data/droplets the adapted optics put a droplet's contrast centroid
  2.8 px above its latent centre).
* *anchored* (`init_anchored`): the footprint is the disc of radius r about (x, y), with a
  soft edge whose width is a learned blur shared by the corpus (`edge.log_blur`), and the
  MLP only colours it: 2C outputs, the colour inside (read at the pixel's position, but no
  closer to the rim than 1 - RIM_BAND radii) and a tail colour for the ring r ... 1.5 r.
  The tail has no component along the droplet's core colour (its colour at the centre): it
  can add other colours or light outside the droplet (the yellow caustic below the droplets
  of ../shared/data/droplets) but never continue the droplet's own contrast, so along the
  core colour the 50 % transition between the background and the rim lies at exactly r in
  every direction, whatever the weights are.
"""

from __future__ import annotations

import functools
import math
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


#: Anchored geometry: the tail outside the disc is flat out to TAIL_FLAT radii and gone at
#: TAIL_OUTER (the renderer's default fade_start and reach; the renderer passes its own, so a
#: recipe with a longer reach draws a longer tail); its size is at most TAIL_MAX times the core
#: colour's. Earlier tails that could darken in the droplet's own colour (a ring r ... 1.25 r
#: allowed half the rim's darkness) drew the soft upper edge of the slide's droplets with the
#: tail and let the disc sit 1.2 px low; one that could only brighten, per channel, could not
#: draw the yellow light below them, and the discs grew to cover it.
TAIL_FLAT = 1.2
TAIL_OUTER = 1.5
TAIL_MAX = 1.0
#: Starting edge blur (Gaussian sd of the point-spread, px) of anchored optics.
EDGE_BLUR_INIT = 0.7
#: Anchored optics read the inside colour no closer to the rim than 1 - RIM_BAND radii: the
#: band just inside the edge has the colour found there, so that a learned look cannot fade
#: the droplet out before its rim and make it look smaller than its radius.
RIM_BAND = 0.2
#: Starting strength of the blur of the droplet's shading (`shading_blur`): the shading's
#: variation across the droplet keeps exp(-(k * blur / r)^2 / 2) of itself, k = this.
SHADING_BLUR_INIT = 2.0
#: Where the shipped anchored fit of the built-in droplet lives (K = 3 types, C = 3 channels).
ANCHORED_OPTICS_FILE = pathlib.Path(__file__).parent / "assets" / "default_optics_anchored.msgpack"


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


@functools.partial(jax.jit, static_argnums=(1, 2))
def init_anchored(key: jax.Array, channels: int = 3, n_types: int = 3) -> dict:
    """Random anchored optics: an MLP with 2C outputs (inside colour, raw tail colour) and the
    edge blur."""
    module = OpticsMLP(channels=2 * channels)
    params = module.init(key, jnp.zeros((1, n_features(channels, n_types))))
    return {**params, "edge": {"log_blur": jnp.log(jnp.float32(EDGE_BLUR_INIT))}}


def is_anchored(params: dict) -> bool:
    """Whether `params` are anchored optics (see the module's docstring)."""
    return "edge" in params


def edge_blur(params: dict) -> jnp.ndarray:
    """The anchored edge's blur: the sd (px) of the Gaussian point-spread it approximates,
    the same for every droplet (a size-dependent blur, tried on ../shared/data/droplets,
    grew to 0.13 r and let small droplets be drawn a third too large)."""
    return jnp.exp(params["edge"]["log_blur"])


def with_shading_blur(params: dict, strength: float = SHADING_BLUR_INIT) -> dict:
    """Anchored optics whose point-spread also blurs the droplet's shading (see
    `shading_keep`), starting at `strength`; optics that have it already keep theirs."""
    if "log_shading_blur" in params["edge"]:
        return params
    return {**params, "edge": {**params["edge"], "log_shading_blur": jnp.log(jnp.float32(strength))}}


def shading_keep(params: dict, radius: jnp.ndarray) -> jnp.ndarray:
    """How much of the shading's variation across a droplet of `radius` px the point-spread
    leaves: exp(-(k * blur / r)^2 / 2), a Gaussian blur's gain for a pattern whose wave
    number is k / r, with k learned (`edge.log_shading_blur`). 1 for optics without it.

    The MLP draws a droplet's shading sharp. Under a 2 px blur a droplet of radius 2-5 px shows
    none of the caustic that a large one shows below its centre (on ../shared/data/droplets
    their profiles are the same above and below), yet the MLP, which learned the caustic on
    large droplets, drew the small ones dark above and light below; scenes drawn so taught the
    encoder to put small droplets' centres 0.4 px low."""
    if "log_shading_blur" not in params["edge"]:
        return jnp.ones_like(radius)
    k = jnp.exp(params["edge"]["log_shading_blur"])
    return jnp.exp(-0.5 * (k * edge_blur(params) / radius) ** 2)


def module_for(params: dict) -> OpticsMLP:
    """The MLP whose shapes match `params` (widths are read off the kernels)."""
    layers = params["params"]
    dense = sorted((k for k in layers if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    widths = tuple(int(layers[k]["kernel"].shape[1]) for k in dense)
    return OpticsMLP(channels=widths[-1], hidden=widths[:-1])


def channels_of(params: dict) -> int:
    """Image channels C that the optics draw."""
    out = module_for(params).channels
    return out // 2 if is_anchored(params) else out


def _with_inputs_offset(params: dict, offsets: dict) -> dict:
    """The same MLP reading feature `row` plus `offsets[row]`: its first layer is linear, so
    that is one shift of the layer's bias (exact, and it keeps the parameter tree, so
    gradients to the optics still flow)."""
    layers = params["params"]
    first = layers["Dense_0"]
    bias = first["bias"] + sum(amount * first["kernel"][row] for row, amount in offsets.items())
    return {**params, "params": {**layers, "Dense_0": {**first, "bias": bias}}}


def coarser_grid(params: dict, k: float) -> dict:
    """The same look drawn on a grid of pixels k times larger: a droplet of radius r there
    looks like one of radius k * r here: the MLP reads log r + log k, and an anchored edge
    blur, in px, is k times smaller."""
    if k == 1:
        return params
    row = channels_of(params) + 2  # features: colour (C), dx / r, dy / r, log r, ...
    out = _with_inputs_offset(params, {row: jnp.log(jnp.float32(k))})
    return with_edge_blur_scaled(out, 1.0 / jnp.float32(k)) if is_anchored(params) else out


def with_edge_blur_scaled(params: dict, factor: jnp.ndarray) -> dict:
    """Anchored optics whose edge blur is `factor` times theirs (the edge stays at r)."""
    return {**params, "edge": {**params["edge"], "log_blur": params["edge"]["log_blur"] + jnp.log(factor)}}


def with_shading_shifted(params: dict, du: jnp.ndarray, dv: jnp.ndarray) -> dict:
    """Anchored optics whose colouring is moved by (du, dv) radii: the droplet's shading, its
    caustic and the darkness along its rim move, and its disc and edge stay (the MLP reads
    dx / r - du and dy / r - dv).

    Real droplets lit a little off axis have their shading off centre; scenes drawn with
    shifted shading teach the encoder to read a droplet's centre from its edge."""
    c = channels_of(params)
    return _with_inputs_offset(params, {c: -du, c + 1: -dv})


def n_types_of(params: dict) -> int:
    """K that the parameters were built for."""
    n_in = params["params"]["Dense_0"]["kernel"].shape[0]
    return int(n_in - channels_of(params) - 3)


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
    """The MLP's raw outputs for features (..., C + 3 + K): (..., C) for free optics, the
    delta itself; (..., 2C) for anchored ones (see `optics_delta`)."""
    return module_for(params).apply({"params": params["params"]}, features)


def edge_profile(dist: jnp.ndarray, radius: jnp.ndarray, blur: jnp.ndarray) -> jnp.ndarray:
    """The disc's soft indicator at `dist` px from the centre: exactly 0.5 at the rim; a
    logistic whose sd equals the blur's (the logistic scale is blur * sqrt(3) / pi)."""
    scale = blur * (math.sqrt(3.0) / math.pi)
    return jax.nn.sigmoid((radius - dist) / scale)


def tail_profile(d: jnp.ndarray, flat: float = TAIL_FLAT, outer: float = TAIL_OUTER) -> jnp.ndarray:
    """Where the tail is drawn: 0 inside the disc (d <= 1), 1 out to `flat` radii, then a
    smooth fall to 0 at `outer`."""
    s = jnp.clip((d - flat) / (outer - flat), 0.0, 1.0)
    return jnp.where(d > 1.0, 0.5 * (1.0 + jnp.cos(jnp.pi * s)), 0.0)


def tail_colour(raw: jnp.ndarray, core: jnp.ndarray) -> jnp.ndarray:
    """The tail's colour (..., C) from the MLP's raw outputs: at most TAIL_MAX times the core
    colour's size, with no component along the core colour (it may brighten away from it or
    add other colours, never continue the droplet's own contrast)."""
    size = jnp.sqrt(jnp.sum(core**2, axis=-1, keepdims=True) + 1e-12)
    t = TAIL_MAX * size * raw / jnp.sqrt(1.0 + jnp.sum(raw**2, axis=-1, keepdims=True))
    along = core / size
    return t - jax.nn.relu(jnp.sum(t * along, axis=-1, keepdims=True)) * along


def optics_delta(params: dict, features: jnp.ndarray, tail_flat: float = TAIL_FLAT,
                 tail_outer: float = TAIL_OUTER) -> jnp.ndarray:
    """The droplet's change of the pixel logit, (..., C), for features (..., C + 3 + K).
    The renderer passes its `fade_start` and `reach` as `tail_flat` and `tail_outer`.

    Free optics: the MLP's output. Anchored optics: with d = |(dx, dy)| / r and E the soft
    disc (`edge_profile`, 0.5 at d = 1),

        delta = E * inside + (1 - 2 E) * tail_profile(d) * tail,

    where `inside` is the MLP's colour at the pixel's position pulled to
    d <= 1 - RIM_BAND (so that the band inside the rim has the rim colour), its variation
    about `core`, the colour at the centre, kept in the part the blur leaves
    (`shading_keep`), and `tail` (`tail_colour`) a colour that never points along `core`.
    Projected on the core colour, delta . core <= E inside . core outside the disc: along
    any ray whose rim has the droplet's contrast, the last crossing of half the rim's
    contrast is at d = 1, and the tail (light refracted past the droplet, the yellow caustic
    below the droplets of ../shared/data/droplets) cannot draw the droplet larger.
    """
    if not is_anchored(params):
        return apply_optics(params, features)
    c = channels_of(params)
    u, v, log_r = features[..., c], features[..., c + 1], features[..., c + 2]
    d = jnp.sqrt(u**2 + v**2 + 1e-12)
    pull = (1.0 - RIM_BAND) / jnp.maximum(d, 1.0 - RIM_BAND)
    on_disc = features.at[..., c].set(u * pull).at[..., c + 1].set(v * pull)
    out = apply_optics(params, on_disc)
    inside, raw_tail = out[..., :c], out[..., c:]
    core = apply_optics(params, features.at[..., c].set(0.0).at[..., c + 1].set(0.0))[..., :c]
    radius = jnp.exp(log_r)
    inside = core + shading_keep(params, radius)[..., None] * (inside - core)
    edge = edge_profile(d * radius, radius, edge_blur(params))[..., None]
    tail = ((1.0 - 2.0 * edge) * tail_profile(d, tail_flat, tail_outer)[..., None]) * tail_colour(raw_tail, core)
    return edge * inside + tail


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


def sample_optics_inputs(key: jax.Array, n: int, n_types: int, channels: int,
                         colour_range: tuple[float, float] = (0.25, 0.9)) -> jnp.ndarray:
    """Random MLP inputs covering what the renderer feeds it (d up to the render reach), on
    backgrounds of colour values in `colour_range`."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    colour = jax.random.uniform(k1, (n, channels), minval=colour_range[0], maxval=colour_range[1])
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
    anchored: bool = False,
    colour_range: tuple[float, float] = (0.25, 0.9),
) -> tuple[dict, float]:
    """Fit optics (free, or `anchored` with their edge blur) to `target_fn(features) -> delta`
    by Adam on random inputs, on backgrounds with colour values in `colour_range`.

    Returns:
        (params, final mean squared error on a fresh batch).
    """
    key_init, key_data, key_eval = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = (init_anchored if anchored else init_optics)(key_init, channels, n_types)
    schedule = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.02)
    opt = optax.adam(schedule)

    def loss_fn(p, feats):
        return jnp.mean((optics_delta(p, feats) - target_fn(feats)) ** 2)

    @jax.jit
    def step(carry, i):
        p, state = carry
        feats = sample_optics_inputs(jax.random.fold_in(key_data, i), batch, n_types, channels,
                                     colour_range)
        loss, grads = jax.value_and_grad(loss_fn)(p, feats)
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    carry = (params, opt.init(params))
    carry, _ = jax.lax.scan(step, carry, jnp.arange(steps))
    params = carry[0]
    test = sample_optics_inputs(key_eval, 16384, n_types, channels, colour_range)
    return params, float(loss_fn(params, test))


def fit_default_optics(n_types: int = 3, channels: int = 3, steps: int = DEFAULT_FIT_STEPS,
                       anchored: bool = False):
    """Fit the optics to the analytic lens droplet; returns (params, mse)."""
    target = functools.partial(lens_droplet, n_types=n_types, channels=channels)
    return fit_optics(target, n_types, channels, steps=steps, anchored=anchored)


@functools.lru_cache(maxsize=8)
def _default_optics_cached(n_types: int, channels: int, anchored: bool) -> dict:
    init = init_anchored if anchored else init_optics
    path = ANCHORED_OPTICS_FILE if anchored else DEFAULT_OPTICS_FILE
    template = init(jax.random.PRNGKey(0), channels, n_types)
    if (n_types, channels) == (3, 3) and path.exists():
        loaded = serialization.from_bytes(template, path.read_bytes())
        return jax.tree_util.tree_map(jnp.asarray, loaded)
    # Other K or C: fit once per process (about a minute on 2 cores at full length).
    return fit_default_optics(n_types, channels, steps=1500, anchored=anchored)[0]


def default_optics_params(n_types: int = 3, channels: int = 3, anchored: bool = False) -> dict:
    """Built-in optics weights (free, or `anchored`): the shipped fit for K = C = 3,
    otherwise fitted on demand."""
    return _default_optics_cached(int(n_types), int(channels), bool(anchored))


def save_optics(params: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.to_bytes(params))
