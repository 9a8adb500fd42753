"""The numpyro scene model: priors over droplets and background, the renderer, a likelihood.

`droplet_model(image)` conditions on an observed (H, W, C) image; `droplet_model(shape=...)`
with no image samples a scene from the prior (prior predictive). The renderer is the pure
function `amortize.render.render`; this module only wraps it in `sample`/`plate` statements.

Sites (N = slots, K = types, C = channels):
    presence (N,)  Bernoulli: the slot holds a droplet
    thinned (N,)  deterministic, presence after hard-core thinning (scene.min_separation > 0)
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

import jax
import jax.numpy as jnp
import numpy as np
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

    radius = jnp.exp(log_radius)
    presence = presence.astype(jnp.float32)
    if scene.min_separation > 0:
        # A deterministic thinning of the sampled centres: the prior predictive draws real-looking
        # scenes, but the site has no density, so conditioned models (wake, refine) leave it out.
        keep = hard_core_survivors(x, y, radius, presence, scene.min_separation)
        presence = numpyro.deterministic("thinned", presence * keep)
    droplets = Droplets(x, y, radius, composition, presence)
    background = Background(colour, illumination)
    mean = numpyro.deterministic(
        "rendered", render(droplets, optics_params, background, (h, w), render_config)
    )
    numpyro.sample("image", dist.Normal(mean, noise).to_event(3), obs=image)


#: Rows of the pairwise distance table computed at once by `hard_core_survivors`.
PAIR_BLOCK = 512


def hard_core_survivors(
    x: jnp.ndarray, y: jnp.ndarray, radius: jnp.ndarray, presence: jnp.ndarray, separation: float
) -> jnp.ndarray:
    """Matern type II thinning: which present droplets no larger droplet crowds out.

    Droplet i is removed when a present droplet j of higher priority (a larger radius; on a
    tie, the lower index) has its centre closer than `separation * (r_i + r_j)`. Removed
    droplets still remove others (type II), so the result does not depend on any order.

    Args:
        x, y, radius, presence: (N,) slots; absent slots neither survive nor remove others.
        separation: in [0, 1]; 1 forbids any overlap.

    Returns:
        (N,) float32, 1 for survivors. Memory is PAIR_BLOCK x N, never N x N.
    """
    n = x.shape[0]
    index = jnp.arange(n)
    pad = -n % PAIR_BLOCK
    rows = jnp.pad(index, (0, pad)).reshape(-1, PAIR_BLOCK)

    def crowded(block):
        dx = x[block][:, None] - x[None, :]
        dy = y[block][:, None] - y[None, :]
        ri, rj = radius[block][:, None], radius[None, :]
        reach = separation * (ri + rj)
        outranks = (rj > ri) | ((rj == ri) & (index[None, :] < block[:, None]))
        close = dx * dx + dy * dy < reach * reach
        return jnp.any(close & outranks & (presence[None, :] > 0), axis=1)

    removed = jax.lax.map(crowded, rows).reshape(-1)[:n]
    return jnp.where(removed, 0.0, 1.0).astype(jnp.float32) * (presence > 0)


def scene_from_trace(trace: dict) -> tuple[Droplets, Background, jnp.ndarray]:
    """(droplets, background, noise) from a model trace's site values."""
    v = {name: site["value"] for name, site in trace.items()}
    presence = v["thinned"] if "thinned" in v else v["presence"].astype(jnp.float32)
    droplets = Droplets(
        v["x"], v["y"], jnp.exp(v["log_radius"]), v["composition"], presence
    )
    return droplets, Background(v["background_colour"], v["illumination"]), v["noise"]


def thinning_retention(scene: SceneConfig, density: float, window: int = 512, seed: int = 0) -> float:
    """Share of the prior's droplets that survive hard-core thinning at `density` (Monte Carlo).

    Centres are drawn over a `window`-px square plus the scene's margin, at the scene's
    radius prior; survivors are counted in the inner square only, so no edge effect.
    """
    if scene.min_separation <= 0:
        return 1.0
    rng = np.random.default_rng(seed)
    m = scene.margin()
    side = window + 2 * m
    n = max(int(rng.poisson(density * side * side / 1e4)), 1)
    slots = -(-n // PAIR_BLOCK) * PAIR_BLOCK  # few distinct shapes, so few compilations
    x, y = rng.uniform(-m, window + m, slots), rng.uniform(-m, window + m, slots)
    mean, sd = scene.log_radius_prior
    lo, hi = np.log(scene.radius_min), np.log(scene.radius_max)
    log_r = mean + sd * rng.standard_normal(8 * slots)
    log_r = log_r[(log_r >= lo) & (log_r <= hi)]
    radius = np.exp(np.resize(log_r, slots) if log_r.size else np.full(slots, mean))
    present = (np.arange(slots) < n).astype(np.float32)
    keep = np.asarray(hard_core_survivors(
        *(jnp.asarray(a, jnp.float32) for a in (x, y, radius, present)), scene.min_separation))
    inner = (x >= 0) & (x < window) & (y >= 0) & (y < window) & (present > 0)
    return float(keep[inner].sum() / max(inner.sum(), 1))


def density_before_thinning(scene: SceneConfig, observed: float, iterations: int = 6) -> float:
    """The `density` whose thinned scenes show `observed` droplets per 100 x 100 px.

    A fixed-point iteration on observed = density * retention(density); the retention
    falls as the density rises, so it converges from the observed value upwards. Capped at
    ten times the observed density (past that a denser prior no longer adds droplets).
    """
    density = observed
    for _ in range(iterations):
        density = min(observed / max(thinning_retention(scene, density), 1e-3), 10 * observed)
    return float(density)
