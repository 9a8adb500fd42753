"""The amortized encoder: a fully convolutional network from an image to per-cell droplets.

A small U-Net. It goes down to 1/32 of the input resolution, so its receptive field spans
well over 100 px and covers the largest droplets (radius 40 px), and comes back up to an
output grid of stride 2 or 4 px (`EncoderConfig.stride`). Every output cell predicts at most
one droplet, so the stride bounds how close two droplets can sit and still both be found:

    presence logit, centre offset (mean, scale) in px, log radius (mean, scale),
    composition (mean, scale) per type, and the local background colour.

Normalisation is LayerNorm over channels at each position (never BatchNorm, and never
statistics pooled over the image), so that a cell's output depends only on the pixels in
its receptive field: tiling a large image changes nothing, and so does an image shift.
Images are standardised per channel by `standardise` *before* the network with statistics of
the whole image, for the same reason. Models with `log_odds_input` also read each channel's
log-odds (`input_features`), the space in which the decoder adds a droplet's absorbance.

Coordinates: cell (i, j) of a grid of stride s is centred at pixel ((j + 0.5) * s - 0.5,
(i + 0.5) * s - 0.5) in the project convention (centre of the top-left pixel is (0, 0)).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from amortize.config import _check
from amortize.layers import LayerNorm

#: Output grid strides (px per cell) the U-Net can end at.
STRIDES = (2, 4)
#: Total downsampling of the deepest level; inputs are padded to a multiple of it.
ALIGN = 32
#: Offsets are bounded to +-OFFSET_REACH cells around the cell centre, so that a droplet on a
#: cell border can be claimed by either neighbour.
OFFSET_REACH = 1.0
#: Added to the image's standard deviation when standardising, so that a blank frame does
#: not blow its noise up to unit variance.
STD_FLOOR = 0.02
#: Smallest scale of any Gaussian head (keeps the set likelihood bounded).
MIN_SCALE = {"offset": 0.02, "log_radius": 0.005, "composition": 0.01}
#: Pixels are clipped to [LOG_ODDS_EPS, 1 - LOG_ODDS_EPS], half an 8-bit level, before their
#: log-odds are taken, so that black and white pixels stay finite.
LOG_ODDS_EPS = 0.5 / 255


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Widths of the U-Net levels at strides 2, 4, 8, 16 and 32, output stride and head sizes.

    Attributes:
        widths: channels at each level, finest first (exactly 5 levels).
        stride: px per output cell, 2 or 4. Checkpoints saved before this field existed
            are stride 4, hence the default.
        head_width: channels of the extra 3 x 3 layers at the output stride.
        head_depth: number of those layers.
        n_types: K, the composition length.
        channels: C, the image channels (after conversion to RGB, 3).
        log_odds_input: also feed the network each channel's log-odds (see
            `input_features`). Checkpoints saved before this field existed read intensity
            only, hence the default.
    """

    widths: tuple[int, ...] = (24, 48, 64, 96, 128)
    stride: int = 4
    head_width: int = 48
    head_depth: int = 1
    n_types: int = 3
    channels: int = 3
    log_odds_input: bool = False

    def __post_init__(self) -> None:
        _check(len(self.widths) == 5, "widths", "need exactly 5 levels (strides 2..32)")
        _check(all(w >= 4 for w in self.widths), "widths", "every width must be >= 4")
        _check(self.stride in STRIDES, "stride", f"must be one of {STRIDES}")
        _check(self.head_width >= 4, "head_width", "must be >= 4")
        _check(self.head_depth >= 0, "head_depth", "must be >= 0")
        _check(self.n_types >= 1, "n_types", "must be at least 1")

    @classmethod
    def tiny(cls) -> "EncoderConfig":
        return cls(widths=(4, 8, 8, 8, 8), head_width=8, head_depth=1)

    @property
    def n_outputs(self) -> int:
        return 1 + 4 + 2 + 2 * self.n_types + self.channels

    @property
    def input_channels(self) -> int:
        """Channels the network reads: the image's, doubled by `log_odds_input`."""
        return self.channels * (2 if self.log_odds_input else 1)


