"""Per-image SVI refinement on tiny constructed scenes (the tiny untrained model's prior,
renderer and the built-in optics; tables give the starting answer)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize.config import RefineConfig
from amortize.droplets import Background, Droplets
from amortize.errors import BadArgument
from amortize.plots import line_plot
from amortize.predict import Predictor
from amortize.refinement import field_knots, pick_device, refine, residual_blobs, svi_wake
from amortize.render import render

SHAPE = (48, 48)
#: Three well-separated droplets and a background colour inside the tiny prior.
TRUTH = {
    "x": np.array([12.3, 33.6, 20.2], np.float32),
    "y": np.array([13.1, 17.4, 34.8], np.float32),
    "radius": np.array([4.2, 3.6, 4.6], np.float32),
    "comp": np.array([[0.8, 0.2, 0.3], [0.1, 0.7, 0.5], [0.5, 0.5, 0.9]], np.float32),
}
COLOUR = np.array([0.6, 0.55, 0.5], np.float32)
#: Hard compositing: these scenes' droplets do not overlap, where soft overlaps change
#: nothing but the cost (the optics run twice per pixel); the first test runs the default.
#: No coarse steps on enlarged copies (one test has them): each would compile one more SVI run.
CONFIG = RefineConfig(steps=300, learning_rate=0.03, chunk=25, overlap_softness=0.0, coarse_steps=0)


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    return Predictor.load(tiny_model_dir)


def scene(predictor, noise: float, seed: int = 0, keep=(0, 1, 2)) -> np.ndarray:
    keep = list(keep)
    d = Droplets.from_arrays(TRUTH["x"][keep], TRUTH["y"][keep], TRUTH["radius"][keep], TRUTH["comp"][keep])
    clean = render(d, predictor.optics, Background.flat(jnp.asarray(COLOUR)), SHAPE,
                   predictor.run.simulation.render)
    rng = np.random.default_rng(seed)
    return np.clip(np.asarray(clean) + noise * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)


def table(rows=(0, 1, 2), shift=(0.0, 0.0), extra=None) -> dict:
    rows = list(rows)
    t = {"x": TRUTH["x"][rows].copy(), "y": TRUTH["y"][rows].copy(), "radius": TRUTH["radius"][rows].copy(),
         "presence": np.full(len(rows), 0.95, np.float32)}
    for k in range(3):
        t[f"comp_{k}"] = TRUTH["comp"][rows, k].copy()
    t["x"][0] += shift[0]
    t["y"][0] += shift[1]
    if extra is not None:
        for name, value in extra.items():
            t[name] = np.append(t[name], np.float32(value))
    return t


def nearest(result_table, x, y):
    d = np.hypot(result_table["x"] - x, result_table["y"] - y)
    return (float(d.min()) if d.size else np.inf), int(np.argmin(d)) if d.size else -1


@pytest.mark.parametrize("softness", [RefineConfig().overlap_softness, 0.0])
def test_a_perturbed_droplet_moves_back_towards_the_truth(predictor, softness):
    image = scene(predictor, noise=0.01)
    config = dataclasses.replace(CONFIG, overlap_softness=softness)
    res = refine(image, predictor, config=config, device="cpu", start_table=table(shift=(0.4, -0.3)))
    before = np.hypot(0.4, 0.3)
    after, _ = nearest(res.table, TRUTH["x"][0], TRUTH["y"][0])
    assert after < 0.3 * before, (before, after)
    assert len(res.table["x"]) == 3
    assert res.recon_rmse_after < res.recon_rmse_before
    assert np.all(np.isfinite(res.losses))


def test_a_spurious_droplet_is_removed_and_a_missed_one_added(predictor):
    image = scene(predictor, noise=0.01)
    # Start without droplet 2 and with a false one in an empty corner.
    start = table(rows=(0, 1), extra={"x": 40.0, "y": 40.0, "radius": 3.5, "presence": 0.9,
                                      "comp_0": 0.5, "comp_1": 0.5, "comp_2": 0.5})
    config = dataclasses.replace(CONFIG, rounds=2, steps=400)
    res = refine(image, predictor, config=config, device="cpu", start_table=start)
    assert res.births >= 1
    found, _ = nearest(res.table, TRUTH["x"][2], TRUTH["y"][2])
    assert found < 1.5, res.table
    spurious, _ = nearest(res.table, 40.0, 40.0)
    assert spurious > 3.0, res.table
    assert len(res.table["x"]) == 3


def test_posterior_sds_are_positive_and_shrink_as_the_noise_falls(predictor):
    sds = []
    for noise in (0.06, 0.01):
        res = refine(scene(predictor, noise=noise, seed=1), predictor, config=CONFIG, device="cpu",
                     start_table=table())
        for col in ("x_std", "y_std", "radius_std"):
            assert np.all(res.table[col] > 0), col
        sds.append(np.mean(res.table["x_std"] + res.table["y_std"]))
    assert sds[1] < 0.6 * sds[0], sds


def test_early_stopping_on_a_converged_problem(predictor):
    config = dataclasses.replace(CONFIG, steps=1000, tol=1e-2, patience=2)
    res = refine(scene(predictor, noise=0.01), predictor, config=config, device="cpu", start_table=table())
    assert res.converged
    assert res.steps < 1000
    assert res.summary()["converged"] is True and res.summary()["steps"] == res.steps


def test_frozen_optics_are_not_learned_unless_asked(predictor):
    image = scene(predictor, noise=0.01)
    short = dataclasses.replace(CONFIG, steps=25)
    frozen = refine(image, predictor, config=short, device="cpu", start_table=table())
    assert "optics" not in frozen.params
    # The CLI round trip's set-up (tests/test_cli.py): one compiled SVI run serves both.
    cli = dataclasses.replace(short, freeze_optics=False, overlap_softness=RefineConfig().overlap_softness,
                              fit_stop="always")
    tuned = refine(image, predictor, config=cli, device="cpu", start_table=table())
    before = jax.tree_util.tree_leaves(predictor.optics)
    after = jax.tree_util.tree_leaves(tuned.params["optics"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_residual_blobs_find_a_disc_and_its_scale():
    yy, xx = np.mgrid[0:64, 0:64]
    residual = np.zeros((64, 64, 3), np.float32)
    residual[np.hypot(xx - 40, yy - 21) <= 5] = 0.2
    x, y, sigma, strength = (np.asarray(a) for a in residual_blobs(jnp.asarray(residual), 3))
    assert abs(x[0] - 40) <= 1 and abs(y[0] - 21) <= 1
    assert 2.0 <= 1.5 * sigma[0] <= 8.0
    assert strength[0] > strength[1]


def test_bad_arguments_are_clear(predictor):
    with pytest.raises(BadArgument, match="steps"):
        RefineConfig(steps=0)
    with pytest.raises(BadArgument, match="--device"):
        pick_device("tpu")
    if not any(d.platform == "gpu" for d in jax.devices()):
        with pytest.raises(BadArgument, match="no GPU"):
            pick_device("gpu")
    assert pick_device("auto").platform in ("cpu", "gpu")
    with pytest.raises(BadArgument, match="smaller than"):
        refine(np.zeros((20, 20, 3), np.float32), predictor, device="cpu")


def test_loss_plot_is_an_image():
    img = line_plot(np.array([3.0, 2.0, np.nan, 1.5]), "loss")
    assert img.shape == (400, 640, 3) and img.min() < 0.5 and img.max() == 1.0


def test_scale_maps_back_to_the_input_pixels_on_odd_sizes(predictor, monkeypatch):
    # An odd-size image refined at scale 2 (work image 25 x 26, too small) must fail
    # cleanly; at scale 0.5 (an enlarged copy) the outputs come back at the input's size
    # and in its pixels.
    from amortize import refinement

    image = scene(predictor, noise=0.01)[:47, :45]
    with pytest.raises(BadArgument, match="smaller than"):
        refine(image, predictor, scale=2.0, device="cpu")
    grids = []
    original = refinement.solver

    def spy(n_slots, scene_config, encoder, render_config, wake, *rest):
        grids.append(wake.samples)
        return original(n_slots, scene_config, encoder, render_config, wake, *rest)

    monkeypatch.setattr(refinement, "solver", spy)
    short = dataclasses.replace(CONFIG, steps=25, coarse_steps=5)
    res = refine(image, predictor, config=short, scale=0.5, device="cpu", start_table=table())
    # The first 5 steps, within the 25, on the coarse grid (one point per image pixel), the
    # rest on the step's own (2 x 2 points), with the fit checked on it.
    assert grids == [2, 1] and res.coarse_steps == res.summary()["coarse_steps"] == 5
    assert res.steps <= 25 and res.fits.size == (res.steps - 5) // CONFIG.fit_every
    # At most half of a short budget (the same programs: the step count is an argument).
    grids.clear()
    few = refine(image, predictor, config=dataclasses.replace(short, steps=8, coarse_steps=15), scale=0.5,
                 device="cpu", start_table=table())
    assert grids == [2, 1] and few.coarse_steps == 4 and few.steps == 8
    assert res.recon_before.shape == res.recon_after.shape == image.shape
    # Within the trust region (1 input px; the untrained encoder's background start lets
    # centres drift 0.25-0.5 px in 25 steps at this scale), not at work-px coordinates.
    for i in range(3):
        found, _ = nearest(res.table, TRUTH["x"][i], TRUTH["y"][i])
        assert found < 1.0
    assert np.all(res.table["radius"] > 2.5)  # input px, not enlarged px (radii 3.6-4.6)


def test_a_bad_start_table_is_a_clear_error(predictor):
    image = scene(predictor, noise=0.01)
    bad = table()
    del bad["comp_1"]
    with pytest.raises(BadArgument, match="comp_1"):
        refine(image, predictor, device="cpu", start_table=bad)
    bad = table()
    bad["radius"][0] = 0.0
    with pytest.raises(BadArgument, match="radii"):
        refine(image, predictor, device="cpu", start_table=bad)


_ELBO_PROGRAM = """
import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoNormal
from amortize.refinement import OrderedTraceELBO

