"""Choosing the working scale of an image whose droplets are too large or too small for the
encoder.

The encoder covers radii from its prior's smallest (1.5 px for the shipped model) to its
largest (40 px) at scale 1. Larger droplets are out of its view: a simulated droplet of
r = 130 px is not found at all at scale 1, and is found with r = 129 px on the image shrunk 8x
(scale 8), where the reconstruction RMSE falls from 0.123 to 0.075. Smaller droplets are
missed or merged: the droplet slide downsampled 4x gives 943 droplets at scale 1 and 2704 when
enlarged 4x (scale 0.25), with reconstruction RMSE 0.058 and 0.035. `choose_scale`:

1. predicts at scale 1;
2. **shrinks**: predicts on the image halved, quartered, ... down to a short side of
   `MIN_SHRUNK_SIDE` px (together a third of scale 1's pixels). A shrunk scale whose droplets
   have a median radius of at least `LARGE_MEDIAN_RADIUS` working px (droplets that are large
   there, not fine detail near the encoder's smallest radii) and below `CEILING_FRACTION` of
   its largest (droplets read within its range) is weighed by its reconstruction,
   and predict moves to the scale whose droplets explain the whole image best, if that beats
   scale 1's reconstruction RMSE by `MIN_SHRINK_GAIN`. Every scale is tried, not only until
   the error stops falling: a scene of droplets of r 65 and 130 px explains the image a
   little better at scale 2 than at 4 (the smaller droplet found alone), and much better at 8
   (both found);
3. **enlarges**, when it stayed at scale 1 and the droplets found have a median radius below
   `SMALL_MEDIAN_RADIUS` px: halves the scale (enlarges the image 2x) while the
   reconstruction error falls (by `MIN_GAIN` for the first halving, `MIN_FURTHER_GAIN` for
   later ones) and the enlarged image stays within `MAX_PIXELS`, stopping once the droplets
   found have a median radius of `SMALL_MEDIAN_RADIUS` work px.

The reconstruction error, always measured on the input image at its own size, is how well
the generative model explains the image from each answer, so the scale whose answer explains
it best wins; no radius threshold decides alone. A user never gives a droplet size.
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
#: Shortest side (px) of a shrunk working image: the encoder's view of a droplet of its
#: largest radius (40 px) needs about this much image around it.
MIN_SHRUNK_SIDE = 64
#: Relative fall in reconstruction RMSE needed to prefer a shrunk image over scale 1. On the
#: droplet slide every shrunk scale explains the image worse (RMSE 0.028 at scale 1, 0.039 to
#: 0.077 at 2 to 16); on simulated scenes of droplets of r 65-200 px the best shrunk scale
#: gains 30-75 %.
MIN_SHRINK_GAIN = 0.05
#: Median radius (working px) that the droplets found on a shrunk image must reach for that
#: scale to be weighed at all. What a shrunk image shows near the encoder's smallest radii is
#: detail too fine for it (texture, droplets that scale 1 resolves), and a decoder that fits
#: an image's look poorly explains that smoothed detail better than scale 1's answer: on the
#: shared emulsion and condensation images, shrunk scales whose droplets had medians of 3.3 to
#: 5.8 working px "won" by 5-20 % with a handful of circles. Droplets of r 60-300 px, shrunk
#: to the scale that shows them best, have medians of 12-37 working px.
LARGE_MEDIAN_RADIUS = 8.0
#: A shrunk scale whose droplets have a median radius of this share of the encoder's largest
#: training radius (`Predictor.largest_radius`) or more is not weighed either: the encoder
#: reads droplets larger than it learned at about its largest radius, so droplets found there
#: are probably larger than read. A lone droplet of r = 200 px, read at scale 2 as 39.2 and at
#: scale 4 as 42.1 working px (true 100 and 50; the largest radius is 40), explained the image
#: as well at scale 4 as at 8, where it is read right (24.9 px); a droplet of r = 300 px at
#: scale 8 is read as 36.7 (true 37.5).
CEILING_FRACTION = 0.95


class ScaleChoice(NamedTuple):
    scale: float  # input px per encoder px
    table: dict  # the droplets found at that scale, in input px
    recon: np.ndarray | None  # their reconstruction, when the search rendered one
    tried: dict  # {scale: reconstruction RMSE} of every scale rendered; empty if none was


def median_work_radius(table: dict, scale: float) -> float:
    """Median radius of a table's droplets in working px (inf for an empty table)."""
    r = np.asarray(table["radius"], np.float64)
    return float(np.median(r)) / scale if r.size else float("inf")


def shrink_scales(shape: tuple[int, int]) -> list[float]:
    """The shrunk scales tried for an image of `shape` (H, W): 2, 4, 8, ... while the short
    side stays at least `MIN_SHRUNK_SIDE` px."""
    scales, scale = [], 2.0
    while min(shape[:2]) / scale >= MIN_SHRUNK_SIDE:
        scales.append(scale)
        scale *= 2
    return scales


def choose_scale(predictor, image: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                 table: dict | None = None) -> ScaleChoice:
    """The working scale at which `predictor` best explains `image` (see the module notes).

    `table`, when given, is the prediction at scale 1 (a batch may have made it already).
    """
    if table is None:
        table = predictor.predict(image, threshold, 1.0)
    h, w = np.shape(image)[:2]
    best = ScaleChoice(1.0, table, None, {})

    def with_recon(choice: ScaleChoice) -> ScaleChoice:
        """Scale 1's choice with its reconstruction, rendered once when first needed."""
        if choice.recon is not None:
            return choice
        recon = predictor.reconstruct(image, table, 1.0)
        return ScaleChoice(1.0, table, recon, {**choice.tried, 1.0: rmse(image, recon)})

    ceiling = CEILING_FRACTION * predictor.largest_radius
    for scale in shrink_scales((h, w)):
        t = predictor.predict(image, threshold, scale)
        if not len(t["radius"]) or not LARGE_MEDIAN_RADIUS <= median_work_radius(t, scale) < ceiling:
            continue
        if best.scale == 1.0:
            best = with_recon(best)
        r = predictor.reconstruct(image, t, scale)
        best.tried[scale] = err = rmse(image, r)
        if err < (1.0 - MIN_SHRINK_GAIN) * best.tried[1.0] and err < best.tried[best.scale]:
            best = ScaleChoice(scale, t, r, best.tried)
    if best.scale > 1.0 or median_work_radius(table, 1.0) >= SMALL_MEDIAN_RADIUS:
        return best
    best = with_recon(best)
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
