import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

from amortize.adapt import AdaptConfig, AdaptRun, make_wake_step, wake_kwargs, wake_optimizer
from amortize.config import SceneConfig, SimulationConfig
from amortize.droplets import Background, Droplets
from amortize.encoder import CellOutputs, EncoderConfig, cell_centres, init_encoder
from amortize.losses import background_at
from amortize.simulate import simulate
from amortize.train import TrainConfig
from amortize.wake import (
    ENCODER_PARAM, WakeConfig, candidate_slots, elbo_parts, fit_background, init_params,
    interior_mask, wake_guide, wake_model,
)

ENCODER = dataclasses.replace(EncoderConfig.tiny(), stride=2)
WAKE = WakeConfig.tiny()


@pytest.fixture(scope="module")
def setup(optics):
    sim = SimulationConfig.tiny()
    crops = jnp.asarray(simulate(2, (64, 64), seed=11, config=sim).images)
    kwargs = dict(n_crops=10, n_slots=WAKE.n_slots(sim.scene, ENCODER), scene=sim.scene,
                  encoder=ENCODER, render_config=sim.render, wake=WAKE, optics_init=optics)
    params = init_params(init_encoder(jax.random.PRNGKey(0), ENCODER), optics, WAKE)
    return crops, kwargs, params, sim


def test_elbo_is_numpyros_trace_elbo_and_its_gradients_are_finite(setup):
    crops, kwargs, params, _ = setup
    key = jax.random.PRNGKey(3)
    # Jitted: op by op, the renderer's hundreds of small programs cost more to compile.
    loss = jax.jit(lambda p: numpyro.infer.Trace_ELBO().loss(key, p, wake_model, wake_guide, crops, **kwargs))(params)

    def elbo(p):  # Trace_ELBO seeds the guide with the second half of the split key.
        parts = elbo_parts(p, jax.random.split(key)[1], crops, **kwargs)
        return parts["elbo"], parts

    # One program for the value and the gradients (each costs seconds to compile).
    (_, ours), grads = jax.jit(jax.value_and_grad(elbo, has_aux=True))(params)
    np.testing.assert_allclose(float(ours["elbo"]), -float(loss), rtol=1e-5)
    kl = sum(float(ours[k]) for k in ours if k.startswith("kl_"))
    np.testing.assert_allclose(float(ours["elbo"]), float(ours["log_likelihood"]) - kl, rtol=1e-5)
    assert set(grads) == {ENCODER_PARAM, "optics", "log_noise"}
    for name, g in grads.items():
        leaves = jax.tree_util.tree_leaves(g)
        assert all(np.all(np.isfinite(a)) for a in leaves), name
        assert any(np.any(a != 0) for a in leaves), f"no gradient reaches {name}"


def test_a_few_wake_steps_lower_the_loss(setup, optics):
    crops, _, _, sim = setup
    run = AdaptRun(encoder=ENCODER, simulation=sim, train=TrainConfig.tiny(), wake=WAKE,
                   adapt=dataclasses.replace(AdaptConfig.tiny(), encoder_learning_rate=1e-3,
                                             decoder_learning_rate=1e-2))
    step = make_wake_step(run, wake_kwargs(run, sim.scene, 10, optics))
    state = {"step": jnp.zeros((), jnp.int32), "params": init_encoder(jax.random.PRNGKey(0), ENCODER),
             "decoder": {"optics": optics, "log_noise": jnp.log(jnp.float32(WAKE.noise_init))}}
    state["wake_opt"] = wake_optimizer(run.adapt).init({"encoder": state["params"], "decoder": state["decoder"]})
    losses = []
    for i in range(12):
        state, metrics = step(state, jax.random.PRNGKey(i), crops)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_candidate_slots_take_the_most_present_cells_inside_the_crop():
    grid = (8, 8)
    logit = jnp.full((1,) + grid, -5.0).at[0, 2, 3].set(4.0).at[0, 5, 1].set(2.0).at[0, 7, 7].set(9.0)
    z = jnp.zeros((1,) + grid)
    out = CellOutputs(logit, jnp.zeros(z.shape + (2,)), jnp.ones(z.shape + (2,)), z, z + 0.1,
                      jnp.full(z.shape + (2,), 0.5), jnp.full(z.shape + (2,), 0.1),
                      jnp.full(z.shape + (3,), 0.5), stride=4)
    # A 28 x 28 crop: row and column 7 of the 4 px cells are centred outside it.
    slots = candidate_slots(out, 2, (28, 28))
    np.testing.assert_allclose(slots["logit"][0], [4.0, 2.0])
    np.testing.assert_allclose(slots["x"][0], [13.5, 5.5])
    np.testing.assert_allclose(slots["y"][0], [9.5, 21.5])
    # A neighbour of a peak is not a candidate (no second slot for the same droplet).
    slots = candidate_slots(out.replace(logit=logit.at[0, 2, 4].set(3.0)), 3, (28, 28))
    assert 3.0 not in np.asarray(slots["logit"][0])
    # More slots than peaks: the fillers are absent.
    z4 = jnp.full((1, 2, 2), 1.0)
    few = CellOutputs(z4, jnp.zeros((1, 2, 2, 2)), jnp.ones((1, 2, 2, 2)), z4, z4, jnp.zeros((1, 2, 2, 2)),
                      jnp.ones((1, 2, 2, 2)), jnp.zeros((1, 2, 2, 3)), stride=4)
    assert np.all(np.isfinite(candidate_slots(few.replace(logit=z4.at[0, 0, 0].set(5.0)), 4, (8, 8))["logit"]))


