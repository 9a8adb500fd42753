"""Anchored droplet geometry: whatever the optics learn, the edge stays at r about (x, y)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize.config import RenderConfig
from amortize.droplets import Background, Droplets
from amortize.optics import (
    HALO_OUTER,
    RIM_BAND,
    apply_optics,
    channels_of,
    coarser_grid,
    default_optics_params,
    edge_blur,
    init_anchored,
    init_optics,
    is_anchored,
    lens_droplet,
    n_types_of,
    optics_delta,
    optics_features,
    sample_optics_inputs,
)
from amortize.render import render_logits

RAYS = 16
STEP = 0.005  # px along each ray


def scaled(params, factor, blur):
    """The same MLP with every weight times `factor` (large weights: extreme looks)."""
    mlp = jax.tree_util.tree_map(lambda a: a * factor, params["params"])
    return {"params": mlp, "edge": {"log_blur": jnp.log(jnp.float32(blur))}}


def ray_profiles(params, radius, key):
    """delta along 16 rays from the centre out to 1.6 r, (RAYS, T, C), the distances (T,) in
    px, and each ray's rim colour (RAYS, C): the MLP's inside colour at the rim band."""
    k1, k2 = jax.random.split(key)
    colour = jax.random.uniform(k1, (3,), minval=0.2, maxval=0.9)
    comp = jax.random.uniform(k2, (3,))
    t = jnp.arange(0.0, 1.6 * radius, STEP)
    angle = 2 * jnp.pi * jnp.arange(RAYS) / RAYS + 0.1
    u = jnp.cos(angle)[:, None] * t[None, :] / radius
    v = jnp.sin(angle)[:, None] * t[None, :] / radius
    feats = optics_features(colour, u, v, jnp.full(u.shape, radius), comp)
    band = 1.0 - RIM_BAND
    rim_feats = optics_features(colour, band * jnp.cos(angle), band * jnp.sin(angle), jnp.full(angle.shape, radius),
                                comp)
    rim = apply_optics(params, rim_feats)[:, :3]
    return np.asarray(optics_delta(params, feats)), np.asarray(t), np.asarray(rim)


def edge_positions(profiles, t, rim, min_contrast=0.02):
    """Per ray and channel, the last distance at which delta / rim reaches 0.5 (the 50 %
    contrast transition between the rim colour and the background; 1e-3 absorbs float32
    rounding of the value there, exactly 0.5), for channels whose rim is darker than the
    background (a bright rim may spill into the halo: `optics.optics_delta`)."""
    edges = []
    for ray in range(profiles.shape[0]):
        for c in range(profiles.shape[2]):
            if rim[ray, c] > -min_contrast:
                continue
            above = np.nonzero(profiles[ray, :, c] / rim[ray, c] >= 0.5 - 1e-3)[0]
            edges.append(t[above[-1]] if above.size else 0.0)
    return np.asarray(edges)


@pytest.mark.parametrize("radius", [3.0, 8.0, 25.0])
@pytest.mark.parametrize("factor", [1.0, 4.0, 15.0])
def test_edge_lies_at_r_for_any_optics(radius, factor):
    for seed in range(3):
        key = jax.random.PRNGKey(100 * seed + int(radius))
        blur = float(jax.random.uniform(key, (), minval=0.3, maxval=2.5))
        params = scaled(init_anchored(jax.random.PRNGKey(seed), 3, 3), factor, blur)
        profiles, t, rim = ray_profiles(params, radius, jax.random.fold_in(key, 1))
        edges = edge_positions(profiles, t, rim)
        assert edges.size >= RAYS // 2, "too few dark channels to measure"
        assert np.all(np.abs(edges - radius) <= 0.3), (seed, edges.min(), edges.max())


def test_footprint_is_a_symmetric_window():
    """Beyond the halo ring and the blur's tail, no ray shows more than 5 % of its rim
    contrast; free optics with the same weights paint well past it on some side."""
    radius, blur = 16.0, 0.8
    outer = HALO_OUTER * radius + 4 * blur
    params = scaled(init_anchored(jax.random.PRNGKey(7), 3, 3), 6.0, blur)
    profiles, t, rim = ray_profiles(params, radius, jax.random.PRNGKey(8))
    strong = np.abs(rim) > 0.05
    relative = np.abs(profiles) / np.maximum(np.abs(rim), 1e-6)[:, None, :]
    beyond = relative[:, t > outer, :]
    assert np.all(beyond[np.broadcast_to(strong[:, None, :], beyond.shape)] < 0.05)


def test_the_blur_changes_the_edge_width_and_not_its_position():
    """A constant colour (halo ratio 0): delta = E * colour, E a logistic in the distance."""
    params = init_anchored(jax.random.PRNGKey(0), 3, 3)
    mlp = dict(jax.tree_util.tree_map(jnp.zeros_like, params["params"]))
    last = max((k for k in mlp if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    mlp[last] = {**mlp[last], "bias": jnp.asarray([-1.5, -1.0, -0.5, 0.0, 0.0, 0.0])}
    widths, edges = [], []
    for blur in (0.5, 2.0):
        params_b = {"params": mlp, "edge": {"log_blur": jnp.log(jnp.float32(blur))}}
        profiles, t, rim = ray_profiles(params_b, 10.0, jax.random.PRNGKey(1))
        share = profiles[0, :, 0] / rim[0, 0]
        edges.append(t[np.nonzero(share >= 0.5)[0][-1]])
        widths.append(t[np.nonzero(share >= 0.25)[0][-1]] - t[np.nonzero(share >= 0.75)[0][-1]])
    assert edges == pytest.approx([10.0, 10.0], abs=2 * STEP)
    # 25-75 % width of a logistic of sd sigma: 2 ln 3 * sigma * sqrt(3) / pi.
    expected = [2 * math.log(3) * b * math.sqrt(3) / math.pi for b in (0.5, 2.0)]
    assert widths == pytest.approx(expected, abs=3 * STEP)


def test_the_renderer_draws_the_anchored_delta():
    params = scaled(init_anchored(jax.random.PRNGKey(3), 3, 3), 3.0, 0.9)
    x, y, r = 30.3, 28.6, 9.0
    comp = jnp.asarray([0.2, 0.7, 0.4])
    droplets = Droplets(jnp.asarray([x]), jnp.asarray([y]), jnp.asarray([r]), comp[None], jnp.ones(1))
    colour = jnp.asarray([0.6, 0.5, 0.4])
    background = Background(colour, jnp.zeros((3, 5)))
    logits = render_logits(droplets, params, background, (60, 64), RenderConfig(tile=8, levels=3))
    bg = jnp.log(colour / (1 - colour))
    yy, xx = np.mgrid[0:60, 0:64].astype(np.float32)
    feats = optics_features(colour, (xx - x) / r, (yy - y) / r, jnp.full(xx.shape, r), comp)
    expected = bg + optics_delta(params, feats)
    near = np.hypot(xx - x, yy - y) < RenderConfig().fade_start * r  # not yet fading out
    np.testing.assert_allclose(np.asarray(logits)[near], np.asarray(expected)[near], atol=1e-4)


def test_coarser_grid_draws_the_larger_droplet():
    params = scaled(init_anchored(jax.random.PRNGKey(4), 3, 3), 2.0, 1.3)
    k = 4.0
    feats = sample_optics_inputs(jax.random.PRNGKey(5), 512, 3, 3)
    coarse = coarser_grid(params, k)
    big = feats.at[..., 5].add(math.log(k))  # log r: colour (3), u, v, log r, ...
    np.testing.assert_allclose(np.asarray(optics_delta(coarse, feats)), np.asarray(optics_delta(params, big)),
                               atol=2e-4)
    assert float(edge_blur(coarse)) == pytest.approx(1.3 / k, rel=1e-5)


def test_shapes_and_gradients():
    params = default_optics_params(3, 3, anchored=True)
    assert is_anchored(params) and not is_anchored(init_optics(jax.random.PRNGKey(0), 3, 3))
    assert channels_of(params) == 3 and n_types_of(params) == 3
    feats = sample_optics_inputs(jax.random.PRNGKey(6), 256, 3, 3)
    grads = jax.grad(lambda p: jnp.sum(optics_delta(p, feats) ** 2))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert abs(float(grads["edge"]["log_blur"])) > 0


def test_shipped_anchored_fit_resembles_the_built_in_droplet():
    params = default_optics_params(3, 3, anchored=True)
    feats = sample_optics_inputs(jax.random.PRNGKey(123), 8192, 3, 3)
    target = lens_droplet(feats, 3, 3)
    mse = float(jnp.mean((optics_delta(params, feats) - target) ** 2))
    assert mse < 0.1 * float(jnp.var(target))


def test_halo_ratio_is_bounded_and_starts_at_zero():
    from amortize.optics import HALO_BRIGHT_MAX, HALO_DARK_MAX, halo_ratio

    raw = jnp.linspace(-40.0, 40.0, 101)
    h = np.asarray(halo_ratio(raw))
    assert np.all((h > -HALO_DARK_MAX - 1e-6) & (h < HALO_BRIGHT_MAX + 1e-6)) and HALO_DARK_MAX < 0.5
    assert float(halo_ratio(jnp.float32(0.0))) == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(h) >= 0)  # one raw output moves it one way


def test_a_bright_rim_may_spill_but_a_dark_one_may_not():
    """The halo brightens: beside a bright rim (a caustic) it can extend the brightness past
    r, beside a dark rim it cannot extend the darkness."""
    params = init_anchored(jax.random.PRNGKey(0), 3, 3)
    mlp = dict(jax.tree_util.tree_map(jnp.zeros_like, params["params"]))
    last = max((k for k in mlp if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    # Channel 0 darker, channel 1 brighter than the background; the halo at its strongest.
    mlp[last] = {**mlp[last], "bias": jnp.asarray([-1.0, 1.0, 0.0, 30.0, 30.0, 30.0])}
    profiles, t, rim = ray_profiles({"params": mlp, "edge": {"log_blur": jnp.log(jnp.float32(0.5))}},
                                    10.0, jax.random.PRNGKey(1))
    share = profiles[0][:, :2] / rim[0][:2]
    last_half = [t[np.nonzero(share[:, c] >= 0.5 - 1e-3)[0][-1]] for c in (0, 1)]
    assert last_half[0] == pytest.approx(10.0, abs=2 * STEP)
    assert last_half[1] > 10.5
