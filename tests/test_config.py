import math

import pytest

from amortize.config import (
    RenderConfig,
    SceneConfig,
    SimulationConfig,
    from_dict,
    to_dict,
)
from amortize.errors import BadArgument


def test_round_trip_through_dict():
    config = SimulationConfig.tiny()
    assert from_dict(SimulationConfig, to_dict(config)) == config


def test_unknown_field_is_rejected():
    with pytest.raises(BadArgument, match="unknown field"):
        from_dict(SceneConfig, {"densty": 3.0})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"radius_min": 5.0, "radius_max": 2.0},
        {"density": 0.0},
        {"noise_min": 0.1, "noise_max": 0.01},
        {"channels": 2},
    ],
)
def test_bad_scene_values_name_the_field(kwargs):
    with pytest.raises(BadArgument):
        SceneConfig(**kwargs)


def test_radius_beyond_renderer_reach_is_rejected():
    with pytest.raises(BadArgument, match="largest radius"):
        SimulationConfig(scene=SceneConfig(radius_max=100.0), render=RenderConfig())


def test_log_radius_prior_spans_range():
    mean, sd = SceneConfig(radius_min=2.0, radius_max=32.0).log_radius_prior
    assert mean == pytest.approx(math.log(8.0))  # geometric centre of [2, 32]
    assert sd == pytest.approx(math.log(16.0) / 4)  # the range spans +-2 sd


def test_slots_cover_expected_count():
    scene = SceneConfig(density=10.0)
    assert scene.n_slots((100, 100)) > scene.expected_count((100, 100))
