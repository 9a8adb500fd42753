import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize.config import RenderConfig
from amortize.droplets import Background, Droplets
from amortize.errors import BadArgument
from amortize.optics import apply_optics, optics_features
from amortize.render import (bin_droplets, fade, grid_layout, nearest_droplet, nearest_two, overflow, render,
                             render_logits, tile_candidates)

BG = [0.6, 0.65, 0.55]


def one_droplet(x, y, r, comp=(1.0, 0.0, 0.0)):
    return Droplets.from_arrays([x], [y], [r], [list(comp)])


def reference_render(droplets, optics, background, shape, config):
    """Brute force over every (pixel, droplet) pair; only for tiny tests."""
    h, w = shape
    py, px = np.indices((h, w), dtype=np.float32)
    x, y, r = (np.asarray(a) for a in (droplets.x, droplets.y, droplets.radius))
    present = np.asarray(droplets.presence) >= 0.5
    d = np.sqrt((px[..., None] - x) ** 2 + (py[..., None] - y) ** 2) / r
    d = np.where(present, d, np.inf)
    k = d.argmin(-1)
    dk = d.min(-1)
    dx_r = (px - x[k]) / r[k]
    dy_r = (py - y[k]) / r[k]
    colour = jnp.broadcast_to(jnp.asarray(background.colour), (h, w, 3))
    logit = jnp.log(colour) - jnp.log1p(-colour)
    feats = optics_features(colour, jnp.asarray(dx_r), jnp.asarray(dy_r), jnp.asarray(r[k]),
                            jnp.asarray(droplets.composition)[k])
    delta = apply_optics(optics, feats)
    weight = np.where(np.isfinite(dk), fade(jnp.asarray(np.minimum(dk, 99)), config), 0.0)
    weight = weight * np.asarray(droplets.presence)[k]
    return jax.nn.sigmoid(logit + weight[..., None] * delta)


def test_single_droplet_background_and_centre(optics, tiny_render):
    shape = (24, 24)
    bg = Background.flat(BG)
    img = np.asarray(render(one_droplet(12.0, 12.0, 3.0), optics, bg, shape, tiny_render))
    # Far from the droplet (beyond reach * r) the pixel is exactly the background colour.
    np.testing.assert_allclose(img[0, 0], BG, atol=1e-5)
    np.testing.assert_allclose(img[23, 2], BG, atol=1e-5)
    # At the centre, the pixel is sigmoid(logit(bg) + MLP(features at d = 0)).
    feats = optics_features(jnp.asarray(BG), jnp.zeros(()), jnp.zeros(()), jnp.asarray(3.0),
                            jnp.asarray([1.0, 0.0, 0.0]))
    expect = jax.nn.sigmoid(jnp.log(jnp.asarray(BG) / (1 - jnp.asarray(BG)))
                            + apply_optics(optics, feats))
    np.testing.assert_allclose(img[12, 12], expect, atol=1e-5)
    # The droplet is visibly different from the background (dye absorbs).
    assert np.abs(img[12, 12] - np.asarray(BG)).max() > 0.05


def test_mirror_symmetric_optics_render_symmetric(optics, tiny_render):
    # Zero the weights of the dx/r input: the optics no longer know left from right.
    sym = jax.tree_util.tree_map(lambda a: a, optics)
    kernel = sym["params"]["Dense_0"]["kernel"]
    sym["params"]["Dense_0"]["kernel"] = kernel.at[3].set(0.0)  # inputs: C colours, dx/r, ...
    shape = (21, 21)
    img = np.asarray(render(one_droplet(10.0, 9.0, 4.0), sym, Background.flat(BG), shape,
                            tiny_render))
    np.testing.assert_allclose(img, img[:, ::-1], atol=1e-6)


