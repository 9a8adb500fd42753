import jax
import jax.numpy as jnp
import numpy as np

from amortize import losses
from amortize.droplets import Background, Droplets
from amortize.encoder import CellOutputs
from amortize.losses import background_at

# Jitted: run op by op, these tests compiled some 400 one-operation programs (test_batch_mean
# alone 11 s of compiling on the 2-core VM); jitted, one program per argument shape.
set_loss = jax.jit(losses.set_loss, static_argnums=3)
batch_set_loss = jax.jit(losses.batch_set_loss, static_argnums=3)

GRID = (8, 8)
SHAPE = (32, 32)


def cells(logit=-8.0, **overrides) -> CellOutputs:
    hc, wc = GRID
    base = dict(
        logit=jnp.full(GRID, logit),
        offset=jnp.zeros(GRID + (2,)),
        offset_scale=jnp.full(GRID + (2,), 0.2),
        log_radius=jnp.full(GRID, jnp.log(3.0)),
        log_radius_scale=jnp.full(GRID, 0.05),
        composition=jnp.full(GRID + (2,), 0.5),
        composition_scale=jnp.full(GRID + (2,), 0.1),
        background=jnp.full(GRID + (3,), 0.6),
    )
    base.update(overrides)
    return CellOutputs(**base)


def one_droplet(x=9.5, y=13.5, r=3.0):
    return Droplets.from_arrays([x, -50.0], [y, 5.0], [r, 2.0], [[0.5, 0.5], [0.1, 0.9]], [1.0, 1.0])


BG = Background.flat([0.6, 0.6, 0.6])


def confident_at(i, j, dx=0.0, dy=0.0):
    logit = jnp.full(GRID, -8.0).at[i, j].set(8.0)
    offset = jnp.zeros(GRID + (2,)).at[i, j].set(jnp.array([dx, dy]))
    return cells(logit=logit, offset=offset)


def test_right_cell_beats_wrong_cell():
    truth = one_droplet()  # (9.5, 13.5) lies in cell (3, 2), centred at (9.5, 13.5)
    good, _ = set_loss(confident_at(3, 2), truth, BG, SHAPE)
    wrong_place, _ = set_loss(confident_at(5, 5), truth, BG, SHAPE)
    shifted, _ = set_loss(confident_at(3, 2, dx=1.0), truth, BG, SHAPE)
    assert good < shifted and good < wrong_place


def test_neighbour_cell_with_offset_is_as_good():
    truth = one_droplet()
    here, _ = set_loss(confident_at(3, 2), truth, BG, SHAPE)
    # The cell to the right, centred at x = 13.5, reaching back 4 px.
    neighbour, _ = set_loss(confident_at(3, 3, dx=-4.0), truth, BG, SHAPE)
    np.testing.assert_allclose(here, neighbour, atol=1e-2)


def test_stride_two_grid_finds_its_own_cell():
    """On a 16 x 16 grid of 2 px cells, (8.5, 12.5) is the centre of cell (6, 4)."""
    grid = (16, 16)
    logit = jnp.full(grid, -8.0).at[6, 4].set(8.0)

    def at_stride_two(logit, dx=0.0):
        return CellOutputs(
            logit=logit,
            offset=jnp.zeros(grid + (2,)).at[..., 0].set(dx),
            offset_scale=jnp.full(grid + (2,), 0.2),
            log_radius=jnp.full(grid, jnp.log(3.0)),
            log_radius_scale=jnp.full(grid, 0.05),
            composition=jnp.full(grid + (2,), 0.5),
            composition_scale=jnp.full(grid + (2,), 0.1),
            background=jnp.full(grid + (3,), 0.6),
            stride=2,
        )

    truth = one_droplet(x=8.5, y=12.5)
    good, parts = set_loss(at_stride_two(logit), truth, BG, SHAPE)
    # The neighbour to the right is centred 2 px away and reaches back by its offset.
    neighbour, _ = set_loss(at_stride_two(jnp.roll(logit, 1, axis=1), dx=-2.0), truth, BG, SHAPE)
    far, _ = set_loss(at_stride_two(jnp.roll(logit, 3, axis=1)), truth, BG, SHAPE)
    np.testing.assert_allclose(good, neighbour, atol=1e-2)
    assert good < far
    # Same per-droplet likelihood as a centred cell at stride 4 (see the test above).
    _, at_four = set_loss(confident_at(3, 2), one_droplet(), BG, SHAPE)
    np.testing.assert_allclose(parts["mixture"], at_four["mixture"], atol=0.1)


