"""The numpyro scene model: priors over droplets and background, the renderer, a likelihood.

`droplet_model(image)` conditions on an observed (H, W, C) image; `droplet_model(shape=...)`
with no image samples a scene from the prior (prior predictive). The renderer is the pure
function `amortize.render.render`; this module only wraps it in `sample`/`plate` statements.

Sites (N = slots, K = types, C = channels):
    presence (N,)  Bernoulli: the slot holds a droplet
    x, y (N,)  Uniform over the image plus a margin (px)
    log_radius (N,)  log-normal radius prior truncated to the configured range
    composition (N, K)  Beta per type
    background_colour (C,)  Uniform
    illumination (C, 5)  Normal: smooth low-order illumination field (logit units)
    noise ()  LogUniform pixel noise scale
    density_factor ()  LogUniform scale of the density (only when scene.density_spread > 1)
    rendered (H, W, C)  deterministic, the noise-free image
    image (H, W, C)  Normal(rendered, noise)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from amortize.config import RenderConfig, SceneConfig
from amortize.droplets import N_ILLUMINATION, Background, Droplets
from amortize.errors import BadArgument
from amortize.render import render


def droplet_model(
    image: jnp.ndarray | None = None,
    *,
    shape: tuple[int, int] | None = None,
    optics_params: dict,
    scene: SceneConfig = SceneConfig(),
    render_config: RenderConfig = RenderConfig(),
    n_slots: int | None = None,
) -> None:
    """Generative model of one droplet micrograph.

    Args:
        image: observed (H, W, C) image in [0, 1], or None to sample one.
        shape: (H, W) when `image` is None.
        optics_params: optics MLP variables shared by every droplet.
        scene: prior hyper-parameters.
        render_config: renderer settings.
        n_slots: droplet capacity; defaults to `scene.n_slots(shape)`.
    """
    if image is not None:
        shape = tuple(image.shape[:2])
    if shape is None:
        raise BadArgument("droplet_model", "give either an image or a shape")
    h, w = shape
    n = n_slots if n_slots is not None else scene.n_slots(shape)
    margin = scene.margin()
    expected = scene.expected_count(shape)
    if scene.density_spread > 1.0:
        spread = scene.density_spread
        expected = expected * numpyro.sample("density_factor", dist.LogUniform(1 / spread, spread))
    p_present = jnp.minimum(expected / n, 1.0)
    log_mean, log_sd = scene.log_radius_prior
    a, b = scene.composition_concentration
    c = scene.channels

    with numpyro.plate("droplets", n):
        presence = numpyro.sample("presence", dist.Bernoulli(probs=p_present))
        x = numpyro.sample("x", dist.Uniform(-0.5 - margin, w - 0.5 + margin))
        y = numpyro.sample("y", dist.Uniform(-0.5 - margin, h - 0.5 + margin))
        log_radius = numpyro.sample(
            "log_radius",
            dist.TruncatedNormal(
                log_mean, log_sd, low=jnp.log(scene.radius_min), high=jnp.log(scene.radius_max)
            ),
        )
        composition = numpyro.sample(
            "composition", dist.Beta(a, b).expand([scene.n_types]).to_event(1)
        )
    colour = numpyro.sample(
        "background_colour",
        dist.Uniform(scene.background_min, scene.background_max).expand([c]).to_event(1),
    )
    illumination = numpyro.sample(
        "illumination",
        dist.Normal(0.0, max(scene.illumination_sd, 1e-6)).expand([c, N_ILLUMINATION]).to_event(2),
    )
    noise = numpyro.sample("noise", dist.LogUniform(scene.noise_min, scene.noise_max))

    droplets = Droplets(x, y, jnp.exp(log_radius), composition, presence.astype(jnp.float32))
    background = Background(colour, illumination)
    mean = numpyro.deterministic(
        "rendered", render(droplets, optics_params, background, (h, w), render_config)
    )
    numpyro.sample("image", dist.Normal(mean, noise).to_event(3), obs=image)


def scene_from_trace(trace: dict) -> tuple[Droplets, Background, jnp.ndarray]:
    """(droplets, background, noise) from a model trace's site values."""
    v = {name: site["value"] for name, site in trace.items()}
    droplets = Droplets(
        v["x"], v["y"], jnp.exp(v["log_radius"]), v["composition"],
        v["presence"].astype(jnp.float32),
    )
    return droplets, Background(v["background_colour"], v["illumination"]), v["noise"]