@struct.dataclass
class CellOutputs:
    """Per-cell predictions on the (Hc, Wc) output grid (leading batch axes allowed).

    Attributes:
        logit: presence logit, (..., Hc, Wc).
        offset: centre offset from the cell centre (dx, dy), px, (..., Hc, Wc, 2).
        offset_scale: its standard deviation, px, (..., Hc, Wc, 2).
        log_radius: mean of log radius (px), (..., Hc, Wc).
        log_radius_scale: its standard deviation, (..., Hc, Wc).
        composition: mean composition in [0, 1], (..., Hc, Wc, K).
        composition_scale: its standard deviation, (..., Hc, Wc, K).
        background: local background colour in [0, 1], (..., Hc, Wc, C).
        stride: px per cell (static, not an array).
    """

    logit: jnp.ndarray
    offset: jnp.ndarray
    offset_scale: jnp.ndarray
    log_radius: jnp.ndarray
    log_radius_scale: jnp.ndarray
    composition: jnp.ndarray
    composition_scale: jnp.ndarray
    background: jnp.ndarray
    stride: int = struct.field(pytree_node=False, default=4)


def _block(x: jnp.ndarray, width: int, strides: int = 1, name: str | None = None) -> jnp.ndarray:
    x = nn.Conv(width, (3, 3), strides=(strides, strides), padding="SAME", name=name)(x)
    return nn.relu(LayerNorm()(x))


class Encoder(nn.Module):
    """(B, H, W, C) standardised image, H and W multiples of `ALIGN` -> raw (B, H/s, W/s, n)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        w2, w4, w8, w16, w32 = self.config.widths
        x2 = _block(z, w2, strides=2)
        x4 = _block(_block(x2, w4, strides=2), w4)
        x8 = _block(_block(x4, w8, strides=2), w8)
        x16 = _block(_block(x8, w16, strides=2), w16)
        x32 = _block(_block(x16, w32, strides=2), w32)
        up = _block(_upsample(x32), w16) + x16
        up = _block(_upsample(_block(up, w16)), w8) + x8
        up = _block(_upsample(_block(up, w8)), w4) + x4
        for _ in range(self.config.head_depth):
            up = _block(up, self.config.head_width)
        n = self.config.n_outputs
        # Small initial weights: every head starts near its offset in `decode_outputs`.
        small = nn.initializers.variance_scaling(0.1, "fan_in", "normal")
        if self.config.stride == 4:
            return nn.Conv(n, (1, 1), kernel_init=small, name="head")(up)
        # Stride 2: each 4 px cell's features give the outputs of its 2 x 2 sub-cells (a
        # sub-pixel, depth-to-space head), and a linear read-out of the stride-2 features adds
        # the fine detail. Two droplets 2 px apart thus get cells of their own, for a few
        # per cent more compute, where a full U-Net level at stride 2 costs half as much again.
        sub = nn.Conv(4 * n, (1, 1), kernel_init=small, name="head")(up)
        fine = nn.Conv(n, (1, 1), kernel_init=small, name="head_fine")(x2)
        return _depth_to_space(sub, n) + fine


def _upsample(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


def _depth_to_space(x: jnp.ndarray, n: int) -> jnp.ndarray:
    """(B, H, W, 4 n) -> (B, 2 H, 2 W, n); channel block 2 a + b goes to sub-cell (a, b)."""
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, 2, 2, n).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, 2 * h, 2 * w, n)


#: Presence starts near the prior rate of a droplet per cell (about 2 %), not at 0.5.
PRESENCE_BIAS = -4.0


def decode_outputs(raw: jnp.ndarray, stats: jnp.ndarray, n_types: int, stride: int) -> CellOutputs:
    """Turn the head's raw channels into bounded, positive distribution parameters.

    Args:
        raw: (..., Hc, Wc, n_outputs) head output.
        stats: (..., 2, C) per-channel mean and std used to standardise the image, so the
            background is returned in image units.
        n_types: K.
        stride: px per cell of the grid.
    """
    k = n_types
    logit = raw[..., 0] + PRESENCE_BIAS
    offset = OFFSET_REACH * stride * jnp.tanh(raw[..., 1:3])
    offset_scale = stride * jax.nn.softplus(raw[..., 3:5] - 1.0) + MIN_SCALE["offset"]
    log_radius = raw[..., 5] + 2.0  # centre of the radius range (about 7 px) at init
    log_radius_scale = jax.nn.softplus(raw[..., 6] - 1.0) + MIN_SCALE["log_radius"]
    composition = jax.nn.sigmoid(raw[..., 7 : 7 + k])
    composition_scale = 0.5 * jax.nn.sigmoid(raw[..., 7 + k : 7 + 2 * k]) + MIN_SCALE["composition"]
    # The image's channels come first in the stats; log-odds channels, if any, follow them.
    channels = raw.shape[-1] - (7 + 2 * k)
    mean, std = stats[..., 0, :channels], stats[..., 1, :channels]
    background = raw[..., 7 + 2 * k :] * std[..., None, None, :] + mean[..., None, None, :]
    return CellOutputs(
        logit, offset, offset_scale, log_radius, log_radius_scale, composition,
        composition_scale, background, stride,
    )


def input_features(image, config: EncoderConfig):
    """What the network reads from an image (..., H, W, C) in [0, 1]: the image itself and,
    with `config.log_odds_input`, each channel's log-odds after it (..., H, W, 2 C).

    The decoder adds a droplet's absorbance in log-odds space, so there a dye's colour is a
    fixed offset from the background whatever their brightness; a dark droplet whose
    compositions differ by a few grey levels in intensity differs by whole units there.
    """
    if not config.log_odds_input:
        return image
    clipped = jnp.clip(image, LOG_ODDS_EPS, 1.0 - LOG_ODDS_EPS)
    return jnp.concatenate([image, jnp.log(clipped) - jnp.log1p(-clipped)], axis=-1)


def unmirror_raw(raw):
    """Raw head outputs (..., Hc, Wc, n) of a left-right mirrored image, mapped back onto the
    original's grid: cells reversed along the width and the x offset negated (tanh is odd,
    so negating its argument negates the offset). The grid covers the image padded to
    multiples of `ALIGN`, so mirror that padded image for the cells to line up.
    """
    flip = np.ones(raw.shape[-1], np.float32)
    flip[1] = -1.0  # channel 1 is the x offset (see `decode_outputs`)
    return raw[..., ::-1, :] * flip


def standardise(image: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-image, per-channel standardisation: ((image - mean) / std, stats (..., 2, C)).

    Makes the encoder indifferent to overall brightness and contrast, which vary between
    microscopes far more than the droplets' shapes do.
    """
    mean = jnp.mean(image, axis=(-3, -2))
    std = jnp.std(image, axis=(-3, -2)) + STD_FLOOR
    z = (image - mean[..., None, None, :]) / std[..., None, None, :]
    return z, jnp.stack([mean, std], axis=-2)


