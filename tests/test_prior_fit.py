import math

import numpy as np
import pytest

from amortize.config import SceneConfig, SimulationConfig
from amortize.prior_fit import fit_beta, prior_summary, refit_scene
from amortize.simulate import simulate


def test_refit_recovers_a_known_radius_distribution_from_a_synthetic_corpus():
    """Simulate a corpus with a known prior; the refit on its droplets gives it back."""
    scene = SceneConfig(density=20.0, radius_min=1.5, radius_max=30.0, radius_log_mean=math.log(4.0),
                        radius_log_sd=0.3, composition_concentration=(2.0, 5.0))
    sims = simulate(6, (128, 128), seed=3, config=SimulationConfig(scene=scene))
    radii = np.concatenate([t["radius"] for t in sims.tables])
    comps = np.concatenate([np.stack([t[f"comp_{k}"] for k in range(3)], -1) for t in sims.tables])
    base = SceneConfig(radius_max=30.0)
    fitted = refit_scene(base, radii, comps, area_px=6 * 128 * 128, background_colours=np.zeros((0, 3)),
                         illumination=np.zeros((0, 3, 5)), noise=0.02)
    mean, sd = fitted.log_radius_prior
    assert abs(mean - math.log(4.0)) < 0.08 and abs(sd - 0.3) < 0.06
    # Centres in the margin are not in the tables, so the density is per image area.
    assert abs(fitted.density - 20.0) < 3.0
    a, b = fitted.composition_concentration
    assert abs(a / (a + b) - 2 / 7) < 0.03
    assert fitted.noise_min < 0.02 < fitted.noise_max
    assert (fitted.radius_min, fitted.radius_max) == (base.radius_min, base.radius_max)


def test_beta_moment_match():
    rng = np.random.default_rng(0)
    a, b = fit_beta(rng.beta(3.0, 1.5, size=20000))
    assert a == pytest.approx(3.0, rel=0.08) and b == pytest.approx(1.5, rel=0.08)


def test_too_few_detections_keep_the_droplet_prior_and_backgrounds_set_the_range():
    base = SceneConfig()
    colours = np.array([[0.5, 0.6, 0.7], [0.55, 0.6, 0.75]])
    fitted = refit_scene(base, np.array([3.0, 4.0]), np.full((2, 3), 0.5), 1e4, colours,
                         np.zeros((2, 3, 5)), noise=0.03)
    assert fitted.density == base.density and fitted.log_radius_prior == base.log_radius_prior
    assert fitted.background_min == pytest.approx(0.45) and fitted.background_max == pytest.approx(0.8)
    assert set(prior_summary(fitted)) >= {"density", "radius_median_px", "background_min"}
