"""The background read off the pixels that no droplet covers (`amortize.background_fit`)."""

import numpy as np
import pytest

from amortize.background_fit import MARGIN, uncovered, uncovered_background
from amortize.droplets import Background, Droplets
from amortize.render import render

SHAPE = (48, 64)


def _droplets(xs, ys, rs):
    return Droplets.from_arrays(xs, ys, rs, [[1.0, 0.0, 0.0]] * len(xs))


def test_uncovered_is_false_within_the_margin_and_true_beyond(tiny_render):
    free = np.asarray(uncovered(_droplets([30.0], [20.0], [6.0]), SHAPE, tiny_render))
    assert free.shape == SHAPE
    assert not free[20, 30] and not free[20, 30 + 7]  # centre, and 1.17 radii out
    assert free[20, 30 + 9] and free[5, 5]  # 1.5 radii out, and far away
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    expected = np.hypot(xx - 30, yy - 20) > MARGIN * 6
    assert np.mean(free == expected) > 0.995  # the same disc, up to rounding on its rim


@pytest.mark.parametrize("colour", [(0.05, 0.04, 0.2), (0.7, 0.75, 0.6)])
def test_background_measured_off_the_gaps_whatever_the_encoder_says(optics, tiny_render, colour):
    drops = _droplets([15.0, 40.0, 50.0], [15.0, 30.0, 10.0], [8.0, 10.0, 5.0])
    truth = Background(np.asarray(colour, np.float32), np.zeros((3, 5), np.float32))
    image = np.asarray(render(drops, optics, truth, SHAPE, tiny_render))
    wrong = Background.flat([0.5, 0.5, 0.5])  # an encoder that only knows grey
    fitted = uncovered_background(image, drops, wrong, SHAPE, tiny_render)
    np.testing.assert_allclose(np.asarray(fitted.colour), colour, atol=0.01)
    assert np.max(np.abs(np.asarray(fitted.illumination))) < 0.05


def test_an_illumination_gradient_is_followed(optics, tiny_render):
    drops = _droplets([20.0], [24.0], [6.0])
    illumination = np.zeros((3, 5), np.float32)
    illumination[:, 0] = 0.8  # brighter to the right
    truth = Background(np.asarray([0.4, 0.4, 0.4], np.float32), illumination)
    image = np.asarray(render(drops, optics, truth, SHAPE, tiny_render))
    fitted = uncovered_background(image, drops, Background.flat([0.4, 0.4, 0.4]), SHAPE, tiny_render)
    assert np.all(np.asarray(fitted.illumination)[:, 0] > 0.5)


def test_a_packed_image_keeps_the_encoders_background(optics, tiny_render):
    ys, xs = np.mgrid[8:48:16, 8:64:16].astype(np.float32)  # every pixel within 11.3 px of one
    drops = _droplets(xs.ravel(), ys.ravel(), [10.0] * xs.size)
    image = np.full(SHAPE + (3,), 0.1, np.float32)
    encoders = Background.flat([0.6, 0.5, 0.4])
    fitted = uncovered_background(image, drops, encoders, SHAPE, tiny_render)
    np.testing.assert_allclose(np.asarray(fitted.colour), [0.6, 0.5, 0.4], atol=1e-6)
