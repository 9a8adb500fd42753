import dataclasses
import json

import jax
import numpy as np
import pytest

from amortize import readout
from amortize import train as train_mod
from amortize.checkpoint import load_model
from amortize.errors import BadArgument
from amortize.predict import Predictor
from amortize.readout import (
    BACKGROUND_RINGS, RING_FRACTIONS, ReadoutConfig, droplet_features, fit_readout, init_readout,
    n_features, read_out,
)
from amortize.train import RunConfig, train
from amortize.writers import NullWriter


def _logit(p):
    return np.log(p / (1 - p))


def _disc_image(h, w, x, y, r, inside, outside):
    yy, xx = np.mgrid[0:h, 0:w]
    disc = np.hypot(xx - x, yy - y) <= r
    return np.where(disc[..., None], np.asarray(inside, np.float32), np.asarray(outside, np.float32))


def test_features_of_a_flat_disc_are_its_log_odds_contrast():
    inside, outside = [0.2, 0.5, 0.7], [0.6, 0.6, 0.6]
    image = _disc_image(96, 96, 47.3, 40.6, 20.0, inside, outside)
    feats = droplet_features(image, [47.3], [40.6], [20.0], [[0.1, 0.5, 0.9]])
    assert feats.shape == (1, n_features(3, 3))
    n_inner = len(RING_FRACTIONS) - BACKGROUND_RINGS
    rings = feats[0, : 3 * n_inner].reshape(n_inner, 3)
    # Every ring inside the rim reads the disc, relative to the local background.
    np.testing.assert_allclose(rings[:-1], np.tile(_logit(np.array(inside)) - _logit(0.6), (n_inner - 1, 1)), atol=1e-4)
    np.testing.assert_allclose(feats[0, 3 * n_inner : 3 * n_inner + 3], _logit(0.6), atol=1e-4)
    np.testing.assert_allclose(feats[0, -4], np.log(20.0), rtol=1e-6)
    np.testing.assert_allclose(feats[0, -3:], [0.1, 0.5, 0.9])


def test_features_of_many_droplets_are_independent_of_their_count():
    image = _disc_image(80, 80, 30, 30, 8, [0.3, 0.3, 0.3], [0.7, 0.7, 0.7])
    one = droplet_features(image, [30.0], [30.0], [8.0], [[0.5, 0.5, 0.5]])
    many = droplet_features(image, [30.0] + [60.0] * 300, [30.0] + [10.0] * 300, [8.0] * 301,
                            np.full((301, 3), 0.5))
    assert many.shape == (301, one.shape[1])
    np.testing.assert_allclose(many[0], one[0], atol=1e-6)


def test_unfitted_readout_returns_the_encoders_composition():
    params = init_readout(ReadoutConfig.tiny(), 3, 3)
    image = np.full((64, 64, 3), 0.5, np.float32)
    table = {"x": np.array([20.0, 40.0]), "y": np.array([30.0, 10.0]), "radius": np.array([5.0, 3.0]),
             "presence": np.array([0.9, 0.8]), "comp_0": np.array([0.1, 0.9]),
             "comp_1": np.array([0.5, 0.3]), "comp_2": np.array([0.7, 0.2])}
    out = read_out(params, image, table)
    for k in range(3):
        np.testing.assert_allclose(out[f"comp_{k}"], table[f"comp_{k}"], atol=1e-5)
    empty = {k: v[:0] for k, v in table.items()}
    assert read_out(params, image, empty) is empty


def test_readout_works_in_the_work_images_pixels():
    params = init_readout(ReadoutConfig.tiny(), 3, 3)
    params["mlp"] = jax.tree_util.tree_map(lambda a: a + 0.3, params["mlp"])  # not the identity
    work = _disc_image(64, 64, 30.0, 25.0, 6.0, [0.2, 0.4, 0.3], [0.7, 0.6, 0.5])
    comps = {"presence": np.array([0.9]), "comp_0": np.array([0.3]), "comp_1": np.array([0.5]),
             "comp_2": np.array([0.6])}
    at_work = read_out(params, work, {"x": np.array([30.0]), "y": np.array([25.0]),
                                      "radius": np.array([6.0]), **comps})
    # The same droplet in the px of an input twice the size (pixel-centre convention).
    at_input = read_out(params, work, {"x": np.array([60.5]), "y": np.array([50.5]),
                                       "radius": np.array([12.0]), **comps}, scale=2.0)
    assert abs(at_work["comp_0"][0] - 0.3) > 1e-3
    for k in range(3):
        np.testing.assert_allclose(at_input[f"comp_{k}"], at_work[f"comp_{k}"], atol=1e-5)


