import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize.clutter import add_clutter, box_distance, segment_distance
from amortize.config import NuisanceConfig, SimulationConfig
from amortize.errors import BadArgument
from amortize.simulate import simulate


def test_segment_and_box_distances_are_exact():
    xx = jnp.array([0.0, 5.0, 12.0, 5.0])
    yy = jnp.array([3.0, 0.0, 0.0, -4.0])
    # Segment from (0, 0) to (10, 0): above its start, above its middle, past its end.
    np.testing.assert_allclose(segment_distance(xx, yy, 0.0, 0.0, 10.0, 0.0), [3.0, 0.0, 2.0, 4.0])
    # Box centred at (5, 0), half sizes 2 x 1: outside corner-wise, inside, outside along x.
    d = box_distance(jnp.array([8.0, 5.0, 10.0]), jnp.array([2.0, 0.0, 0.0]), 5.0, 0.0, 2.0, 1.0)
    np.testing.assert_allclose(d, [np.hypot(1.0, 1.0), -1.0, 3.0], rtol=1e-6)


def _config(**nuisance):
    base = SimulationConfig.tiny()
    return dataclasses.replace(base, nuisance=dataclasses.replace(base.nuisance, **nuisance))


def test_clutter_changes_the_image_and_never_the_truth():
    plain = simulate(3, (96, 80), seed=5, config=_config())
    off = simulate(3, (96, 80), seed=5, config=_config(clutter_probability=0.0))
    on = simulate(3, (96, 80), seed=5, config=_config(clutter_probability=1.0))
    np.testing.assert_array_equal(plain.images, off.images)
    for a, b in zip(plain.tables, on.tables):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6)  # another program: ulps may differ
    assert not np.array_equal(plain.images, on.images)
    assert on.images.min() >= 0.0 and on.images.max() <= 1.0


def test_every_kind_of_clutter_draws_something_over_many_scenes():
    image = jnp.full((64, 96, 3), 0.5)
    config = NuisanceConfig(clutter_probability=1.0, vignette_max=0.0)
    changed = np.stack([np.asarray(add_clutter(jax.random.PRNGKey(i), image, config)) != 0.5
                        for i in range(12)]).any(axis=-1)
    assert changed.any(axis=(1, 2)).mean() > 0.5  # most scenes carry some clutter
    assert not changed.all()  # and it never covers everything
    vignetted = add_clutter(jax.random.PRNGKey(0), image, NuisanceConfig(clutter_probability=1.0,
                                                                       clutter_lines=0, clutter_fibres=0,
                                                                       vignette_max=0.9))
    corner, middle = float(vignetted[0, 0, 0]), float(vignetted[32, 48, 0])
    assert corner <= middle


@pytest.mark.parametrize("field, value", [("clutter_probability", 1.5), ("clutter_lines", -1),
                                          ("vignette_max", 1.0)])
def test_bad_clutter_settings_are_refused(field, value):
    with pytest.raises(BadArgument, match=field):
        NuisanceConfig(**{field: value})