def test_matches_brute_force_reference(optics, tiny_render):
    rng = np.random.default_rng(0)
    n, shape = 40, (30, 37)
    d = Droplets.from_arrays(
        rng.uniform(-3, 40, n), rng.uniform(-3, 33, n), rng.uniform(1.0, 5.3, n),
        rng.uniform(0, 1, (n, 3)), presence=(rng.uniform(size=n) > 0.2).astype(np.float32),
    )
    bg = Background.flat(BG)
    fast = np.asarray(render(d, optics, bg, shape, tiny_render))
    slow = np.asarray(reference_render(d, optics, bg, shape, tiny_render))
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    assert int(overflow(d, shape, tiny_render)) == 0


def test_nearest_two_are_the_two_smallest_distances_among_the_candidates(tiny_render):
    # Dense, overlapping droplets with some exact duplicates (ties go to the earlier
    # candidate, as a stable sort orders them) and some absent slots.
    rng = np.random.default_rng(4)
    n, shape = 40, (21, 27)
    x, y, r = rng.uniform(-3, 30, n), rng.uniform(-3, 24, n), rng.uniform(1.5, 5, n)
    x[5:8], y[5:8], r[5:8] = x[0], y[0], r[0]
    d = Droplets.from_arrays(x, y, r, rng.uniform(0, 1, (n, 3)),
                             presence=(rng.uniform(size=n) < 0.85).astype(np.float32))
    two, layout = nearest_two(d, shape, tiny_render)
    one, _ = nearest_droplet(d, shape, tiny_render)
    cand = np.asarray(tile_candidates(d, bin_droplets(d, layout, tiny_render), layout, tiny_render))
    py, px = (np.asarray(a) for a in layout.pixel_coordinates())
    cx, cy, cr = (np.asarray(a)[np.maximum(cand, 0)] for a in (d.x, d.y, d.radius))
    d2 = ((px[..., None] - cx[:, None]) ** 2 + (py[..., None] - cy[:, None]) ** 2) / cr[:, None] ** 2
    d2 = np.where(cand[:, None] >= 0, d2, np.inf)
    order = np.argsort(d2, axis=-1, kind="stable")[..., :2]
    want = np.where(np.take_along_axis(d2, order, -1) < np.inf,
                    np.take_along_axis(np.broadcast_to(cand[:, None], d2.shape), order, -1), -1)
    assert (want[..., 1] >= 0).any() and (want[..., 0] < 0).any()  # both kinds of pixel occur
    np.testing.assert_array_equal(np.asarray(two), want)
    np.testing.assert_array_equal(np.asarray(one), want[..., 0])
    assert grid_layout(shape, tiny_render) is layout


def test_absent_droplet_is_not_drawn(optics, tiny_render):
    d = Droplets.from_arrays([8.0], [8.0], [3.0], [[1.0, 0, 0]], presence=[0.0])
    img = np.asarray(render(d, optics, Background.flat(BG), (16, 16), tiny_render))
    np.testing.assert_allclose(img, np.broadcast_to(BG, img.shape), atol=1e-5)


def test_larger_droplet_wins_overlap_by_normalised_distance(tiny_render):
    # Pixel (10, 10) is 4 px from a radius-8 droplet (d = 0.5) and 2 px from a radius-2
    # droplet (d = 1.0): the larger droplet wins there.
    d = Droplets.from_arrays([6.0, 12.0], [10.0, 10.0], [8.0, 2.0], [[1, 0, 0], [0, 1, 0]])
    winner, layout = nearest_droplet(d, (20, 20), tiny_render)
    from amortize.render import _from_tiles

    w = np.asarray(_from_tiles(winner, layout, tiny_render.tile))
    assert w[10, 10] == 0
    assert w[10, 12] == 1  # at its own centre the small droplet shows


def test_droplet_centred_outside_image_still_shows(optics, tiny_render):
    img = np.asarray(render(one_droplet(-2.0, 8.0, 4.0), optics, Background.flat(BG), (16, 16),
                            tiny_render))
    assert np.abs(img[8, 0] - np.asarray(BG)).max() > 0.02