def model(y):
    for name in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta"):
        numpyro.sample(name, dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

svi = SVI(model, AutoNormal(model), numpyro.optim.Adam(0.1), OrderedTraceELBO())
state = svi.init(jax.random.PRNGKey(0), 1.0)
print(jax.make_jaxpr(lambda s: svi.update(s, 1.0))(state))
"""


def test_the_svi_step_is_the_same_program_in_every_process():
    """numpyro's Trace_ELBO sums sites in string-hash order, so its traced step (and JAX's
    persistent compilation cache key) changed from process to process."""
    import os
    import subprocess
    import sys

    programs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", _ELBO_PROGRAM], capture_output=True, text=True,
                             env=env, check=True)
        programs.append(out.stdout)
    assert programs[0] == programs[1] and "add" in programs[0]


def test_ordered_elbo_is_numpyros_trace_elbo():
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    from amortize.refinement import OrderedTraceELBO

    def model(y):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.LogNormal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(a, b), obs=y)

    guide = AutoNormal(model)
    svi = numpyro.infer.SVI(model, guide, numpyro.optim.Adam(0.1), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), 0.5))  # constrained, as SVI passes
    key = jax.random.PRNGKey(3)
    ours = OrderedTraceELBO().loss(key, params, model, guide, 0.5)
    theirs = Trace_ELBO().loss(key, params, model, guide, 0.5)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)


def test_refine_files_auto_scale_refines_at_the_chosen_scale(predictor, tmp_path, monkeypatch):
    import json

    from amortize import io, refinement
    from amortize.autoscale import ScaleChoice

    seen = []

    def choose(pred, image):
        seen.append(image.shape)
        answer = pred.predict(image, scale=0.5)
        answers.append(answer)
        return ScaleChoice(0.5, answer, None, {1.0: 0.06, 0.5: 0.04})

    answers = []

    monkeypatch.setattr(refinement, "choose_scale", choose)
    # The odd-size test's image and set-up (coarse steps included): the same SVI programs.
    io.write_png(tmp_path / "a.png", scene(predictor, noise=0.01)[:47, :45])
    short = dataclasses.replace(CONFIG, steps=10, coarse_steps=5)
    run = refinement.refine_files([tmp_path / "a.png"], tmp_path / "out", predictor, config=short,
                                  scale="auto", device="cpu", progress=False)
    assert (run.done, run.errors) == (1, []) and seen == [(47, 45, 3)]
    meta = json.loads((tmp_path / "out" / "a.json").read_text())
    assert meta["scale"] == 0.5 and meta["scale_search"] == {"1": 0.06, "0.5": 0.04}
    # The search's answer at the chosen scale is the start (predict is not run again).
    assert meta["count_before"] == len(answers[0]["x"])
    assert io.read_image(tmp_path / "out" / "a.recon.png").shape == (47, 45, 3)


@pytest.mark.parametrize("shape, work, k", [((47, 45), (94, 90), 2), ((20, 30), (80, 120), 4),
                                            ((47, 45), (47, 45), 1), ((47, 45), (24, 23), 1),
                                            ((47, 45), (141, 136), 1)])
def test_exact_enlargement(shape, work, k):
    from amortize.refinement import exact_enlargement

    assert exact_enlargement(shape, work) == k


def test_the_trust_floor_is_in_input_pixels():
    from amortize.refinement import TRUST_PX, input_trust

    anchor = {"pos_width": jnp.asarray([[1.0, 2.5, 6.0]])}
    assert input_trust(anchor, 1.0) is anchor
    np.testing.assert_allclose(input_trust(anchor, 0.25)["pos_width"], [[4 * TRUST_PX, 4 * TRUST_PX, 6.0]])


@pytest.mark.parametrize("pool, samples, points", [(4, 2, 2), (4, 4, 4), (4, 8, 4), (3, 2, 1), (6, 4, 3),
                                                   (2, 2, 2), (1, 2, 1)])
def test_sample_points_divide_the_enlargement(pool, samples, points):
    from amortize.refinement import sample_points

    assert sample_points(pool, samples) == points


def test_refine_config_rejects_no_sample_points():
    with pytest.raises(BadArgument, match="samples"):
        RefineConfig(samples=0)


def test_refine_auto_starts_from_the_searchs_answer_and_reconstruction(predictor, monkeypatch):
    from amortize import refinement
    from amortize.autoscale import ScaleChoice

    image = scene(predictor, noise=0.01)
    answer = table()
    recon = np.full(image.shape, 0.5, np.float32)
    monkeypatch.setattr(refinement, "choose_scale", lambda pred, im: ScaleChoice(1.0, answer, recon, {1.0: 0.2}))
    monkeypatch.setattr(Predictor, "predict", lambda *a, **k: pytest.fail("predicted again"))
    res = refine(image, predictor, config=dataclasses.replace(CONFIG, steps=5), scale="auto", device="cpu")
    assert res.start_table is answer and res.recon_before is recon
    assert res.scale == 1.0 and res.scale_search == {1.0: 0.2}
    np.testing.assert_allclose(res.recon_rmse_before, np.sqrt(np.mean((image - 0.5) ** 2)), rtol=1e-5)


def test_the_svi_step_compiles_once_per_image(predictor, monkeypatch):
    # The initial SVI state must be placed like the steps' outputs, or the chunked step
    # compiles twice (seen: 6 s more per image on the slide at 4x).
    from amortize import refinement

    seen = []
    original = refinement._svi_round

    def spy(run_chunk, *args):
        out = original(run_chunk, *args)
        seen.append(run_chunk)
        return out

    monkeypatch.setattr(refinement, "_svi_round", spy)
    # A learned decoder's optics come back from the checkpoint committed to a device.
    committed = jax.device_put(predictor.optics, jax.devices("cpu")[0])
    monkeypatch.setattr(Predictor, "optics", property(lambda self: committed))
    # A learning rate no other test uses: a fresh solver (they are cached), so a fresh step.
    # Chunks of 2 and a remainder of 1: the step count is an argument of the one program.
    config = dataclasses.replace(CONFIG, steps=3, chunk=2, tol=0.0, learning_rate=0.0123)
    res = refine(scene(predictor, noise=0.01, seed=5), predictor, config=config, device="cpu")
    assert res.steps == 3 and np.all(np.isfinite(res.losses))
    assert seen[0].compiled.program_count() == 1


def test_the_learning_rate_is_optimiser_state_not_a_constant_of_the_step():
    from amortize.refinement import refine_optimizer

    params = {"x_shift": jnp.zeros(3), "q_logit": jnp.zeros(3)}
    slow, fast = (refine_optimizer(lr).init_fn(params) for lr in (0.01, 0.02))
    assert jax.tree_util.tree_structure(slow) == jax.tree_util.tree_structure(fast)

    def rest_rate(state):
        (rate,) = [v for path, v in jax.tree_util.tree_flatten_with_path(state)[0]
                   if "'rest'" in jax.tree_util.keystr(path) and "learning_rate" in jax.tree_util.keystr(path)]
        return float(rate)

    assert (rest_rate(slow), rest_rate(fast)) == pytest.approx((0.01, 0.02))


def test_each_parameter_group_takes_its_own_first_step():
    """Adam's first step moves a parameter by its group's rate (the gradient's sign): presence
    logits faster than centres, and radius and composition shifts by the shape factor."""
    from amortize import refinement
    from amortize.refinement import refine_optimizer

    lr = 0.01
    params = {name: jnp.zeros(4) for name in
              ("x_shift", "y_shift", "log_radius_shift", "comp_loc", "q_logit", "x_scale")}
    grads = {name: jnp.full(4, -2.5) for name in params}  # descent moves every one up
    for shape_rate in (3.0, 1.0):
        optim = refine_optimizer(lr, shape_rate)
        moved = optim.get_params(optim.update(grads, optim.init(params), value=jnp.float32(0.0)))
        expected = {"x_shift": 1.0, "y_shift": 1.0, "x_scale": 1.0, "log_radius_shift": shape_rate,
                    "comp_loc": shape_rate, "q_logit": refinement.PRESENCE_LR_FACTOR}
        for name, factor in expected.items():
            np.testing.assert_allclose(moved[name], lr * factor, rtol=1e-4, err_msg=name)


def _fake_round(fits_seen, losses_per_chunk, fit_values, config):
    """`_svi_round` on a fake chunk runner: the state is the chunk count, each chunk's
    losses are given, and the fit of state k is fit_values[k - 1]."""
    from tqdm import tqdm

    from amortize.refinement import _svi_round

    def run_chunk(state, args, n):
        return state + 1, np.full(n, losses_per_chunk[state], np.float32), {"mean_of_chunk": state + 1}

    fit = None if fit_values is None else (lambda s: fit_values[s - 1])
    return _svi_round(run_chunk, 0, (), config.steps, config, [], fits_seen, tqdm(disable=True), fit)


def test_the_fit_test_stops_and_reports_the_best_fitting_state():
    config = RefineConfig(steps=200, chunk=25, tol=1e-3, patience=3, fit_tol=0.01, fit_patience=1, fit_every=25)
    falling = [-1000.0 * 1.05**k for k in range(8)]  # the loss never converges
    fits = []
    state, stopped_by, at, averaged = _fake_round(fits, falling, [0.030, 0.025, 0.0249, 0.02], config)
    # 0.0249 is within 1 % of 0.025: stop after chunk 3, reporting chunk 3 (the best so far).
    assert (state, stopped_by, at) == (3, "fit", 75) and fits == [0.030, 0.025, 0.0249]
    fits = []
    state, stopped_by, at, averaged = _fake_round(fits, falling, [0.030, 0.025, 0.0262, 0.02], config)
    assert (state, stopped_by, at) == (2, "fit", 50)  # a worse last chunk is not reported
    patient = dataclasses.replace(config, fit_patience=2)
    state, stopped_by, at, averaged = _fake_round([], falling, [0.030, 0.025, 0.0262, 0.02, 0.0199, 0.0201], patient)
    assert (state, stopped_by, at, averaged) == (5, "fit", 125, None)  # the fit test reports a state


def test_the_fit_is_checked_every_few_steps_and_the_loss_over_whole_windows():
    config = RefineConfig(steps=500, chunk=25, tol=1e-3, patience=2, fit_tol=0.01, fit_patience=1, fit_every=5)
    fits = []
    # The fit keeps improving, the loss is flat: the loss test, over 25-step windows (five
    # checks each), stops it after the third window, on the best-fitting (last) state.
    state, stopped_by, at, averaged = _fake_round(fits, [-1000.0] * 100, [0.9**k for k in range(100)], config)
    assert (state, stopped_by, at, averaged) == (15, "loss", 75, None) and len(fits) == 15
    # A fit that is best after 4 checks stops it at the fifth, reporting the fourth.
    state, stopped_by, at, averaged = _fake_round([], [-1000.0 * 1.05**k for k in range(100)],
                                                  [0.04, 0.03, 0.028, 0.027, 0.0271, 0.02], config)
    assert (state, stopped_by, at) == (4, "fit", 20)


def test_without_the_fit_test_the_loss_test_stops_on_an_averaged_chunk():
    config = RefineConfig(steps=500, chunk=25, tol=1e-3, patience=2)
    flat = [-1000.0, -1100.0, -1100.5, -1100.2, -1100.1, -1100.0]
    fits = []
    # Converged after 4 chunks, it runs a fifth and reports the mean of its iterates.
    assert _fake_round(fits, flat, None, config) == (5, "loss", 125, {"mean_of_chunk": 5}) and fits == []
    # Within the budget: 10 steps were left for that chunk.
    assert _fake_round([], flat, None, dataclasses.replace(config, steps=110))[2] == 110
    assert _fake_round([], [-1000.0 * 1.05**k for k in range(20)], None, config) == (20, None, 500,
                                                                                      {"mean_of_chunk": 20})


def test_refine_config_rejects_a_bad_fit_test():
    with pytest.raises(BadArgument, match="fit_stop"):
        RefineConfig(fit_stop="sometimes")
    with pytest.raises(BadArgument, match="fit_tol"):
        RefineConfig(fit_tol=-0.1)
    with pytest.raises(BadArgument, match="fit_patience"):
        RefineConfig(fit_patience=0)
    with pytest.raises(BadArgument, match="fit_every"):
        RefineConfig(fit_every=0)


def test_the_fit_is_watched_on_enlarged_copies_and_measures_the_reconstruction(predictor):
    image = scene(predictor, noise=0.01)
    config = dataclasses.replace(CONFIG, steps=50, chunk=10, fit_every=10)
    # No coarse steps at scale 1, which has one point per pixel already.
    at_one = refine(image, predictor, config=dataclasses.replace(config, coarse_steps=5), device="cpu",
                    start_table=table())
    assert at_one.fits.size == 0 and at_one.answer_step == at_one.steps and at_one.coarse_steps == 0
    enlarged = refine(image, predictor, config=config, scale=0.5, device="cpu", start_table=table())
    assert enlarged.fits.size == enlarged.steps // 10 and 0 < enlarged.answer_step <= enlarged.steps
    meta = enlarged.summary()
    assert meta["answer_step"] == enlarged.answer_step and len(meta["fit_rmse_per_check"]) == enlarged.fits.size
    # The watched fit is the reported table's reconstruction error, on the likelihood's grid.
    always = refine(image, predictor, config=dataclasses.replace(config, fit_stop="always"), device="cpu",
                    start_table=table())
    assert always.fits.size == always.steps // 10
    best = float(np.min(always.fits))
    assert abs(best - always.recon_rmse_after) < 0.1 * always.recon_rmse_after, (best, always.recon_rmse_after)


class _SolverBuilt(Exception):
    pass


@pytest.mark.parametrize("scale, softness, lr, shape_rate", [(None, 0.07, 0.011, 1.0), (0.5, 0.0, 0.033, 2.5)])
def test_overlaps_are_soft_and_steps_short_at_scale_one_and_not_on_enlarged_copies(predictor, monkeypatch, scale,
                                                                                  softness, lr, shape_rate):
    from amortize import refinement

    def spy(n_slots, scene_config, encoder, render_config, wake, freeze_optics, learning_rate, shape_rate):
        raise _SolverBuilt(render_config.overlap_softness, learning_rate, shape_rate)

    monkeypatch.setattr(refinement, "solver", spy)
    config = RefineConfig(overlap_softness=0.07, learning_rate=0.011, enlarged_learning_rate=0.033,
                          enlarged_shape_rate=2.5)
    with pytest.raises(_SolverBuilt) as built:
        refine(scene(predictor, noise=0.01), predictor, config=config, scale=scale, start_table=table(), device="cpu")
    assert built.value.args == (softness, lr, shape_rate)


def test_refine_config_rejects_negative_coarse_steps():
    with pytest.raises(BadArgument, match="coarse_steps"):
        RefineConfig(coarse_steps=-1)


def test_refine_config_rejects_negative_softness():
    with pytest.raises(BadArgument, match="overlap_softness"):
        RefineConfig(overlap_softness=-1.0)


@pytest.mark.parametrize("bad", [0.0, -0.01, float("nan")])
@pytest.mark.parametrize("name", ["enlarged_learning_rate", "enlarged_shape_rate"])
def test_refine_config_rejects_a_bad_enlarged_rate(name, bad):
    with pytest.raises(BadArgument, match=name):
        RefineConfig(**{name: bad})


@pytest.mark.parametrize("setting", [{"field_spacing": 0.0}, {"field_spacing": float("inf")}, {"field": "yes"}])
def test_refine_config_rejects_a_bad_field(setting):
    with pytest.raises(BadArgument, match=next(iter(setting))):
        RefineConfig(**setting)


@pytest.mark.parametrize("shape, spacing, knots", [((380, 507), 64, (7, 9)), ((48, 48), 64, (2, 2)),
                                                   ((129, 65), 64, (3, 2))])
def test_field_knots_are_at_most_the_spacing_apart(shape, spacing, knots):
    assert field_knots(shape, spacing) == knots


@pytest.mark.parametrize("field, work, knots", [("enlarged", (96, 80), (3, 3)), ("enlarged", (48, 40), (0, 0)),
                                                ("always", (48, 40), (3, 3)), ("never", (96, 80), (0, 0))])
def test_the_field_is_fitted_on_enlarged_copies_by_default(field, work, knots):
    config = RefineConfig(field=field, field_spacing=32)
    assert svi_wake(config, (48, 40), work).field_knots == knots


def test_refinement_fits_a_smooth_background_the_quadratic_cannot_draw(predictor):
    # A 4 x 4 knot field with a bump off-centre and a dip in a corner: no quadratic draws it.
    truth = np.zeros((3, 4, 4), np.float32)
    truth[:, 1, 2], truth[:, 3, 0] = 0.5, -0.4
    d = Droplets.from_arrays(TRUTH["x"], TRUTH["y"], TRUTH["radius"], TRUTH["comp"])
    bg = Background(jnp.asarray(COLOUR), jnp.zeros((3, 5)), jnp.asarray(truth))
    clean = np.asarray(render(d, predictor.optics, bg, SHAPE, predictor.run.simulation.render))
    image = np.clip(clean + 0.01 * np.random.default_rng(3).standard_normal(clean.shape), 0, 1).astype(np.float32)
    fits = {}
    for field in ("never", "always"):  # 16 px apart on 48 px: the truth's 4 x 4 knots
        config = dataclasses.replace(CONFIG, field=field, field_spacing=16.0)
        res = refine(image, predictor, config=config, device="cpu", start_table=table())
        fits[field] = res.recon_rmse_after
        if field == "always":
            assert res.params["field_value"].shape == (1, 3, 4, 4)
        else:
            assert "field_value" not in res.params
    assert fits["always"] < 0.015 < fits["never"], fits


def test_the_fixed_blur_is_the_traced_blur_at_that_sigma():
    from amortize.nuisance import fixed_gaussian_blur, gaussian_blur

    energy = jnp.asarray(np.random.default_rng(0).uniform(size=(6, 9)).astype(np.float32))
    blur = jax.jit(gaussian_blur, static_argnums=2)
    for sigma in (1.0, 4.0):  # 4: the kernel is wider than the image
        want = blur(energy[..., None], jnp.float32(sigma), sigma)[..., 0]
        np.testing.assert_allclose(fixed_gaussian_blur(energy, sigma), want, atol=1e-6)


def test_refinement_on_the_default_device_keeps_the_programs_traced_before():
    # Under jax.default_device every jitted function traces again; on the device arrays go to
    # anyway, refinement needs no such context (the scale search's programs are reused).
    import contextlib

    from amortize.refinement import _placed_on

    cpu = jax.devices("cpu")[0]
    assert isinstance(_placed_on(cpu), contextlib.nullcontext)
    with jax.default_device(cpu):  # a default set by the caller is honoured
        assert not isinstance(_placed_on(cpu), contextlib.nullcontext)
