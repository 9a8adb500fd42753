import numpy as np

from amortize.overlay import composition_colour, draw_overlay


def test_circle_is_drawn_on_the_rim_not_the_centre():
    image = np.full((40, 40, 3), 0.5, np.float32)
    table = {"x": np.array([20.0]), "y": np.array([20.0]), "radius": np.array([8.0]),
             "comp_0": np.array([1.0]), "comp_1": np.array([0.0]), "comp_2": np.array([0.0])}
    out = draw_overlay(image, table)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert tuple(out[20, 20]) == (128, 128, 128)  # the centre is untouched
    assert tuple(out[20, 28]) == (255, 40, 40)  # the rim, coloured by composition


def test_colours():
    assert composition_colour(np.array([0.0, 0.0, 0.0])) == (255, 255, 255)  # no dye: white
    assert composition_colour(np.array([0.0, 1.0])) == (40, 255, 40)
    assert composition_colour(np.array([0.2, 0.2, 0.4]))[2] == 255