def test_gradients_finite_and_nonzero(optics, tiny_render):
    rng = np.random.default_rng(1)
    n, shape = 6, (24, 24)
    d = Droplets.from_arrays(rng.uniform(4, 20, n), rng.uniform(4, 20, n),
                             rng.uniform(2, 4, n), rng.uniform(0.2, 0.8, (n, 3)),
                             presence=np.full(n, 0.9, np.float32))
    bg = Background(jnp.asarray(BG), jnp.full((3, 5), 0.1))
    target = jnp.full(shape + (3,), 0.5)

    def loss(d, p, b):
        return jnp.mean((render(d, p, b, shape, tiny_render) - target) ** 2)

    gd, gp, gb = jax.grad(loss, argnums=(0, 1, 2))(d, optics, bg)
    for name in ("x", "y", "radius", "composition", "presence"):
        g = np.asarray(getattr(gd, name))
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).max() > 0, name
    for leaf in jax.tree_util.tree_leaves(gp) + jax.tree_util.tree_leaves(gb):
        assert np.all(np.isfinite(leaf))
    assert max(float(jnp.abs(leaf).max()) for leaf in jax.tree_util.tree_leaves(gp)) > 0
    assert float(jnp.abs(gb.illumination).max()) > 0


@pytest.mark.parametrize("softness", [0.0, 0.1])
def test_chunking_changes_neither_values_nor_gradients(optics, tiny_render, softness):
    # Several chunks take the rematerialised path (each chunk's forward pass rerun in the
    # backward pass); one chunk does not. 24 x 24 px in chunks of 100: six, the last padded.
    rng = np.random.default_rng(2)
    n, shape = 12, (24, 24)
    d = Droplets.from_arrays(rng.uniform(0, 24, n), rng.uniform(0, 24, n), rng.uniform(2, 5, n),
                             rng.uniform(0.2, 0.8, (n, 3)), presence=np.full(n, 0.9, np.float32))
    bg = Background(jnp.asarray(BG), jnp.full((3, 5), 0.1))
    config = dataclasses.replace(tiny_render, overlap_softness=softness)
    target = jnp.asarray(rng.uniform(0.3, 0.7, shape + (3,)), jnp.float32)

    def value_and_grads(chunk):
        def loss(d, p, b):
            return jnp.mean((jax.nn.sigmoid(render_logits(d, p, b, shape, config, pixel_chunk=chunk)) - target) ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(d, optics, bg)

    whole, chunked = value_and_grads(24 * 24), value_and_grads(100)
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(chunked)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(whole[1][0].x).max()) > 0


def _largest_intermediate(jaxpr) -> int:
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            biggest = max(biggest, int(np.prod(shape)) if shape else 1)
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _largest_intermediate(inner))
    return biggest


def test_no_pixels_by_droplets_intermediate(optics):
    # 64 x 64 pixels and 2000 slots: a dense renderer would hold 8.2M values; forward and
    # backward must stay far below that.
    shape, n = (64, 64), 2000
    config = RenderConfig()
    rng = np.random.default_rng(0)
    d = Droplets.from_arrays(rng.uniform(0, 64, n), rng.uniform(0, 64, n),
                             rng.uniform(1.5, 4, n), rng.uniform(0, 1, (n, 3)),
                             presence=(rng.uniform(size=n) < 0.02).astype(np.float32))
    bg = Background.flat(BG)

    def loss(d, p):
        return render(d, p, bg, shape, config).sum()

    for fn in (loss, jax.grad(loss, argnums=(0, 1))):
        biggest = _largest_intermediate(jax.make_jaxpr(fn)(d, optics).jaxpr)
        assert biggest < 64 * 64 * n / 20, biggest


