"""`amortize adapt FOLDER --out MODEL` (amortize/adapt_corpus.py) with a tiny model and recipe."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from amortize import adapt_corpus, io
from amortize.checkpoint import save_model
from amortize.config import SimulationConfig, to_dict
from amortize.corpus import Corpus
from amortize.encoder import EncoderConfig, init_encoder
from amortize.errors import BadArgument, BadInput
from amortize.predict import Predictor
from amortize.readout import ReadoutConfig, init_readout
from amortize.train import RunConfig, TrainConfig

TINY_RECIPE = """
[simulation.scene]
density = 30.0
radius_min = 1.5
radius_max = 6.0

[simulation.render]
tile = 4
levels = 3
cell_capacity = 4
tile_candidates = 8

[train]
crop = [64, 64]
batch_size = 2

[wake]
crop = [64, 64]
batch_size = 2
border = 4

[adapt]
optics_start = "model"
keep_readout = true
cycles = 2
wake_steps = 2
sleep_steps = 2
refit_crops = 2
checkpoint_every = 2
log_every = 1
preview_every = 4
"""


@pytest.fixture(scope="module")
def init_model(tmp_path_factory, tiny_sim):
    """An untrained tiny encoder with a fitted-flagged read-out, saved as a model."""
    encoder = dataclasses.replace(EncoderConfig.tiny(), stride=2)
    run = RunConfig(tiny_sim, encoder, TrainConfig.tiny())
    params = dict(init_encoder(jax.random.PRNGKey(0), encoder))
    params["readout"] = {**init_readout(ReadoutConfig(), 3, 3), "fitted": np.ones((), np.int32)}
    path = tmp_path_factory.mktemp("init") / "model"
    save_model(path, params, to_dict(run), step=3)
    return path


@pytest.fixture
def small_scores(monkeypatch):
    """The job's fixed sizes cut down to what a tiny test can afford."""
    for name, value in [("LOOK_CROPS", 2), ("LOOK_FIT_STEPS", 1), ("SCORE_CROPS", 4), ("SCORE_FIT_STEPS", 2),
                        ("FINAL_CROPS", 2), ("FINAL_FIT_STEPS", 1), ("BOOTSTRAP", 50)]:
        monkeypatch.setattr(adapt_corpus, name, value)
    monkeypatch.setattr(adapt_corpus, "choose_start_look", _two_looks(adapt_corpus.choose_start_look))


def _two_looks(choose):
    # Only the built-in droplet and one look: the rest are the same code path, eight times.
    def limited(predictor, crops, border, render_config, progress):
        looks = dict(adapt_corpus.LOOKS)
        try:
            adapt_corpus.LOOKS.clear()
            adapt_corpus.LOOKS["disc"] = looks["disc"]
            return choose(predictor, crops, border, render_config, progress)
        finally:
            adapt_corpus.LOOKS.clear()
            adapt_corpus.LOOKS.update(looks)
    return limited


def _corpus(n, shape=(200, 120)):
    images = [np.full(shape + (3,), i, np.uint8) for i in range(n)]
    return Corpus(images, [io.pathlib.Path(f"im{i}.png") for i in range(n)], [])


def test_several_images_are_held_out_whole_and_evenly_spread():
    split = adapt_corpus.split_corpus(_corpus(10), (64, 64))
    held = sorted(int(im[0, 0, 0]) for im in split.heldout.images)
    assert len(held) == 2 and len(split.fit.images) == 8
    assert set(held).isdisjoint(int(im[0, 0, 0]) for im in split.fit.images)
    assert 0 not in held and 9 not in held  # spread inside, not the first or last
    assert "2 of 10 images held out" in split.how


def test_few_images_lose_their_end_quarter_along_the_longer_side():
    split = adapt_corpus.split_corpus(_corpus(2, (200, 120)), (32, 32))
    assert [im.shape[:2] for im in split.fit.images] == [(150, 120)] * 2
    assert [im.shape[:2] for im in split.heldout.images] == [(50, 120)] * 2
    wide = adapt_corpus.split_corpus(_corpus(1, (100, 400)), (32, 32))
    assert wide.fit.images[0].shape[:2] == (100, 300) and wide.heldout.images[0].shape[:2] == (100, 100)


def test_an_image_too_small_to_split_is_named():
    with pytest.raises(BadInput, match="im0.png.*too small to hold out"):
        adapt_corpus.split_corpus(_corpus(1, (100, 100)), (64, 64))


