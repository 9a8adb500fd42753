import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

from amortize.config import SceneConfig
from amortize.errors import BadArgument
from amortize.model import droplet_model, scene_from_trace


def test_sites_have_expected_shapes(optics, tiny_scene, tiny_render):
    shape = (20, 24)
    n = tiny_scene.n_slots(shape)
    tr = handlers.trace(handlers.seed(droplet_model, 0)).get_trace(
        shape=shape, optics_params=optics, scene=tiny_scene, render_config=tiny_render)
    expect = {
        "presence": (n,), "x": (n,), "y": (n,), "log_radius": (n,), "composition": (n, 3),
        "background_colour": (3,), "illumination": (3, 5), "noise": (), "rendered": (20, 24, 3),
        "image": (20, 24, 3),
    }
    for name, s in expect.items():
        assert tr[name]["value"].shape == s, name
    assert not tr["image"]["is_observed"]


def test_prior_predictive_density_and_radius_range(optics, tiny_render):
    scene = SceneConfig(density=40.0, radius_min=1.5, radius_max=5.0)
    shape = (40, 40)
    samples = Predictive(droplet_model, num_samples=40)(
        jax.random.PRNGKey(0), shape=shape, optics_params=optics, scene=scene,
        render_config=tiny_render)
    x, y, present = samples["x"], samples["y"], samples["presence"] > 0
    inside = present & (x >= -0.5) & (x < 39.5) & (y >= -0.5) & (y < 39.5)
    per_image = np.asarray(inside.sum(-1))
    density = per_image.mean() / (40 * 40 / 1e4)
    assert density == pytest.approx(40.0, rel=0.15)
    r = np.exp(np.asarray(samples["log_radius"]))
    assert r.min() >= 1.5 - 1e-4 and r.max() <= 5.0 + 1e-4
    assert r.max() - r.min() > 2.5  # the prior spreads over the range


def test_log_density_and_gradient_finite_on_an_observed_image(optics, tiny_scene, tiny_render):
    shape = (16, 16)
    tr = handlers.trace(handlers.seed(droplet_model, 1)).get_trace(
        shape=shape, optics_params=optics, scene=tiny_scene, render_config=tiny_render)
    image = tr["image"]["value"]
    latents = {k: tr[k]["value"] for k in ("x", "y", "log_radius", "composition", "noise")}
    fixed = {k: tr[k]["value"] for k in ("presence", "background_colour", "illumination")}

    def logp(lat):
        lp, _ = log_density(droplet_model, (image,),
                            dict(optics_params=optics, scene=tiny_scene, render_config=tiny_render),
                            {**lat, **fixed})
        return lp

    lp, grads = jax.jit(jax.value_and_grad(logp))(latents)  # jitted: op by op costs more
    assert np.isfinite(float(lp))
    for name, g in grads.items():
        assert np.all(np.isfinite(np.asarray(g))), name


def test_scene_from_trace_round_trip(optics, tiny_scene, tiny_render):
    tr = handlers.trace(handlers.seed(droplet_model, 2)).get_trace(
        shape=(12, 12), optics_params=optics, scene=tiny_scene, render_config=tiny_render)
    droplets, background, noise = scene_from_trace(tr)
    np.testing.assert_allclose(droplets.radius, jnp.exp(tr["log_radius"]["value"]))
    assert background.colour.shape == (3,) and noise.shape == ()


def test_needs_image_or_shape(optics):
    with pytest.raises(BadArgument):
        handlers.seed(droplet_model, 0)(optics_params=optics)