def test_background_fit_recovers_colour_and_illumination():
    shape, grid = (64, 96), (16, 24)
    truth = Background(jnp.array([0.3, 0.5, 0.7]), jnp.zeros((3, 5)).at[0, 0].set(0.4).at[2, 3].set(-0.3))
    xx, yy = cell_centres(grid, 4)
    bg = background_at(truth, shape, xx, yy)[None]
    z = jnp.zeros((1,) + grid)
    out = CellOutputs(z, jnp.zeros(z.shape + (2,)), jnp.ones(z.shape + (2,)), z, z + 0.1,
                      jnp.full(z.shape + (2,), 0.5), jnp.full(z.shape + (2,), 0.1), bg, stride=4)
    fitted = fit_background(out, shape)
    np.testing.assert_allclose(fitted.colour[0], truth.colour, atol=1e-3)
    np.testing.assert_allclose(fitted.illumination[0], truth.illumination, atol=1e-3)


def test_interior_mask_and_slot_count():
    mask = interior_mask((10, 12), 2)
    assert mask.sum() == 6 * 8 and not mask[1].any() and mask[2, 2]
    assert WakeConfig().n_slots(SceneConfig(density=12, density_spread=2.5), EncoderConfig(stride=2)) > 77


def test_bernoulli_kl_matches_the_formula():
    from amortize.wake import bernoulli_kl

    q, p = 0.8, 0.3
    expected = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    np.testing.assert_allclose(bernoulli_kl(jnp.log(q / (1 - q)), p), expected, rtol=1e-5)
    np.testing.assert_allclose(bernoulli_kl(jnp.float32(0.0), 0.5), 0.0, atol=1e-7)
    # A confidently empty slot costs about -log(1 - p), not the logit gap.
    np.testing.assert_allclose(bernoulli_kl(jnp.float32(-12.0), 0.3), -np.log(0.7), rtol=1e-3)


def test_block_mean_is_the_box_filter_predict_shrinks_with():
    from amortize.predict import resize_to
    from amortize.wake import block_mean

    x = np.random.default_rng(0).uniform(size=(1, 8, 12, 3)).astype(np.float32)
    pooled = np.asarray(block_mean(jnp.asarray(x), 4))
    assert pooled.shape == (1, 2, 3, 3)
    np.testing.assert_allclose(pooled[0, 1, 2], x[0, 4:8, 8:12].mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(pooled[0], resize_to(x[0], (2, 3)), atol=1e-6)
    assert np.shape(block_mean(jnp.asarray(x), 1)) == x.shape


@pytest.mark.parametrize("pool", [0, 2.0])
def test_wake_config_rejects_a_bad_pool(pool):
    from amortize.errors import BadArgument

    with pytest.raises(BadArgument, match="pool"):
        WakeConfig(pool=pool)


def test_wake_config_rejects_samples_that_do_not_divide_pool():
    from amortize.errors import BadArgument

    with pytest.raises(BadArgument, match="samples"):
        WakeConfig(pool=4, samples=3)
    assert WakeConfig(pool=4, samples=2).render_step == 2
    assert WakeConfig(pool=4).render_step == 1


@pytest.mark.parametrize("knots", [(1, 3), (2,), (0, 4)])
def test_wake_config_rejects_bad_field_knots(knots):
    from amortize.errors import BadArgument

    with pytest.raises(BadArgument, match="field_knots"):
        WakeConfig(field_knots=knots)


def _rendered(wake, images, latents, optics, sim):
    from numpyro import handlers

    kwargs = dict(n_crops=1, n_slots=latents["x"].shape[1], scene=sim.scene, encoder=ENCODER,
                  render_config=sim.render, wake=wake)

    @jax.jit  # one program: op by op, the model compiled some 250
    def rendered(images, latents, optics):
        model = handlers.substitute(handlers.seed(wake_model, 0), data=latents)
        return handlers.trace(model).get_trace(images, optics_init=optics, **kwargs)["rendered"]["value"][0]

    return np.asarray(rendered(images, latents, optics))


def test_the_model_evaluates_its_rendering_at_the_sample_points(optics):
    # Pool 3 with one sample per image pixel evaluates the rendering at work pixels 1, 4,
    # 7, ...: exactly the full rendering's pixels there, with the work scale's look.
    from amortize.render import render

    sim = SimulationConfig.tiny()
    x, y = jnp.asarray([[12.0, 30.5, 40.2]]), jnp.asarray([[14.0, 33.3, 10.7]])
    radius = jnp.asarray([[6.0, 9.5, 4.2]])
    comp = jnp.asarray([[[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]])
    colour, illumination = jnp.asarray([[0.7, 0.75, 0.8]]), jnp.zeros((1, 3, 5))
    latents = {"presence_logit": jnp.full((1, 3), 20.0), "presence_q": jnp.full((1, 3), 20.0), "x": x, "y": y, "log_radius": jnp.log(radius),
               "composition": comp, "background_colour": colour, "illumination": illumination}
    images = jnp.zeros((1, 16, 16, 3))
    wake = WakeConfig(crop=(48, 48), batch_size=1, border=0, pool=3, samples=1)
    coarse = _rendered(wake, images, latents, optics, sim)
    fine = np.asarray(render(Droplets(x[0], y[0], radius[0], comp[0], jnp.ones(3)), optics,
                             Background(colour[0], illumination[0]), (48, 48), sim.render))
    np.testing.assert_allclose(coarse, fine[1::3, 1::3], atol=1e-5)
    # More points per pixel approach the full box average.
    full = _rendered(dataclasses.replace(wake, samples=3), images, latents, optics, sim)
    np.testing.assert_allclose(full, fine.reshape(16, 3, 16, 3, 3).mean(axis=(1, 3)), atol=1e-5)
