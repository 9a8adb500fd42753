import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from amortize.bench import NotebookGuide


def toy_model(images, *, n_crops, width):
    """Sites like the scene model's: a plate over crops, interval and unit-interval supports,
    one observed site."""
    with numpyro.plate("crops", n_crops, subsample_size=images.shape[0]):
        x = numpyro.sample("x", dist.Uniform(-0.5, width).expand([images.shape[0], 4]).to_event(1))
        c = numpyro.sample("composition", dist.Beta(2.0, 2.0).expand([images.shape[0], 4, 3]).to_event(2))
        mean = jnp.sum(x, -1) / width + jnp.sum(c, (-2, -1))
        numpyro.sample("image", dist.Normal(mean, 0.1), obs=images[:, 0])


def test_the_notebook_guide_is_autonormal_from_uniform_values_and_jits():
    images = jnp.ones((1, 2))
    kwargs = {"n_crops": 1, "width": 10.0}
    guide = NotebookGuide(toy_model, images, **kwargs)
    assert set(guide.sites) == {"x", "composition"}
    svi = SVI(toy_model, guide, numpyro.optim.Adam(0.01), Trace_ELBO(), **kwargs)
    params = svi.get_params(jax.jit(svi.init)(jax.random.PRNGKey(0), images))
    auto = AutoNormal(toy_model)
    auto_svi = SVI(toy_model, auto, numpyro.optim.Adam(0.01), Trace_ELBO(), **kwargs)
    auto_params = auto_svi.get_params(jax.jit(auto_svi.init)(jax.random.PRNGKey(0), images))
    # AutoNormal's parameters: names, shapes, scales 0.1, locations uniform in (-2, 2).
    assert {k: np.shape(v) for k, v in params.items()} == {k: np.shape(v) for k, v in auto_params.items()}
    for name in guide.sites:
        np.testing.assert_allclose(params[f"{name}_auto_scale"], 0.1, rtol=1e-5)
        assert np.all(np.abs(params[f"{name}_auto_loc"]) < 2)
    # Its median maps the locations onto each site's support, as AutoNormal's does.
    same_locs = {**params, **{k: v for k, v in auto_params.items() if k.endswith("_loc")}}
    ours, theirs = guide.median(same_locs), auto.median(auto_params)
    for name in guide.sites:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6)
    assert np.all((ours["x"] > -0.5) & (ours["x"] < 10.0))
    assert np.all((ours["composition"] > 0) & (ours["composition"] < 1))