def test_density_spread_draws_a_density_per_scene(optics, tiny_render):
    fixed = SceneConfig(density=40.0, radius_min=1.5, radius_max=5.0)
    spread = SceneConfig(density=40.0, radius_min=1.5, radius_max=5.0, density_spread=4.0)
    shape = (40, 40)
    assert spread.n_slots(shape) > fixed.n_slots(shape)  # room for the densest scene
    samples = Predictive(droplet_model, num_samples=60)(
        jax.random.PRNGKey(1), shape=shape, optics_params=optics, scene=spread,
        render_config=tiny_render)
    factor = np.asarray(samples["density_factor"])
    assert factor.min() >= 0.25 and factor.max() <= 4.0
    counts = np.asarray(samples["presence"].sum(-1))
    # Denser draws hold more droplets.
    assert np.corrcoef(factor, counts)[0, 1] > 0.7


def test_hard_core_thinning_analytic_case():
    from amortize.model import hard_core_survivors

    # Two equal droplets 3 px apart (the lower index wins the tie), a small droplet deep
    # inside a big one, and an absent slot that must neither survive nor remove anything.
    x = jnp.array([0.0, 3.0, 10.0, 10.5, 0.5])
    r = jnp.array([2.0, 2.0, 5.0, 1.0, 9.0])
    present = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
    y = jnp.zeros(5)
    np.testing.assert_array_equal(hard_core_survivors(x, y, r, present, 1.0), [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(hard_core_survivors(x, y, r, present, 0.5), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(hard_core_survivors(x, y, r, present, 0.0), [1, 1, 1, 1, 0])


def test_hard_core_thinning_matches_dense_reference_across_blocks():
    from amortize.model import PAIR_BLOCK, hard_core_survivors

    rng = np.random.default_rng(0)
    n = PAIR_BLOCK + 37  # more than one block, with padding
    x, y = rng.uniform(0, 300, n), rng.uniform(0, 300, n)
    r = rng.choice([2.0, 3.0, 5.0], n)  # many ties
    present = (rng.uniform(size=n) < 0.8).astype(float)
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None])
    outranks = (r[None] > r[:, None]) | ((r[None] == r[:, None]) & (np.arange(n)[None] < np.arange(n)[:, None]))
    removed = ((d < 0.7 * (r[:, None] + r[None])) & outranks & (present[None] > 0)).any(1)
    expect = (~removed) & (present > 0)
    got = hard_core_survivors(*(jnp.asarray(a, jnp.float32) for a in (x, y, r, present)), 0.7)
    np.testing.assert_array_equal(np.asarray(got) > 0, expect)


def test_prior_with_full_separation_never_overlaps(optics, tiny_render):
    scene = SceneConfig(density=60.0, radius_min=1.5, radius_max=5.0, min_separation=1.0)
    tr = handlers.trace(handlers.seed(droplet_model, 3)).get_trace(
        shape=(48, 48), optics_params=optics, scene=scene, render_config=tiny_render)
    droplets, _, _ = scene_from_trace(tr)
    keep = np.asarray(droplets.presence) > 0
    assert 0 < keep.sum() < np.asarray(tr["presence"]["value"]).sum()  # something was thinned
    x, y, r = (np.asarray(a)[keep] for a in (droplets.x, droplets.y, droplets.radius))
    gap = np.hypot(x[:, None] - x[None], y[:, None] - y[None]) - (r[:, None] + r[None])
    np.fill_diagonal(gap, np.inf)
    assert gap.min() >= -1e-4


def test_min_separation_out_of_range_is_rejected():
    with pytest.raises(BadArgument, match="min_separation"):
        SceneConfig(min_separation=1.5)


def test_density_before_thinning_inverts_the_retention():
    from amortize.model import density_before_thinning, thinning_retention

    scene = SceneConfig(density=30.0, radius_min=1.5, radius_max=6.0, min_separation=0.7)
    kept = thinning_retention(scene, 30.0)
    assert 0.3 < kept < 0.95  # a real thinning, not a no-op
    assert density_before_thinning(scene, 30.0 * kept) == pytest.approx(30.0, rel=0.05)
    free = SceneConfig(density=30.0, radius_min=1.5, radius_max=6.0)
    assert thinning_retention(free, 30.0) == 1.0
    assert density_before_thinning(free, 12.0) == pytest.approx(12.0)
