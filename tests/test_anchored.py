"""Anchored droplet geometry: whatever the optics learn, the edge stays at r about (x, y)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize.config import RenderConfig
from amortize.droplets import Background, Droplets
from amortize.errors import BadArgument
from amortize.optics import (
    RIM_BAND,
    TAIL_MAX,
    TAIL_OUTER,
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
    shading_keep,
    tail_colour,
    with_edge_blur_scaled,
    with_shading_blur,
    with_shading_shifted,
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
    px, each ray's rim colour (RAYS, C) (the inside colour drawn at the rim band: the MLP's,
    its variation about the core kept as far as `shading_keep` says) and the core colour (C,)
    (its colour at the centre)."""
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
    core = apply_optics(params, optics_features(colour, jnp.zeros(()), jnp.zeros(()), jnp.float32(radius), comp))[:3]
    rim = core + shading_keep(params, jnp.float32(radius)) * (apply_optics(params, rim_feats)[:, :3] - core)
    return np.asarray(optics_delta(params, feats)), np.asarray(t), np.asarray(rim), np.asarray(core)


def edge_positions(profiles, t, rim, core, min_contrast=0.02):
    """Per ray, the last distance at which the contrast along the core colour reaches half
    the rim's (the 50 % transition between the rim and the background; 1e-3 absorbs float32
    rounding of the value there, exactly 0.5), for rays whose rim has the core's contrast."""
    along = core / np.linalg.norm(core)
    edges = []
    for ray in range(profiles.shape[0]):
        rim_contrast = rim[ray] @ along
        if rim_contrast < min_contrast:
            continue
        above = np.nonzero(profiles[ray] @ along / rim_contrast >= 0.5 - 1e-3)[0]
        edges.append(t[above[-1]] if above.size else 0.0)
    return np.asarray(edges)


@pytest.mark.parametrize("radius", [3.0, 8.0, 25.0])
@pytest.mark.parametrize("factor", [1.0, 4.0, 15.0])
def test_edge_lies_at_r_for_any_optics(radius, factor):
    measured = 0
    for seed in range(4):
        key = jax.random.PRNGKey(100 * seed + int(radius))
        blur = float(jax.random.uniform(key, (), minval=0.3, maxval=2.5))
        params = scaled(init_anchored(jax.random.PRNGKey(seed), 3, 3), factor, blur)
        edges = edge_positions(*ray_profiles(params, radius, jax.random.fold_in(key, 1)))
        measured += edges.size
        assert np.all(np.abs(edges - radius) <= 0.3), (seed, edges.min(), edges.max())
    assert measured >= 2 * RAYS, "too few rays with the core's contrast to measure"


def test_footprint_is_a_symmetric_window():
    """Beyond the tail's reach and the blur's tail, no ray shows more than 5 % of the core
    contrast."""
    radius, blur = 16.0, 0.8
    outer = TAIL_OUTER * radius + 4 * blur
    params = scaled(init_anchored(jax.random.PRNGKey(7), 3, 3), 6.0, blur)
    profiles, t, rim, core = ray_profiles(params, radius, jax.random.PRNGKey(8))
    beyond = np.linalg.norm(profiles[:, t > outer, :], axis=-1)
    assert np.all(beyond < 0.05 * np.linalg.norm(core))