def pad_to_align(z: jnp.ndarray) -> jnp.ndarray:
    """Zero-pad (the standardised mean) the bottom and right to multiples of `ALIGN`."""
    h, w = z.shape[-3], z.shape[-2]
    ph, pw = -h % ALIGN, -w % ALIGN
    pad = [(0, 0)] * (z.ndim - 3) + [(0, ph), (0, pw), (0, 0)]
    return jnp.pad(z, pad)


def cell_centres(grid: tuple[int, int], stride: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pixel coordinates (x, y) of the cell centres of an (Hc, Wc) grid, each (Hc, Wc)."""
    hc, wc = grid
    cy = (jnp.arange(hc, dtype=jnp.float32) + 0.5) * stride - 0.5
    cx = (jnp.arange(wc, dtype=jnp.float32) + 0.5) * stride - 0.5
    yy, xx = jnp.meshgrid(cy, cx, indexing="ij")
    return xx, yy


@functools.partial(jax.jit, static_argnums=1)
def init_encoder(key: jax.Array, config: EncoderConfig) -> dict:
    """Random encoder variables for `config` (jitted: op by op, flax's initialisation
    compiled some eighty small programs)."""
    return Encoder(config).init(key, jnp.zeros((1, ALIGN, ALIGN, config.input_channels)))


def encode(params: dict, config: EncoderConfig, image: jnp.ndarray) -> CellOutputs:
    """Per-cell predictions for a batch of images (B, H, W, C) in [0, 1]. Jittable.

    The output grid covers the image padded up to multiples of `ALIGN`; cells whose centre
    falls outside the image are the caller's to ignore.
    """
    z, stats = standardise(input_features(image, config))
    raw = Encoder(config).apply(params, pad_to_align(z))
    return decode_outputs(raw, stats, config.n_types, config.stride)
