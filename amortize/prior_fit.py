"""Empirical Bayes: refit the scene prior to what the encoder finds in a real corpus.

Wake-sleep alternates learning from real images (wake) with learning from simulated scenes
(sleep). For the sleep phases to teach the encoder about scenes like the user's, the prior
they simulate from is refitted after every wake phase, by moment matching on the droplets and
backgrounds the current encoder reports:

    density              detections per 100 x 100 px (raised to the density before thinning
                         when the prior has a hard core, `min_separation` > 0)
    radius_log_mean/sd   mean and sd of log radius (the support, radius_min..max, is kept:
                         it is the encoder's working range)
    composition          Beta(a, b) with the pooled compositions' mean and variance
    background_min/max   the range of the fitted background colours, widened a little
    illumination_sd      sd of the fitted illumination coefficients
    noise_min/max        around the decoder's learned pixel noise

Pure functions of numpy arrays; the wake-sleep loop gathers the inputs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from amortize.config import SceneConfig
from amortize.model import density_before_thinning

#: Floors that keep a refitted prior proper when the corpus is small or uniform.
MIN_LOG_SD = 0.05
MIN_COMP_VAR = 1e-3
MIN_ILLUMINATION_SD = 0.02
BACKGROUND_PAD = 0.05
NOISE_SPREAD = 1.5


def fit_radius(radii: np.ndarray) -> tuple[float, float]:
    """(mean, sd) of log radius."""
    logs = np.log(np.asarray(radii, np.float64))
    return float(logs.mean()), float(max(logs.std(), MIN_LOG_SD))


def fit_beta(values: np.ndarray) -> tuple[float, float]:
    """Beta(a, b) with the mean and variance of `values` (in (0, 1))."""
    v = np.clip(np.asarray(values, np.float64), 1e-4, 1 - 1e-4)
    m = v.mean()
    var = min(max(v.var(), MIN_COMP_VAR), 0.99 * m * (1 - m))
    common = m * (1 - m) / var - 1
    return float(m * common), float((1 - m) * common)


def refit_scene(
    base: SceneConfig,
    radii: np.ndarray,
    compositions: np.ndarray,
    area_px: float,
    background_colours: np.ndarray,
    illumination: np.ndarray,
    noise: float,
) -> SceneConfig:
    """A new scene prior from one sweep of the encoder over the corpus.

    Args:
        base: the current prior (support, channels, types, spread and slots are kept).
        radii: (n,) radii of the detected droplets, px.
        compositions: (n, K) their compositions.
        area_px: the image area the detections came from, px^2.
        background_colours: (m, C) fitted background colours of the m crops.
        illumination: (m, C, 5) fitted illumination coefficients.
        noise: the decoder's pixel noise scale.

    With fewer than 10 detections the droplet fields are left as they were.
    """
    changes: dict = {}
    radii = np.asarray(radii, np.float64)
    inside = (radii >= base.radius_min) & (radii <= base.radius_max)
    if inside.sum() >= 10:
        changes["density"] = float(max(len(radii) / area_px * 1e4, 0.1))
        changes["radius_log_mean"], changes["radius_log_sd"] = fit_radius(radii[inside])
        changes["composition_concentration"] = fit_beta(np.asarray(compositions).reshape(-1))
        if base.min_separation > 0:
            # The encoder sees the thinned scene; the prior's density counts centres before it.
            fitted = dataclasses.replace(base, **changes)
            changes["density"] = density_before_thinning(fitted, changes["density"])
    colours = np.asarray(background_colours, np.float64)
    if colours.size:
        lo = float(np.clip(colours.min() - BACKGROUND_PAD, 0.01, 0.9))
        hi = float(np.clip(colours.max() + BACKGROUND_PAD, lo + 0.05, 0.99))
        changes["background_min"], changes["background_max"] = lo, hi
        changes["illumination_sd"] = float(max(np.asarray(illumination).std(), MIN_ILLUMINATION_SD))
    if math.isfinite(noise) and noise > 0:
        changes["noise_min"], changes["noise_max"] = float(noise / NOISE_SPREAD), float(noise * NOISE_SPREAD)
    return dataclasses.replace(base, **changes)


def prior_summary(scene: SceneConfig) -> dict[str, float]:
    """The refitted hyper-parameters as flat scalars, for logging."""
    mean, sd = scene.log_radius_prior
    a, b = scene.composition_concentration
    return {
        "density": scene.density, "radius_log_mean": mean, "radius_log_sd": sd,
        "radius_median_px": math.exp(mean), "composition_a": a, "composition_b": b,
        "background_min": scene.background_min, "background_max": scene.background_max,
        "illumination_sd": scene.illumination_sd, "noise_min": scene.noise_min,
        "noise_max": scene.noise_max,
    }
