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

    largest_radius = 40.0

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


class ShrinkStandIn(StandIn):
    """Finds `found[scale]` droplets of `work_radius[scale]` working px (12 unless given) at
    each scale; errors per scale as before."""

    def __init__(self, errors, found, work_radius=None):
        super().__init__(radius=6.0, errors=errors)
        self.found, self.work_radius = found, work_radius or {}

    def predict(self, image, threshold, scale):
        self.calls.append(("predict", scale))
        n = self.found.get(scale, 0)
        r = self.work_radius.get(scale, 12.0) * scale
        return {"x": np.zeros(n), "radius": np.full(n, r), "scale": scale}


BIG = np.full((512, 640, 3), 0.5, np.float32)  # shrunk scales 2, 4 and 8 (short side >= 64)


def test_shrunk_scales_stop_at_the_smallest_working_side():
    assert autoscale.shrink_scales(BIG.shape) == [2.0, 4.0, 8.0]
    assert autoscale.shrink_scales((127, 1000)) == []
    assert autoscale.shrink_scales((128, 128)) == [2.0]


def test_large_droplets_shrink_to_the_scale_that_explains_the_image_best():
    # The error is not monotone in the scale: every shrunk scale is weighed, 8 wins.
    p = ShrinkStandIn(errors={1.0: 0.12, 2.0: 0.11, 4.0: 0.118, 8.0: 0.075},
                      found={1.0: 3, 2.0: 1, 4.0: 1, 8.0: 2})
    choice = choose_scale(p, BIG)
    assert choice.scale == 8.0 and len(choice.table["x"]) == 2
    assert choice.tried == pytest.approx({1.0: 0.12, 2.0: 0.11, 4.0: 0.118, 8.0: 0.075}, rel=1e-4)
    np.testing.assert_allclose(choice.recon, BIG + 0.075)


def test_droplets_read_at_the_encoders_largest_radius_are_not_weighed():
    # Scale 4 reads the droplet at 39 working px, at the ceiling of the encoder's 40 px, and
    # explains the image a shade better than 8, where it is read at 25 px: 8 is chosen.
    p = ShrinkStandIn(errors={1.0: 0.11, 2.0: 0.09, 4.0: 0.0859, 8.0: 0.086}, found={1.0: 1, 2.0: 1, 4.0: 1, 8.0: 1},
                      work_radius={1.0: 38.5, 2.0: 39.0, 4.0: 39.0, 8.0: 25.0})
    choice = choose_scale(p, BIG)
    assert choice.scale == 8.0 and set(choice.tried) == {1.0, 8.0}
    assert ("reconstruct", 4.0) not in p.calls and ("predict", 4.0) in p.calls


def test_fine_detail_on_a_shrunk_image_is_not_weighed():
    # Scale 8 would explain the image much better, but with droplets of 4 working px: detail
    # near the encoder's smallest radii, not large droplets. Nothing is rendered.
    p = ShrinkStandIn(errors={1.0: 0.12, 8.0: 0.05}, found={1.0: 30, 2.0: 20, 4.0: 10, 8.0: 5},
                      work_radius={1.0: 6.0, 2.0: 5.0, 4.0: 4.5, 8.0: 4.0})
    choice = choose_scale(p, BIG)
    assert choice.scale == 1.0 and choice.tried == {} and choice.recon is None
    assert not any(call[0] == "reconstruct" for call in p.calls)


def test_shrinking_needs_a_clear_gain_and_an_answer():
    # 8 finds nothing (not weighed); 2 explains the image only 2 % better than scale 1.
    gain = 1 - autoscale.MIN_SHRINK_GAIN / 2.5
    p = ShrinkStandIn(errors={1.0: 0.05, 2.0: 0.05 * gain, 4.0: 0.08}, found={1.0: 40, 2.0: 30, 4.0: 5})
    choice = choose_scale(p, BIG)
    assert choice.scale == 1.0 and set(choice.tried) == {1.0, 2.0, 4.0}
    assert ("reconstruct", 8.0) not in p.calls and ("predict", 8.0) in p.calls
    np.testing.assert_allclose(choice.recon, BIG + 0.05)  # scale 1's, already rendered


def _one_droplet(radius: float, size: int) -> np.ndarray:
    """One built-in droplet of `radius` px in the middle of a size x size frame, light noise."""
    import jax.numpy as jnp

    from amortize.config import RenderConfig
    from amortize.droplets import Background, Droplets
    from amortize.optics import default_optics_params
    from amortize.render import render

    droplets = Droplets(x=jnp.array([size / 2 - 0.3]), y=jnp.array([size / 2 + 0.2]),
                        radius=jnp.array([radius]), composition=jnp.array([[0.7, 0.2, 0.1]]),
                        presence=jnp.ones(1))
    background = Background(colour=jnp.array([0.7, 0.65, 0.55]), illumination=jnp.zeros((3, 5)))
    levels = max(4, int(np.ceil(np.log2(radius / 5.0))) + 2)  # the renderer's reach covers the radius
    image = np.asarray(render(droplets, default_optics_params(3, 3), background, (size, size),
                              RenderConfig(levels=levels)))
    noise = 0.01 * np.random.default_rng(0).standard_normal(image.shape)
    return np.clip(image + noise, 0, 1).astype(np.float32)


def test_shipped_model_finds_a_200_px_droplet_with_no_scale_given(default_predictor):
    image = _one_droplet(200.0, 512)
    choice = choose_scale(default_predictor, image)
    assert choice.scale == 8.0  # 25 working px; at scale 1 the droplet is out of view
    t = choice.table
    big = t["radius"] > 20
    assert big.sum() == 1
    assert abs(t["radius"][big][0] / 200.0 - 1) <= 0.05
    assert np.hypot(t["x"][big][0] - 255.7, t["y"][big][0] - 256.2) <= 0.05 * 200


def test_shipped_model_finds_a_2_px_droplet_with_no_scale_given(default_predictor):
    # A lone droplet of r = 2 px on an empty 256 px frame (in a 128 px frame the same droplet
    # reads 15-30 % large: the encoder's view reaches the frame's edges; see the model card).
    image = _one_droplet(2.0, 256)
    choice = choose_scale(default_predictor, image)
    t = choice.table
    assert len(t["x"]) == 1
    assert abs(t["radius"][0] / 2.0 - 1) <= 0.05
    assert np.hypot(t["x"][0] - 127.7, t["y"][0] - 128.2) <= 0.5
