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
from amortize.errors import BadArgument, BadInput
from amortize.predict import Predictor
from amortize.writers import NullWriter

RECIPE = __import__("pathlib").Path(__file__).resolve().parents[1] / "train" / "adapt_tiny.toml"
ENCODER = dataclasses.replace(EncoderConfig.tiny(), stride=2)


def test_phase_schedule():
    cfg = AdaptConfig(cycles=2, wake_steps=3, sleep_steps=2, anchor_fraction=0.0)
    phases = [cfg.phase(s)[:2] for s in range(cfg.steps)]
    assert cfg.steps == 10
    assert phases == [("wake", 0)] * 3 + [("sleep", 0)] * 2 + [("wake", 1)] * 3 + [("sleep", 1)] * 2
    # Half the sleep steps are anchors, interleaved.
    cfg = AdaptConfig(cycles=1, wake_steps=1, sleep_steps=4, anchor_fraction=0.5)
    assert [cfg.phase(s)[0] for s in range(cfg.steps)] == ["wake", "sleep", "anchor", "sleep", "anchor"]
    # The final optics fit follows the last cycle.
    cfg = AdaptConfig(cycles=2, wake_steps=1, sleep_steps=1, anchor_fraction=0.0, decoder_fit_steps=2)
    assert cfg.steps == 6
    assert [cfg.phase(s) for s in range(4, 6)] == [("decoder", 2, 0), ("decoder", 2, 1)]


def test_the_sleep_step_falls_to_its_end_fraction_over_all_cycles():
    import jax.numpy as jnp

    from amortize.adapt import sleep_optimizer

    def steps(cfg):
        """Adam's step sizes under a constant gradient (|update| = the learning rate)."""
        tx = sleep_optimizer(cfg)
        params = {"w": jnp.zeros(3)}
        state, sizes = tx.init(params), []
        for _ in range(cfg.cycles * cfg.sleep_steps):
            updates, state = tx.update({"w": jnp.ones(3)}, state, params)
            sizes.append(float(jnp.abs(updates["w"][0])))
        return np.asarray(sizes)

    cfg = AdaptConfig(cycles=2, sleep_steps=5, sleep_learning_rate=1e-3, grad_clip=100.0, sleep_end_fraction=0.1)
    sizes = steps(cfg)
    assert sizes[0] == pytest.approx(1e-3, rel=1e-3)
    assert sizes[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 9 / 10))), rel=1e-3)
    assert np.all(np.diff(sizes) < 0)
    assert np.allclose(steps(dataclasses.replace(cfg, sleep_end_fraction=1.0)), 1e-3, rtol=1e-3)
    with pytest.raises(BadArgument, match="sleep_end_fraction"):
        AdaptConfig(sleep_end_fraction=0.0)
    with pytest.raises(BadArgument, match="anchor_look_fraction"):
        AdaptConfig(anchor_look_fraction=1.5)


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
    bad.write_text('[wake]\naugmentation = "spin"\n')
    with pytest.raises(BadInput, match="augmentation"):
        load_adapt_recipe(bad, ENCODER)


def tiny_start(run, corpus_dir):
    """(corpus, untrained encoder, a fitted-flagged read-out) for a tiny adaptation run."""
    from amortize.readout import ReadoutConfig, init_readout

    readout = {**init_readout(ReadoutConfig(), 3, 3), "fitted": np.ones((), np.int32)}
    return load_corpus(corpus_dir, run.wake.crop), init_encoder(jax.random.PRNGKey(0), ENCODER), readout


def test_wake_sleep_cycle_resumes_refits_and_reloads_for_predict(tmp_path, corpus_dir, optics, capsys):
    run = load_adapt_recipe(RECIPE, ENCODER)
    corpus, init, readout = tiny_start(run, corpus_dir)
    work = tmp_path / "work"
    # Crash after the wake phase, then resume: the sleep phase refits the prior.
    first = adapt(run, corpus, work, init, optics, writer=NullWriter(), progress=False, stop_after=2,
                  init_readout=readout)
    assert first["step"] == 2
    # Then the final optics fit (tests/test_decoder_fit.py checks what it learns). This
    # untrained encoder finds no droplet there, and the fit says so.
    final = adapt(run, corpus, work, init, optics, writer=NullWriter(), progress=False, init_readout=readout)
    assert final["step"] == run.adapt.steps == 6  # 2 wake, 2 sleep, 2 final optics fit
    assert np.isfinite(final["recon_rmse"])
    assert "found no droplets in the final optics fit" in capsys.readouterr().err
    params, config, step = load_model(work)
    assert step == 6 and "decoder" in params
    # An encoder that learns makes the --init model's read-out stale: it is not carried over
    # (a frozen one keeps it: tests/test_cli.py, the adapt round trip).
    assert "readout" not in params
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


