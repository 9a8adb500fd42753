"""Choosing the working scale of an image whose droplets are too small for the encoder.

The encoder covers radii from its prior's smallest (1.5 px for the shipped model) upwards.
In a micrograph shrunk so far that most droplets have radii of 1-3 px, many lie below that
support and are missed or merged: the droplet slide downsampled 4x gives 943 droplets at
scale 1 and 2704 when enlarged 4x (scale 0.25), with reconstruction RMSE 0.058 and 0.035.
Enlarging every image would cost up to 16x the time and does not help images whose
droplets are already resolved (on simulated scenes it makes the reconstruction worse). So
`choose_scale`:

1. predicts at scale 1 and stops there when the median radius is at least
   `SMALL_MEDIAN_RADIUS` px, which is the common case and costs nothing extra;
2. otherwise halves the scale (enlarges the image 2x) while the decoder's reconstruction
   error falls (by `MIN_GAIN` for the first halving, `MIN_FURTHER_GAIN` for later ones) and
   the enlarged image stays within `MAX_PIXELS`, stopping once the droplets found have a
   median radius of `SMALL_MEDIAN_RADIUS` work px.

The reconstruction error is how well the generative model explains the image from each
answer, so the scale whose answer explains it best wins; no radius threshold decides alone.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from amortize.detect import DEFAULT_THRESHOLD
from amortize.reconstruct import rmse

#: Median radius (working px) below which a larger working scale is tried. Simulated scenes
#: from the default prior have medians of 6-7.5 px; the slide downsampled 4x has 3.2 px.
SMALL_MEDIAN_RADIUS = 4.0
#: Relative fall in reconstruction RMSE needed to prefer the image enlarged 2x over scale 1.
#: A model that does not fit an image's look at all still gains a little by scattering more
#: small droplets: the un-adapted default on the emulsion-like images of
#: benchmarks/byo_corpus.py gained 0-2.9 %, against 36-37 % on the slide downsampled 4x.
MIN_GAIN = 0.05
#: The same for each further halving, once the first has shown that the image holds droplets
#: the encoder missed at scale 1 and the droplets found are still small. The slide at 4x
#: gained 3.4-7 % (two halves of it) from 2x to 4x enlarged.
MIN_FURTHER_GAIN = 0.01
#: Largest enlarged working image (pixels): 2048 x 2048, the largest encoded untiled.
MAX_PIXELS = 2048 * 2048


class ScaleChoice(NamedTuple):
    scale: float  # input px per encoder px
    table: dict  # the droplets found at that scale, in input px
    recon: np.ndarray | None  # their reconstruction, when the search rendered one
    tried: dict  # {scale: reconstruction RMSE} of every scale rendered; empty if none was


def median_work_radius(table: dict, scale: float) -> float:
    """Median radius of a table's droplets in working px (inf for an empty table)."""
    r = np.asarray(table["radius"], np.float64)
    return float(np.median(r)) / scale if r.size else float("inf")


def choose_scale(predictor, image: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                 table: dict | None = None) -> ScaleChoice:
    """The working scale at which `predictor` best explains `image` (see the module notes).

    `table`, when given, is the prediction at scale 1 (a batch may have made it already).
    """
    if table is None:
        table = predictor.predict(image, threshold, 1.0)
    if median_work_radius(table, 1.0) >= SMALL_MEDIAN_RADIUS:
        return ScaleChoice(1.0, table, None, {})
    h, w = np.shape(image)[:2]
    recon = predictor.reconstruct(image, table, 1.0)
    best = ScaleChoice(1.0, table, recon, {1.0: rmse(image, recon)})
    scale = 0.5
    while h * w / scale**2 <= MAX_PIXELS:
        t = predictor.predict(image, threshold, scale)
        r = predictor.reconstruct(image, t, scale)
        err = rmse(image, r)
        best.tried[scale] = err
        needed = MIN_GAIN if best.scale == 1.0 else MIN_FURTHER_GAIN
        if err > (1.0 - needed) * best.tried[best.scale]:
            break
        best = ScaleChoice(scale, t, r, best.tried)
        if median_work_radius(t, scale) >= SMALL_MEDIAN_RADIUS:
            break
        scale /= 2
    return best