def test_the_blur_changes_the_edge_width_and_not_its_position():
    """A constant colour (no tail): delta = E * colour, E a logistic in the distance."""
    params = init_anchored(jax.random.PRNGKey(0), 3, 3)
    mlp = dict(jax.tree_util.tree_map(jnp.zeros_like, params["params"]))
    last = max((k for k in mlp if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    mlp[last] = {**mlp[last], "bias": jnp.asarray([-1.5, -1.0, -0.5, 0.0, 0.0, 0.0])}
    widths, edges = [], []
    for blur in (0.5, 2.0):
        params_b = {"params": mlp, "edge": {"log_blur": jnp.log(jnp.float32(blur))}}
        profiles, t, rim, _ = ray_profiles(params_b, 10.0, jax.random.PRNGKey(1))
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


def test_tail_colour_is_bounded_and_never_continues_the_core_contrast():
    raw = jax.random.normal(jax.random.PRNGKey(2), (512, 3)) * 30.0
    core = jax.random.normal(jax.random.PRNGKey(3), (512, 3))
    tail = np.asarray(tail_colour(raw, core))
    size = np.linalg.norm(np.asarray(core), axis=-1)
    assert np.all(np.linalg.norm(tail, axis=-1) <= TAIL_MAX * size + 1e-5)
    assert np.all(np.sum(tail * np.asarray(core), axis=-1) <= 1e-5 * size)
    np.testing.assert_allclose(np.asarray(tail_colour(jnp.zeros(3), core[0])), 0.0, atol=1e-7)
    # A tail in a colour of its own (here brighter, against a dark core) keeps its size.
    away = np.asarray(tail_colour(jnp.asarray([30.0, 30.0, 30.0]), jnp.asarray([-1.0, -1.0, -1.0])))
    assert np.linalg.norm(away) > 0.9 * TAIL_MAX * math.sqrt(3)


def test_the_tail_colours_outside_the_disc_but_not_in_the_droplets_colour():
    """A droplet darker in channel 0 whose tail asks to be darker in channel 0 and brighter in
    channel 1: outside the disc only the brighter channel 1 shows."""
    params = init_anchored(jax.random.PRNGKey(0), 3, 3)
    mlp = dict(jax.tree_util.tree_map(jnp.zeros_like, params["params"]))
    last = max((k for k in mlp if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    mlp[last] = {**mlp[last], "bias": jnp.asarray([-1.0, 0.0, 0.0, -5.0, 5.0, 0.0])}
    profiles, t, rim, core = ray_profiles({"params": mlp, "edge": {"log_blur": jnp.log(jnp.float32(0.5))}},
                                          10.0, jax.random.PRNGKey(1))
    outside = profiles[0][(t > 12.0) & (t < 12.5)]  # past the blur (E < 1e-3)
    assert np.all(np.abs(outside[:, 0]) < 1e-3)
    assert np.all(outside[:, 1] > 0.3)
    share = profiles[0][:, 0] / rim[0][0]
    assert t[np.nonzero(share >= 0.5 - 1e-3)[0][-1]] == pytest.approx(10.0, abs=2 * STEP)


@pytest.mark.parametrize("radius", [3.0, 8.0, 25.0])
def test_moved_shading_and_scaled_blur_keep_the_edge_at_r(radius):
    params = scaled(init_anchored(jax.random.PRNGKey(11), 3, 3), 4.0, 1.0)
    for jittered in (with_shading_shifted(params, 0.15, -0.1), with_edge_blur_scaled(params, 2.5),
                     with_shading_shifted(with_edge_blur_scaled(params, 0.4), -0.2, 0.05)):
        edges = edge_positions(*ray_profiles(jittered, radius, jax.random.PRNGKey(12)))
        assert edges.size >= RAYS // 2
        assert np.all(np.abs(edges - radius) <= 0.3), (edges.min(), edges.max())


def test_moved_shading_is_the_colouring_read_off_centre():
    params = scaled(init_anchored(jax.random.PRNGKey(13), 3, 3), 3.0, 1.0)
    du, dv = 0.15, -0.1
    moved = with_shading_shifted(params, du, dv)
    feats = sample_optics_inputs(jax.random.PRNGKey(14), 256, 3, 3)
    feats = feats.at[..., 3:5].multiply(0.3).at[..., 5].set(math.log(25.0))  # well inside, r = 25 px
    back = feats.at[..., 3].add(-du).at[..., 4].add(-dv)
    np.testing.assert_allclose(np.asarray(optics_delta(moved, feats)), np.asarray(optics_delta(params, back)),
                               atol=1e-4)
    assert float(edge_blur(with_edge_blur_scaled(params, 2.5))) == pytest.approx(2.5, rel=1e-5)



def test_shading_keep_is_a_gaussian_blurs_gain():
    params = scaled(init_anchored(jax.random.PRNGKey(15), 3, 3), 1.0, 2.0)
    radius = jnp.asarray([1.0, 4.0, 40.0])
    np.testing.assert_allclose(np.asarray(shading_keep(params, radius)), 1.0)  # optics without it
    blurred = with_shading_blur(params, 1.5)
    expected = np.exp(-0.5 * (1.5 * 2.0 / np.asarray(radius)) ** 2)
    np.testing.assert_allclose(np.asarray(shading_keep(blurred, radius)), expected, rtol=1e-5)
    assert with_shading_blur(blurred, 9.0) is blurred  # optics that have it keep theirs
    feats = sample_optics_inputs(jax.random.PRNGKey(16), 256, 3, 3)
    grads = jax.grad(lambda p: jnp.sum(optics_delta(p, feats) ** 2))(blurred)
    assert np.isfinite(float(grads["edge"]["log_shading_blur"]))
    assert abs(float(grads["edge"]["log_shading_blur"])) > 0


def test_the_blurred_shading_evens_small_droplets_and_leaves_large_ones():
    """Inside the rim band, a blurred droplet's colour varies about its core colour by the
    blur's gain: hardly at all at r = 2 px under a 2 px blur, nearly as much as before at
    r = 30 px."""
    params = scaled(init_anchored(jax.random.PRNGKey(17), 3, 3), 4.0, 2.0)
    blurred = with_shading_blur(params, 2.0)

    def spread(p, radius):
        profiles, t, _, core = ray_profiles(p, radius, jax.random.PRNGKey(18))
        e = 1.0 / (1.0 + np.exp(-(radius - t) / (2.0 * math.sqrt(3.0) / math.pi)))  # the edge
        inside = profiles[:, t < (1.0 - RIM_BAND) * radius] / e[t < (1.0 - RIM_BAND) * radius][None, :, None]
        return float(np.abs(inside - core).max())

    for radius in (2.0, 30.0):
        gain = math.exp(-0.5 * (2.0 * 2.0 / radius) ** 2)  # 0.135 and 0.991
        assert spread(blurred, radius) == pytest.approx(gain * spread(params, radius), rel=1e-3)


@pytest.mark.parametrize("radius", [3.0, 8.0, 25.0])
def test_blurred_shading_keeps_the_edge_at_r(radius):
    for seed in range(3):
        params = with_shading_blur(scaled(init_anchored(jax.random.PRNGKey(20 + seed), 3, 3), 8.0, 1.5), 3.0)
        edges = edge_positions(*ray_profiles(params, radius, jax.random.PRNGKey(30 + seed)))
        assert edges.size >= RAYS // 2
        assert np.all(np.abs(edges - radius) <= 0.3), (seed, edges.min(), edges.max())


def test_the_tail_reaches_as_far_as_the_renderer_draws():
    """A tail in a colour of its own (channel 1 brighter, the droplet darker in channel 0):
    with the default reach it is gone at 1.5 r; a recipe with reach 2 draws it out to 2 r,
    and beyond the reach every pixel is the background's."""
    params = init_anchored(jax.random.PRNGKey(0), 3, 3)
    mlp = dict(jax.tree_util.tree_map(jnp.zeros_like, params["params"]))
    last = max((k for k in mlp if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    mlp[last] = {**mlp[last], "bias": jnp.asarray([-1.0, 0.0, 0.0, 0.0, 5.0, 0.0])}
    params = {"params": mlp, "edge": {"log_blur": jnp.log(jnp.float32(0.5))}}
    x, y, r = 40.0, 40.0, 10.0
    droplets = Droplets(jnp.asarray([x]), jnp.asarray([y]), jnp.asarray([r]), jnp.asarray([[0.3, 0.3, 0.4]]),
                        jnp.ones(1))
    colour = jnp.asarray([0.6, 0.5, 0.4])
    bg = np.log(np.asarray(colour) / (1 - np.asarray(colour)))
    yy, xx = np.mgrid[0:80, 0:80].astype(np.float32)
    d = np.hypot(xx - x, yy - y) / r
    for reach, fade_start in ((1.5, 1.2), (2.0, 1.6)):
        config = RenderConfig(tile=8, levels=3, reach=reach, fade_start=fade_start)
        change = np.asarray(render_logits(droplets, params, Background(colour, jnp.zeros((3, 5))), (80, 80), config)) - bg
        ring = (d > 1.55) & (d < 1.6)  # past the default reach, within the longer one's flat part
        if reach == 1.5:
            assert np.all(np.abs(change[ring]) < 1e-6)
        else:
            assert np.all(change[ring][:, 1] > 0.3) and np.all(np.abs(change[ring][:, 0]) < 1e-3)
        assert np.all(np.abs(change[d >= reach]) < 1e-6)


def test_edge_reach_draws_a_small_droplets_soft_edge_past_1_5_r():
    """With a 2 px blur the edge of a 3 px droplet runs 5-6 px past its rim. The default reach
    (1.5 r) cuts it off at 4.5 px from the centre; edge_reach_px = 6 draws it out to r + 6 px,
    where it matches the anchored delta, while a large droplet keeps 1.5 r and its tail
    its own reach."""
    params = scaled(init_anchored(jax.random.PRNGKey(3), 3, 3), 3.0, 2.0)
    colour = jnp.asarray([0.6, 0.5, 0.4])
    background = Background(colour, jnp.zeros((3, 5)))
    bg = np.log(np.asarray(colour) / (1 - np.asarray(colour)))
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float32)
    comp = jnp.asarray([0.2, 0.7, 0.4])
    for r in (3.0, 20.0):
        x, y = 48.3, 47.6
        droplets = Droplets(jnp.asarray([x]), jnp.asarray([y]), jnp.asarray([r]), comp[None], jnp.ones(1))
        feats = optics_features(colour, (xx - x) / r, (yy - y) / r, jnp.full(xx.shape, r), comp)
        expected = np.asarray(optics_delta(params, feats))
        dist = np.hypot(xx - x, yy - y)
        plain = np.asarray(render_logits(droplets, params, background, (96, 96), RenderConfig(tile=8, levels=4))) - bg
        wide = np.asarray(render_logits(droplets, params, background, (96, 96),
                                        RenderConfig(tile=8, levels=4, edge_reach_px=6.0))) - bg
        if r == 3.0:
            ring = (dist > 1.6 * r) & (dist < r + 4.0)  # past 1.5 r, before the wide fade starts
            assert np.all(np.abs(plain[ring]) < 1e-6)
            assert np.abs(expected[ring]).max() > 0.05
            np.testing.assert_allclose(wide[ring], expected[ring], atol=1e-4)
            assert np.all(np.abs(wide[dist >= r + 6.0]) < 1e-6)
        else:  # 6 px is inside 1.5 r: nothing changes
            np.testing.assert_array_equal(wide, plain)
    with pytest.raises(BadArgument, match="edge_reach_px"):
        RenderConfig(edge_reach_px=-1.0)