def test_a_recipe_without_simulation_keeps_the_init_models(tmp_path):
    from amortize.config import SimulationConfig

    own = SimulationConfig()
    own = dataclasses.replace(own, scene=dataclasses.replace(own.scene, radius_max=17.0))
    bare = tmp_path / "bare.toml"
    bare.write_text("[adapt]\ncycles = 1\nencoder_learning_rate = 0.0\nsleep_steps = 0\n")
    assert load_adapt_recipe(bare, ENCODER, own).simulation == own
    assert load_adapt_recipe(RECIPE, ENCODER, own).simulation != own  # the recipe's own tables
    bare.write_text("[adapt]\nencoder_learning_rate = -1e-4\n")
    with pytest.raises(BadInput, match="encoder_learning_rate"):
        load_adapt_recipe(bare, ENCODER)


def test_anchored_wake_sleep_learns_encoder_optics_and_blur_and_resumes(tmp_path, corpus_dir, optics):
    """Issue 35: from the anchored built-in droplet, a wake-sleep run updates the encoder (wake
    and sleep), the optics and their edge blur, keeps the read-out when asked, and a killed
    run resumes where its last checkpoint left it."""
    from amortize.optics import default_optics_params, edge_blur, is_anchored

    class Recorder(NullWriter):
        names: set = set()

        def scalars(self, values, step):
            self.names.update(values)

    run = load_adapt_recipe(RECIPE, ENCODER)
    run = dataclasses.replace(
        run, adapt=dataclasses.replace(run.adapt, optics_start="anchored", keep_readout=True, decoder_fit_steps=0,
                                       log_every=2),
        train=dataclasses.replace(run.train, blur_jitter=0.5, shading_jitter=0.1))
    corpus, init, readout = tiny_start(run, corpus_dir)
    work = tmp_path / "work"
    first = adapt(run, corpus, work, init, optics, writer=NullWriter(), progress=False, stop_after=1,
                  init_readout=readout)
    assert first["step"] == 1
    after_wake, _, _ = load_model(work)
    recorder = Recorder()
    final = adapt(run, corpus, work, init, optics, writer=recorder, progress=False, init_readout=readout)
    assert final["step"] == run.adapt.steps == 4
    # Sleep and anchor steps alternate; both are logged although log_every is even.
    assert {"wake/loss", "sleep/loss", "anchor/loss"} <= recorder.names
    params, _, _ = load_model(work)
    start = default_optics_params(3, 3, anchored=True)
    assert is_anchored(params["decoder"]["optics"])
    assert float(edge_blur(params["decoder"]["optics"])) != pytest.approx(float(edge_blur(start)), abs=1e-7)

    def changed(a, b):
        return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: float(np.max(np.abs(u - v))), a, b)))

    assert changed(after_wake["params"], init["params"]) > 0  # the wake step moved the encoder
    assert changed(params["params"], after_wake["params"]) > 0  # and the resumed sleep steps did
    assert changed(params["decoder"]["optics"]["params"], start["params"]) > 0
    assert "readout" in params


def test_edge_blur_start_and_shading_blur_set_the_decoders_start_only(tmp_path, corpus_dir, optics):
    from amortize.optics import SHADING_BLUR_INIT, edge_blur

    run = load_adapt_recipe(RECIPE, ENCODER)
    anchored = dataclasses.replace(run, adapt=dataclasses.replace(
        run.adapt, optics_start="anchored", keep_readout=True, decoder_fit_steps=0, edge_blur_start=2.0,
        shading_blur=True))
    corpus, init, readout = tiny_start(run, corpus_dir)
    adapt(anchored, corpus, tmp_path / "a", init, optics, writer=NullWriter(), progress=False, stop_after=1,
          init_readout=readout)
    params, _, _ = load_model(tmp_path / "a")
    # One wake step at the decoder's learning rate moves log(blur) by about 2e-3 at most.
    assert float(edge_blur(params["decoder"]["optics"])) == pytest.approx(2.0, rel=0.02)
    strength = np.exp(float(params["decoder"]["optics"]["edge"]["log_shading_blur"]))
    assert strength == pytest.approx(SHADING_BLUR_INIT, rel=0.02)
    for option, value in (("edge_blur_start", 2.0), ("shading_blur", True)):
        free = dataclasses.replace(run, adapt=dataclasses.replace(run.adapt, **{option: value}))
        with pytest.raises(BadInput, match=f"{option}.*anchored"):
            adapt(free, corpus, tmp_path / "b", init, optics, writer=NullWriter(), progress=False)
        assert not (tmp_path / "b").exists()
    with pytest.raises(BadArgument, match="edge_blur_start"):
        dataclasses.replace(run.adapt, edge_blur_start=-1.0)


@pytest.mark.parametrize("name", ["adapt_default.toml", "adapt_droplets.toml", "broad_slide.toml"])
def test_the_shipped_adaptation_recipes_parse(name):
    run = load_adapt_recipe(RECIPE.parent / name, EncoderConfig())
    assert run.adapt.steps > 0
    if name == "adapt_default.toml":
        assert run.adapt.optics_start == "anchored" and run.adapt.keep_readout
        assert run.simulation.scene.min_separation == 0.5
    if name == "broad_slide.toml":
        assert run.adapt.optics_start == "anchored" and run.adapt.anchor_look_fraction == 1.0
        assert run.simulation.nuisance.clutter_probability == 0.5