def test_cell_overflow_is_counted(tiny_render):
    n = 30  # all in one 4 x 4 px cell, capacity 4
    d = Droplets.from_arrays(np.full(n, 5.0), np.full(n, 5.0), np.full(n, 1.0),
                             np.zeros((n, 3)))
    assert int(overflow(d, (16, 16), tiny_render)) == n - tiny_render.cell_capacity


def test_fade_is_continuous_and_bounded():
    config = RenderConfig()
    d = jnp.linspace(0, 2, 201)
    f = np.asarray(fade(d, config))
    assert f[0] == 1.0 and f[-1] == 0.0
    assert np.all(np.diff(f) <= 1e-7)
    assert np.abs(np.diff(f)).max() < 0.05


def test_a_mostly_absent_slot_does_not_hide_the_droplet_under_it(optics, tiny_render):
    shape = (24, 24)
    bg = Background.flat(BG)
    alone = render(one_droplet(12.0, 12.0, 6.0, (0.5, 0.2, 0.1)), optics, bg, shape, tiny_render)
    with_faint = Droplets.from_arrays([12.0, 13.0], [12.0, 12.0], [6.0, 2.0],
                                      [[0.5, 0.2, 0.1], [0.0, 1.0, 0.0]], presence=[1.0, 0.2])
    np.testing.assert_allclose(render(with_faint, optics, bg, shape, tiny_render), alone, atol=1e-6)


def _overlapping_pair(small_x=11.0):
    # A radius-2.5 droplet overlapping a radius-6 one: their boundary crosses many pixels.
    return Droplets.from_arrays([6.0, small_x], [9.0, 9.5], [6.0, 2.5], [[0.9, 0.1, 0.2], [0.1, 0.8, 0.7]])


def test_soft_compositing_tends_to_the_nearest_droplet(optics, tiny_render):
    rng = np.random.default_rng(3)
    n, shape = 30, (26, 31)
    d = Droplets.from_arrays(rng.uniform(-2, 33, n), rng.uniform(-2, 28, n), rng.uniform(1.5, 5.0, n),
                             rng.uniform(0, 1, (n, 3)))
    bg = Background.flat(BG)
    hard = np.asarray(render(d, optics, bg, shape, tiny_render))
    nearly = np.asarray(render(d, optics, bg, shape, dataclasses.replace(tiny_render, overlap_softness=1e-5)))
    np.testing.assert_allclose(nearly, hard, atol=1e-4)
    soft = np.asarray(render(d, optics, bg, shape, dataclasses.replace(tiny_render, overlap_softness=0.1)))
    assert np.abs(soft - hard).max() > 1e-3  # it does blend where droplets overlap
    # A lone droplet has no second candidate: soft compositing draws it exactly as before.
    lone = one_droplet(12.0, 11.0, 4.0)
    np.testing.assert_allclose(
        np.asarray(render(lone, optics, bg, (24, 24), dataclasses.replace(tiny_render, overlap_softness=0.1))),
        np.asarray(render(lone, optics, bg, (24, 24), tiny_render)), atol=1e-6)


def test_soft_compositing_gradient_matches_finite_differences(optics, tiny_render):
    # Differentiable everywhere, the blend's derivative includes the moving boundary
    # between the two droplets, which finite differences see.
    config = dataclasses.replace(tiny_render, overlap_softness=0.2)
    bg = Background.flat(BG)
    target = jnp.full((20, 20, 3), 0.5)

    def loss(x):
        d = _overlapping_pair(x)
        return jnp.sum((render(d, optics, bg, (20, 20), config) - target) ** 2)

    x0, eps = 11.0, 0.05
    numeric = (float(loss(x0 + eps)) - float(loss(x0 - eps))) / (2 * eps)
    analytic = float(jax.grad(loss)(jnp.float32(x0)))
    assert abs(numeric) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=0.05)


def test_render_config_rejects_negative_softness():
    with pytest.raises(BadArgument, match="overlap_softness"):
        RenderConfig(overlap_softness=-0.1)