def test_count_term_is_gaussian_nll():
    truth = one_droplet()
    _, parts = set_loss(confident_at(3, 2), truth, BG, SHAPE)
    p = jax.nn.sigmoid(8.0)
    q = jax.nn.sigmoid(-8.0)
    mean = p + 63 * q
    var = p * (1 - p) + 63 * q * (1 - q) + 1e-3
    expected = 0.5 * ((1 - mean) ** 2 / var + np.log(2 * np.pi * var))
    np.testing.assert_allclose(parts["count"], expected, rtol=1e-4)
    assert int(parts["n_true"]) == 1  # the droplet outside the image does not count


def test_slot_order_and_absent_slots_do_not_matter():
    a = Droplets.from_arrays([5.5, 20.0], [5.5, 21.0], [2.0, 4.0], [[0.2, 0.3], [0.8, 0.1]])
    b = Droplets.from_arrays([20.0, 7.0, 5.5], [21.0, 2.0, 5.5], [4.0, 9.0, 2.0],
                             [[0.8, 0.1], [0.5, 0.5], [0.2, 0.3]], [1.0, 0.0, 1.0])
    out = cells(logit=jax.random.normal(jax.random.PRNGKey(0), GRID))
    la, _ = set_loss(out, a, BG, SHAPE)
    lb, _ = set_loss(out, b, BG, SHAPE)
    np.testing.assert_allclose(la, lb, rtol=1e-6)


def test_background_term_zero_when_exact():
    bg = Background(jnp.array([0.3, 0.5, 0.7]), jnp.zeros((3, 5)).at[0, 0].set(0.4))
    from amortize.encoder import cell_centres

    xx, yy = cell_centres(GRID, 4)
    exact = background_at(bg, SHAPE, xx, yy)
    _, parts = set_loss(cells(background=exact), one_droplet(), bg, SHAPE)
    assert float(parts["background"]) < 1e-8
    # The field varies across the image (illumination), so a flat guess is worse.
    _, flat = set_loss(cells(background=jnp.full(GRID + (3,), 0.5)), one_droplet(), bg, SHAPE)
    assert float(flat["background"]) > 1.0


def test_cells_outside_image_do_not_count():
    # A 30 x 30 image: the last row and column of cells are centred outside it.
    logit = jnp.full(GRID, -8.0).at[7, 7].set(8.0)
    _, parts = set_loss(cells(logit=logit), one_droplet(), BG, (26, 26))
    _, base = set_loss(cells(), one_droplet(), BG, (26, 26))
    np.testing.assert_allclose(parts["count"], base["count"], rtol=1e-5)


def test_gradients_finite_even_with_empty_scene():
    empty = Droplets.from_arrays([-40.0], [-40.0], [2.0], [[0.5, 0.5]], [0.0])
    for truth in (one_droplet(), empty):
        grads = jax.jit(jax.grad(lambda o: set_loss(o, truth, BG, SHAPE)[0]))(cells())
        assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_batch_mean():
    out = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), confident_at(3, 2))
    truth = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), one_droplet())
    bg = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), BG)
    loss, _ = batch_set_loss(out, truth, bg, SHAPE)
    single, _ = set_loss(confident_at(3, 2), one_droplet(), BG, SHAPE)
    np.testing.assert_allclose(loss, single, rtol=1e-6)
