import dataclasses
import json

import jax
import numpy as np
import pytest

from amortize import io
from amortize.adapt import AdaptConfig, adapt, load_adapt_recipe
from amortize.checkpoint import load_model
from amortize.corpus import load_corpus
from amortize.encoder import EncoderConfig, init_encoder
from amortize.errors import BadInput
from amortize.predict import Predictor
from amortize.simulate import simulate
from amortize.writers import NullWriter

RECIPE = __import__("pathlib").Path(__file__).resolve().parents[1] / "train" / "adapt_tiny.toml"
ENCODER = dataclasses.replace(EncoderConfig.tiny(), stride=2)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, tiny_sim):
    folder = tmp_path_factory.mktemp("corpus")
    for i, image in enumerate(simulate(3, (96, 80), seed=5, config=tiny_sim).images):
        io.write_png(folder / f"img{i}.png", image)
    return folder


def test_phase_schedule():
    cfg = AdaptConfig(cycles=2, wake_steps=3, sleep_steps=2, anchor_fraction=0.0)
    phases = [cfg.phase(s)[:2] for s in range(cfg.steps)]
    assert cfg.steps == 10
    assert phases == [("wake", 0)] * 3 + [("sleep", 0)] * 2 + [("wake", 1)] * 3 + [("sleep", 1)] * 2
    # Half the sleep steps are anchors, interleaved.
    cfg = AdaptConfig(cycles=1, wake_steps=1, sleep_steps=4, anchor_fraction=0.5)
    assert [cfg.phase(s)[0] for s in range(cfg.steps)] == ["wake", "sleep", "anchor", "sleep", "anchor"]


def test_recipe_takes_the_encoder_from_init(tmp_path):
    run = load_adapt_recipe(RECIPE, ENCODER)
    assert run.encoder == ENCODER and run.adapt.cycles == 1 and run.wake.crop == (64, 64)
    bad = tmp_path / "bad.toml"
    bad.write_text(RECIPE.read_text() + "\n[encoder]\nhead_width = 8\n")
    with pytest.raises(BadInput, match="from --init"):
        load_adapt_recipe(bad, ENCODER)
    bad.write_text("[adapt]\ncycles = 0\n")
    with pytest.raises(BadInput, match="cycles"):
        load_adapt_recipe(bad, ENCODER)


def test_wake_sleep_cycle_resumes_refits_and_reloads_for_predict(tmp_path, corpus_dir, optics):
    run = load_adapt_recipe(RECIPE, ENCODER)
    corpus = load_corpus(corpus_dir, run.wake.crop)
    work = tmp_path / "work"
    init = init_encoder(jax.random.PRNGKey(0), ENCODER)
    # Crash after the wake phase, then resume: the sleep phase refits the prior.
    first = adapt(run, corpus, work, init, optics, writer=NullWriter(), progress=False, stop_after=2)
    assert first["step"] == 2
    final = adapt(run, corpus, work, init, optics, writer=NullWriter(), progress=False)
    assert final["step"] == run.adapt.steps == 4
    params, config, step = load_model(work)
    assert step == 4 and "decoder" in params
    assert config["simulation"]["scene"] != json.loads((work / "config.json").read_text())["simulation"]["scene"]
    # The decoder learned in the wake phase moved away from where it started.
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), params["decoder"]["optics"], optics)
    assert max(jax.tree_util.tree_leaves(moved)) > 0

    predictor = Predictor.load(work)
    assert predictor.decoder is not None
    image = io.read_image(corpus_dir / "img0.png")
    table = predictor.predict(image)
    recon = predictor.reconstruct(image, table)
    assert recon.shape == image.shape and np.all((recon >= 0) & (recon <= 1))
