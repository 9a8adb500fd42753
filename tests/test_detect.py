import jax.numpy as jnp
import numpy as np

from amortize.detect import cell_droplets, neighbour_consensus, to_droplet_table
from amortize.droplets import table_columns
from amortize.encoder import CellOutputs

GRID = (6, 6)


def outputs(presence: np.ndarray, offset=None) -> CellOutputs:
    p = np.clip(presence, 1e-6, 1 - 1e-6)
    return CellOutputs(
        logit=jnp.asarray(np.log(p) - np.log1p(-p)),
        offset=jnp.zeros(GRID + (2,)) if offset is None else jnp.asarray(offset),
        offset_scale=jnp.full(GRID + (2,), 0.25),
        log_radius=jnp.full(GRID, np.log(3.0)),
        log_radius_scale=jnp.full(GRID, 0.1),
        composition=jnp.full(GRID + (2,), 0.3),
        composition_scale=jnp.full(GRID + (2,), 0.05),
        background=jnp.full(GRID + (3,), 0.5),
    )


def table(presence, offset=None, shape=(24, 24), threshold=0.5, scale=1.0):
    cells = {k: np.asarray(v) for k, v in cell_droplets(outputs(presence, offset), threshold).items()}
    return to_droplet_table(cells, shape, scale)


def test_one_confident_cell():
    p = np.zeros(GRID)
    p[2, 3] = 0.95
    off = np.zeros(GRID + (2,))
    off[2, 3] = [0.7, -1.2]
    t = table(p, off)
    assert list(t) == table_columns(2, with_std=True)
    assert len(t["x"]) == 1
    np.testing.assert_allclose([t["x"][0], t["y"][0]], [3.5 * 4 - 0.5 + 0.7, 2.5 * 4 - 0.5 - 1.2], atol=1e-5)
    np.testing.assert_allclose(t["radius"], 3.0, rtol=1e-5)
    np.testing.assert_allclose(t["radius_std"], 0.3, rtol=1e-4)
    np.testing.assert_allclose(t["x_std"], 0.25)


def test_presence_split_over_two_cells_is_one_droplet():
    p = np.zeros(GRID)
    p[2, 2], p[2, 3] = 0.42, 0.4
    t = table(p)
    assert len(t["x"]) == 1
    np.testing.assert_allclose(t["presence"], 0.82, atol=1e-4)


def test_two_confident_neighbours_are_two_droplets():
    p = np.zeros(GRID)
    p[2, 2], p[2, 3] = 0.97, 0.93
    assert len(table(p)["x"]) == 2
    # Below CONFIDENT the weaker neighbour is taken for the same droplet split over a border.
    p[2, 3] = 0.8
    assert len(table(p)["x"]) == 1


def test_threshold():
    p = np.zeros(GRID)
    p[1, 1] = 0.45
    assert len(table(p, threshold=0.5)["x"]) == 0
    assert len(table(p, threshold=0.4)["x"]) == 1


def test_droplets_centred_outside_the_image_are_dropped():
    p = np.zeros(GRID)
    p[5, 5] = 0.99  # centre at (21.5, 21.5): outside a 20 x 20 image
    assert len(table(p, shape=(20, 20))["x"]) == 0
    assert len(table(p, shape=(24, 24))["x"]) == 1


def test_scale_maps_back_to_input_pixels():
    p = np.zeros(GRID)
    p[0, 0] = 0.99  # encoder px (1.5, 1.5), r = 3
    t = table(p, scale=2.0)
    # Encoder pixel 1.5 spans input pixels 3..4 -> centre 3.5.
    np.testing.assert_allclose([t["x"][0], t["y"][0], t["radius"][0]], [3.5, 3.5, 6.0], atol=1e-5)


def _pair(comp_b: float, scale_b: float, offset_b: float) -> dict:
    """Cells (2, 2) and (2, 3), both confident; (2, 2) points 2 px right, (2, 3) `offset_b`."""
    p = np.zeros(GRID)
    p[2, 2] = p[2, 3] = 0.95
    off = np.zeros(GRID + (2,))
    off[2, 2, 0], off[2, 3, 0] = 2.0, offset_b
    out = outputs(p, off)
    comp = np.full(GRID + (2,), 0.2)
    comp[2, 3] = comp_b
    scale = np.full(GRID + (2,), 0.05)
    scale[2, 3] = scale_b
    log_r = np.full(GRID, np.log(3.0))
    log_r[2, 3] = np.log(5.0)
    out = out.replace(composition=jnp.asarray(comp), composition_scale=jnp.asarray(scale),
                      log_radius=jnp.asarray(log_r))
    return {k: np.asarray(v) for k, v in neighbour_consensus(out).items()}


def test_cells_claiming_one_droplet_pool_their_estimates():
    # Both centres at x = 11.5: an equal-weight consensus.
    both = _pair(comp_b=0.4, scale_b=0.05, offset_b=-2.0)
    np.testing.assert_allclose(both["composition"][2, 2], 0.3, atol=1e-6)
    np.testing.assert_allclose(both["composition"][2, 3], 0.3, atol=1e-6)
    np.testing.assert_allclose(np.exp(both["log_radius"][2, 2]), np.sqrt(15.0), rtol=1e-5)
    np.testing.assert_allclose(both["x"][2, 2], 11.5, atol=1e-5)
    # A cell twice as unsure counts a quarter as much.
    unsure = _pair(comp_b=0.4, scale_b=0.1, offset_b=-2.0)
    np.testing.assert_allclose(unsure["composition"][2, 2], (0.2 + 0.25 * 0.4) / 1.25, atol=1e-6)


def test_cells_claiming_different_droplets_keep_their_own_estimates():
    apart = _pair(comp_b=0.4, scale_b=0.05, offset_b=2.0)  # centres 4 px apart
    np.testing.assert_allclose(apart["composition"][2, 2], 0.2, atol=1e-6)
    np.testing.assert_allclose(apart["composition"][2, 3], 0.4, atol=1e-6)
    np.testing.assert_allclose(apart["x"][2, 3], 3.5 * 4 - 0.5 + 2.0, atol=1e-5)
