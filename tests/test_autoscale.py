"""The working-scale search of `--scale auto`: a stand-in predictor for the decisions, the
shipped model on the real slide downsampled 4x for the outcome."""

import numpy as np
import pytest

from amortize import autoscale
from amortize.autoscale import choose_scale
from amortize.config import parse_scale
from amortize.predict import resize


class StandIn:
    """Droplets of `radius` input px that the encoder sees only down to 1.5 work px; the
    reconstruction error at each scale comes from `errors`."""

    def __init__(self, radius, errors, count=5):
        self.radius, self.errors, self.count = radius, errors, count
        self.calls = []

    def predict(self, image, threshold, scale):
        self.calls.append(("predict", scale))
        seen = max(self.radius, 1.5 * scale)
        return {"radius": np.full(self.count, seen), "scale": scale}

    def reconstruct(self, image, table, scale):
        self.calls.append(("reconstruct", scale))
        assert table["scale"] == scale
        return image + self.errors[scale]


IMAGE = np.full((100, 120, 3), 0.5, np.float32)


def test_resolved_droplets_cost_one_prediction():
    p = StandIn(radius=6.0, errors={})
    choice = choose_scale(p, IMAGE)
    assert choice.scale == 1.0 and choice.tried == {} and choice.recon is None
    assert p.calls == [("predict", 1.0)]


def test_empty_image_stays_at_scale_one():
    choice = choose_scale(StandIn(radius=1.0, errors={}, count=0), IMAGE)
    assert choice.scale == 1.0 and choice.tried == {}


def test_small_droplets_enlarge_until_resolved():
    # 1.2 px droplets: 4.8 work px at scale 0.25, so 0.125 is never tried.
    p = StandIn(radius=1.2, errors={1.0: 0.06, 0.5: 0.04, 0.25: 0.035, 0.125: 0.0})
    choice = choose_scale(p, IMAGE)
    assert choice.scale == 0.25 and list(choice.tried) == [1.0, 0.5, 0.25]
    assert choice.tried[0.25] == pytest.approx(0.035, rel=1e-4)
    np.testing.assert_allclose(choice.recon, IMAGE + 0.035)
    assert ("predict", 0.125) not in p.calls


def test_enlarging_without_a_better_reconstruction_is_refused():
    p = StandIn(radius=1.2, errors={1.0: 0.05, 0.5: 0.05 * (1 - autoscale.MIN_GAIN / 2)})
    choice = choose_scale(p, IMAGE)
    assert choice.scale == 1.0 and list(choice.tried) == [1.0, 0.5]
    np.testing.assert_allclose(choice.recon, IMAGE + 0.05)


def test_a_further_halving_needs_a_smaller_gain():
    first = 0.06 * (1 - 2 * autoscale.MIN_GAIN)
    p = StandIn(radius=0.5, errors={1.0: 0.06, 0.5: first, 0.25: first * (1 - 2 * autoscale.MIN_FURTHER_GAIN),
                                    0.125: first * (1 - 2 * autoscale.MIN_FURTHER_GAIN) ** 2})
    assert choose_scale(p, IMAGE).scale == 0.125
    p.errors[0.25] = first * (1 - autoscale.MIN_FURTHER_GAIN / 2)
    assert choose_scale(p, IMAGE).scale == 0.5


def test_enlargement_is_capped_by_pixels(monkeypatch):
    monkeypatch.setattr(autoscale, "MAX_PIXELS", 4 * IMAGE.shape[0] * IMAGE.shape[1])
    p = StandIn(radius=1.2, errors={1.0: 0.06, 0.5: 0.04, 0.25: 0.01})
    choice = choose_scale(p, IMAGE)
    assert choice.scale == 0.5 and ("predict", 0.25) not in p.calls


def test_a_given_scale_one_table_is_reused():
    p = StandIn(radius=6.0, errors={})
    table = p.predict(IMAGE, 0.4, 1.0)
    assert choose_scale(p, IMAGE, table=table).table is table and len(p.calls) == 1


@pytest.mark.parametrize("text, value", [("auto", "auto"), (" AUTO ", "auto"), ("2", 2.0), ("0.25", 0.25)])
def test_parse_scale(text, value):
    assert parse_scale(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "big"])
def test_parse_scale_rejects(text):
    with pytest.raises(ValueError):
        parse_scale(text)


def test_shipped_model_enlarges_the_downsampled_slide(default_predictor, shared_droplets_image):
    from amortize import io

    full = io.read_image(shared_droplets_image)
    small = resize(full[:512, :512], 4.0)  # 128 x 128, droplet radii of about 1-4 px
    choice = choose_scale(default_predictor, small)
    assert choice.scale < 1.0
    assert choice.tried[choice.scale] < 0.9 * choice.tried[1.0]
    assert len(choice.table["x"]) > len(default_predictor.predict(small)["x"])