def test_paired_win_rate_sees_a_consistent_gain_and_not_noise():
    base = np.linspace(0.1, 0.2, 20)
    assert adapt_corpus.paired_win_rate(base - 0.01, base) == 1.0
    assert adapt_corpus.paired_win_rate(base + 0.01, base) == 0.0
    noise = np.random.default_rng(0).normal(0, 0.01, 20)
    noise -= noise.mean()
    assert 0.2 < adapt_corpus.paired_win_rate(base + noise, base) < 0.8


def test_adapt_resumes_after_a_kill_and_writes_a_model_predict_loads(tmp_path, corpus_dir, init_model, small_scores):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "adapted"
    lines = []
    kw = dict(init=init_model, recipe=recipe, progress=False, report=lines.append)
    # Killed after three wake-sleep steps: nothing at --out yet, the job's choices are kept.
    assert adapt_corpus.adapt_folder(corpus_dir, out, stop_after=3, **kw) is None
    assert not out.exists()
    job = json.loads((tmp_path / "adapted.work" / "job.json").read_text())
    assert job["look"] in ("built-in", "disc") and job["scale"] > 0
    assert "1 of 3 images held out (img1.png)" in job["split"]
    # Run again: it resumes there, keeps a snapshot per cycle and chooses among them.
    summary = adapt_corpus.adapt_folder(corpus_dir, out, **kw)
    assert sorted(p.name for p in (tmp_path / "adapted.work" / "candidates").iterdir()) == ["cycle_1", "cycle_2"]
    assert set(summary["heldout_rmse"]) == {"init", "cycle_1", "cycle_2"}
    assert all(np.isfinite(v) for v in summary["heldout_rmse"].values())
    assert summary["chosen"] in summary["heldout_rmse"] and summary["verdict"] in " ".join(lines)
    assert json.loads((out / "adapt.json").read_text())["chosen"] == summary["chosen"]
    predictor = Predictor.load(out)
    assert predictor.decoder is not None and predictor.readout is not None
    image = io.read_image(corpus_dir / "img0.png")
    table = predictor.predict(image)
    assert predictor.reconstruct(image, table).shape == image.shape
    # The model is not replaced without force, and a workdir of another job is refused.
    with pytest.raises(BadArgument, match="not empty"):
        adapt_corpus.adapt_folder(corpus_dir, out, **kw)
    with pytest.raises(BadArgument, match="holds an adaptation of"):
        adapt_corpus.adapt_folder(tmp_path, tmp_path / "other", workdir=tmp_path / "adapted.work", **kw)


def test_cli_refuses_a_non_empty_out_in_one_line(tmp_path, corpus_dir):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "amortize.cli", "adapt", str(corpus_dir), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"amortize adapt: error: {out}: exists and is not empty "
                                                "(use --force to replace it)"]


def test_the_default_recipes_sleep_scenes_get_a_hard_core_and_keep_a_harder_one(tmp_path):
    run = adapt_corpus.load_adapt_recipe(adapt_corpus.DEFAULT_RECIPE, EncoderConfig.tiny(), SimulationConfig.tiny())
    assert run.simulation.scene.min_separation == 0.0
    assert adapt_corpus.with_hard_core(run, 0.5).simulation.scene.min_separation == 0.5
    hard = adapt_corpus.with_hard_core(run, 0.8)
    assert adapt_corpus.with_hard_core(hard, 0.5).simulation.scene.min_separation == 0.8
    assert adapt_corpus.with_hard_core(run, 0.5).simulation.render == run.simulation.render


def test_anchor_steps_draw_the_init_models_family_with_its_own_jitters():
    # A recipe for anchored optics (blur and shading jitter) started from a model trained with
    # free optics and other looks: the anchor steps keep the model's looks and its jitters
    # (blur jitter needs anchored optics and would stop the run), the recipe's batch and crop.
    recipe = TrainConfig(crop=(96, 96), batch_size=3, blur_jitter=0.5, shading_jitter=0.25, optics_jitter=0.1)
    init = TrainConfig(looks=("ring", "rim"), look_fraction=0.6, optics_jitter=0.2)
    anchor = adapt_corpus.anchor_settings(recipe, init)
    assert (anchor.looks, anchor.look_fraction) == (("ring", "rim"), 0.6)
    assert (anchor.optics_jitter, anchor.blur_jitter, anchor.shading_jitter) == (0.2, 0.0, 0.0)
    assert (anchor.crop, anchor.batch_size) == ((96, 96), 3)
    # [adapt] anchor_look_fraction replaces the model's share of other looks (1: only those);
    # a model trained on one look keeps drawing it.
    assert adapt_corpus.anchor_settings(recipe, init, 1.0).look_fraction == 1.0
    assert adapt_corpus.anchor_settings(recipe, TrainConfig(), 1.0).look_fraction == TrainConfig().look_fraction