def _synthetic_examples(n=4000, scenes=40, seed=0):
    """Features whose first column says how far the encoder's composition is off."""
    rng = np.random.default_rng(seed)
    f = n_features(3, 3)
    feats = rng.normal(size=(n, f)).astype(np.float32)
    truth = rng.uniform(0.05, 0.95, (n, 3)).astype(np.float32)
    shift = 0.8 * feats[:, :1]
    feats[:, -3:] = 1 / (1 + np.exp(-(_logit(truth) + shift)))  # the encoder's biased answer
    return feats, truth, rng.integers(0, scenes, n)


def test_fit_readout_learns_a_correction_on_held_out_scenes():
    feats, truth, groups = _synthetic_examples()
    config = ReadoutConfig(scenes=40, steps=600, batch_size=256, hidden=(32,))
    params, metrics = fit_readout(feats, truth, groups, config)
    assert metrics["droplets_heldout"] > 0
    assert metrics["heldout_comp_rmse_readout"] < 0.5 * metrics["heldout_comp_rmse_encoder"]
    # With droplets in a single scene there is nothing to check a fit on: the identity.
    params, metrics = fit_readout(feats[:50], truth[:50], np.zeros(50, int), config)
    assert metrics["droplets_fit"] == 0
    out = np.asarray(readout.corrected(params, feats[:50]))
    np.testing.assert_allclose(out, feats[:50, -3:], atol=1e-5)


def test_readout_config_is_checked():
    with pytest.raises(BadArgument, match="scenes"):
        ReadoutConfig(scenes=-1)
    with pytest.raises(BadArgument, match="holdout"):
        ReadoutConfig(holdout=1.0)
    with pytest.raises(BadArgument, match="size"):
        ReadoutConfig(size=(16, 64))


def test_training_fits_the_readout_after_the_encoder_and_resumes(tmp_path, monkeypatch):
    calls = []

    def examples(predictor, run, config, progress=False):
        calls.append(int(predictor.step))
        return _synthetic_examples(n=600, scenes=10)

    monkeypatch.setattr(train_mod, "simulated_examples", examples)
    run = dataclasses.replace(RunConfig.tiny(), readout=ReadoutConfig.tiny())
    metrics = train(run, tmp_path, writer=NullWriter(), progress=False)
    assert calls == [run.train.steps]  # after the encoder's last step
    assert metrics["droplets_fit"] > 0 and np.isfinite(metrics["heldout_comp_rmse_readout"])
    params, config, step = load_model(tmp_path)
    assert step == run.train.steps + 1 and "readout" in params
    assert config["readout"]["scenes"] == ReadoutConfig.tiny().scenes
    predictor = Predictor.load(tmp_path)
    assert predictor.readout is not None
    # Resuming a finished run neither trains nor refits.
    train(run, tmp_path, writer=NullWriter(), progress=False)
    assert calls == [run.train.steps] and load_model(tmp_path)[2] == run.train.steps + 1


def test_a_finished_run_without_a_readout_table_gains_one(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "simulated_examples",
                        lambda predictor, run, config, progress=False: _synthetic_examples(n=600, scenes=10))
    run = RunConfig.tiny()
    train(run, tmp_path, writer=NullWriter(), progress=False)
    # As saved before recipes had a [readout] table.
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["readout"]
    config_file.write_text(json.dumps(saved))
    assert "readout" not in load_model(tmp_path)[0]
    with_readout = dataclasses.replace(run, readout=ReadoutConfig.tiny())
    train(with_readout, tmp_path, writer=NullWriter(), progress=False)
    params, config, step = load_model(tmp_path)
    assert "readout" in params and step == run.train.steps + 1
    assert json.loads(config_file.read_text())["readout"]["scenes"] == ReadoutConfig.tiny().scenes
