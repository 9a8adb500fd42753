"""The wake objective: an ELBO on real, unlabeled crops, with the encoder as amortized guide.

`wake_model` is the scene model of `amortize.model` for a minibatch of crops: the same priors
and the same renderer, with the decoder's optics MLP and its pixel noise as learned global
parameters (`numpyro.param`). `wake_guide` runs the encoder (registered with `flax_module`)
on the crops and turns its per-cell outputs into a variational distribution over every
droplet latent. Both sit in a `plate` over the corpus's crops with subsampling, so the
minibatch ELBO is scaled to the whole corpus.

Droplet slots. A crop has thousands of output cells but tens of droplets. The guide keeps as
candidate slots the `n_slots` local maxima of presence with the highest logits; every other
cell is absent. Gradients reach every candidate's presence, so a droplet the encoder
half-sees can be switched on, and the slot count is sized from the prior's densest scene, so
it never truncates a plausible scene. The presence prior is per cell (see `wake_model`).

Presence is a Bernoulli per slot, rendered through a *continuous relaxation* (binary
Concrete, Maddison et al. 2017, sampled in logit space as Logistic(logit / T, 1 / T)) and
scored by the *discrete* KL(Bernoulli(q) || Bernoulli(prior)). Why:
- the renderer already treats presence as a droplet's opacity, and the relaxation keeps every
  latent reparameterised (low-variance gradients through the renderer); enumerating 2^N
  presence patterns is out of the question, and a score-function estimator for N ~ 100
  Bernoullis per crop is too noisy to train on;
- the relaxed-space KL grows linearly with the gap between guide and prior logits, so it
  charges a confidently empty slot far more than the Bernoulli KL does (about 9 nats
  instead of 0.3 for a guide logit of -10 against a prior rate of 0.26), pulling the
  encoder's presence up everywhere.
In numpyro terms the relaxed sample site is masked out of the ELBO in model and guide, the
guide passes its logits to the model through a Delta site, and the model adds the Bernoulli
KL as a `factor`.

Other latents: centres and log radii are truncated normals on the prior's support, the
composition is logit-normal, and the background is a point estimate (Delta) fitted to the
encoder's background map, its prior log-density still counted.

Crop edges: droplets centred outside a crop can reach into it, and no slot can explain them,
so the likelihood leaves out a `border` of pixels at the crop's edge.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import flax_module

from amortize.config import RenderConfig, SceneConfig, _check
from amortize.corpus import AUGMENTATIONS
from amortize.droplets import N_ILLUMINATION, Droplets, Background, illumination_at
from amortize.encoder import (
    ALIGN, OFFSET_REACH, CellOutputs, Encoder, EncoderConfig, cell_centres, decode_outputs,
    input_features, pad_to_align, standardise,
)
from amortize.losses import cell_mask
from amortize.nuisance import gaussian_blur
from amortize.optics import coarser_grid
from amortize.render import render_logits

#: Name of the encoder's parameters in the numpyro parameter map (set by `flax_module`).
ENCODER_PARAM = "encoder$params"
#: Learned decoder parameters shared by the whole corpus.
DECODER_PARAMS = ("optics", "log_noise")
#: Bounds of the composition guide's logit mean and scale: keeps its samples strictly
#: inside (0, 1) in float32, where the Beta prior's density is finite.
COMP_LOGIT_LIMIT = 5.0
COMP_LOGIT_SCALE_MAX = 1.5
#: Presence logit of filler slots (a crop with fewer candidate peaks than slots).
ABSENT_LOGIT = -30.0
#: Keeps the background point estimate strictly inside its Uniform prior.
BACKGROUND_EPS = 1e-3
#: Prior sd of the smooth background correction's knots (`WakeConfig.field_knots`), logit
#: units: 0.025 in a mid-grey pixel's value, a few times the slow variations (19 px block
#: means: RMS 0.006) that the quadratic illumination left on a 507 x 380 frame.
FIELD_SD = 0.1


@dataclasses.dataclass(frozen=True)
class WakeConfig:
    """Settings of the wake ELBO.

    Attributes:
        crop: (H, W) of the training crops, px.
        batch_size: crops per step.
        temperature: of the relaxed presence; lower is closer to binary, noisier gradients.
        border: px at each crop edge left out of the likelihood (droplets centred outside).
        slot_sd: candidate slots per crop are the prior's densest expected count plus this
            many standard deviations.
        noise_init: starting pixel noise scale of the decoder.
        blur_max: if > 0, the model blurs its rendering with a learned Gaussian of sigma in
            (0, blur_max) px (the microscope's defocus; simulated scenes are blurred too).
        augmentation: of the corpus crops (`amortize.corpus.AUGMENTATIONS`): "turns" (flips
            and quarter turns) for looks without a direction; "mirror" when the light comes
            from one side, as on ../shared/data/droplets, whose caustic is always below the
            droplet: a turned crop shows a look the optics cannot draw, and the fitted optics
            average the caustic away.
        pool: the observed image is the rendering averaged over `pool` x `pool` blocks, so
            that SVI on a copy enlarged `pool` times (`refine --scale 1/pool`) is scored on
            the image's own pixels rather than on interpolated ones (see `refinement`).
        samples: with pool > 1, the rendering is evaluated at `samples` x `samples` points
            of each image pixel (centres of equal sub-blocks; must divide pool) instead of at
            all pool x pool work pixels; 0 means pool. The look is still the work scale's
            (`optics.coarser_grid`), so fewer points only coarsen the box average.
        field_knots: (Gy, Gx) knots of a smooth background correction (`Background.field`,
            prior Normal(0, `FIELD_SD`) per knot and channel) fitted along with the rest;
            (0, 0), the default, leaves it out. Refinement sets it on enlarged copies
            (`RefineConfig.field`).
    """

    crop: tuple[int, int] = (160, 160)
    batch_size: int = 4
    temperature: float = 0.5
    border: int = 16
    slot_sd: float = 4.0
    noise_init: float = 0.03
    blur_max: float = 0.0
    augmentation: str = "turns"
    pool: int = 1
    samples: int = 0
    field_knots: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        _check(len(self.crop) == 2 and min(self.crop) >= 32, "crop", "need two sizes >= 32 px")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(0 <= 2 * self.border < min(self.crop), "border", "must leave part of the crop")
        _check(self.slot_sd >= 0, "slot_sd", "must be >= 0")
        _check(self.noise_init > 0, "noise_init", "must be > 0")
        _check(0 <= self.blur_max <= 8, "blur_max", "must be in [0, 8] px")
        _check(self.augmentation in AUGMENTATIONS, "augmentation", f"must be one of {', '.join(AUGMENTATIONS)}")
        _check(isinstance(self.pool, int) and self.pool >= 1, "pool", "must be an integer >= 1")
        _check(isinstance(self.samples, int) and self.samples >= 0
               and (self.samples == 0 or self.pool % self.samples == 0),
               "samples", "must be 0 or an integer that divides pool")
        _check(len(self.field_knots) == 2 and (tuple(self.field_knots) == (0, 0) or min(self.field_knots) >= 2),
               "field_knots", "must be (0, 0) or two knot counts >= 2")

    @property
    def render_step(self) -> int:
        """Work px between the points where the model evaluates its rendering."""
        return self.pool // self.samples if self.samples else 1

    @classmethod
    def tiny(cls) -> "WakeConfig":
        return cls(crop=(64, 64), batch_size=2, border=4)

    def n_slots(self, scene: SceneConfig, encoder: EncoderConfig) -> int:
        """Candidate slots per crop: densest expected count + slot_sd sd, at most the cells."""
        h, w = self.crop
        mean = scene.density * scene.density_spread * h * w / 1e4
        cells = (h // encoder.stride) * (w // encoder.stride)
        return int(min(math.ceil(mean + self.slot_sd * math.sqrt(mean) + 4), cells))


def _reach(encoder: EncoderConfig) -> float:
    """How far (px) past the crop edge a candidate's centre can be (its cell's offset reach)."""
    return OFFSET_REACH * encoder.stride + 0.5


def block_mean(images: jnp.ndarray, k: int) -> jnp.ndarray:
    """(B, H, W, C) averaged over k x k blocks to (B, H / k, W / k, C); H and W are
    multiples of k. This is the box filter `predict.resize` shrinks with."""
    if k == 1:
        return images
    b, h, w, c = images.shape
    return images.reshape(b, h // k, k, w // k, k, c).mean(axis=(2, 4))


def model_mean(droplets: Droplets, optics: dict, background: Background, shape: tuple[int, int],
               render_config: RenderConfig, wake: WakeConfig, blur_sigma=None) -> jnp.ndarray:
    """The model's mean image of one crop, (H / pool, W / pool, C): `droplets` (work px;
    `shape` = (H, W) work px) rendered at the evaluation points, blurred by `blur_sigma` work
    px (None: no blur), and averaged over each image pixel."""
    h, w = shape
    step = wake.render_step
    # Rendered on the grid of evaluation points (`step` work px apart; pixel i of it is
    # centred on work coordinate step * i + (step - 1) / 2).
    on_grid = droplets.replace(x=(droplets.x + 0.5) / step - 0.5, y=(droplets.y + 0.5) / step - 0.5,
                               radius=droplets.radius / step)
    mean = jax.nn.sigmoid(render_logits(on_grid, coarser_grid(optics, step), background,
                                        (h // step, w // step), render_config))
    if blur_sigma is not None:
        mean = gaussian_blur(mean, blur_sigma / step, wake.blur_max / step)
    return block_mean(mean[None], wake.pool // step)[0]


def interior_mask(crop: tuple[int, int], border: int) -> np.ndarray:
    """(H, W) bool, False within `border` px of the crop's edge."""
    h, w = crop
    mask = np.zeros((h, w), bool)
    mask[border : h - border, border : w - border] = True
    return mask


# ---------------------------------------------------------------------------------------
# From cell outputs to slots and background


def candidate_slots(out: CellOutputs, n_slots: int, shape: tuple[int, int],
                    include: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
    """The `n_slots` local maxima of presence with the highest logits, per crop; each value
    (B, N[, K]).

    Only cells that are the maximum of their 3 x 3 neighbourhood are candidates, as in
    `detect`. Otherwise the ELBO can paint one blurred droplet with two or three concentric
    slots from neighbouring cells (the nearest-droplet compositing makes a soft edge out of
    them), which our first run on real images did: the encoder's count rose tenfold. Cells
    centred outside the crop are never candidates. `include` (B, Hc, Wc) marks more cells to
    rank with the peaks (refinement adds the cells predict reports).
    """
    b, hc, wc = out.logit.shape
    valid = cell_mask((hc, wc), out.stride, shape)
    peak = out.logit >= jax.lax.reduce_window(out.logit, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), "SAME")
    usable = valid[None] & (peak if include is None else peak | include)
    # Peaks first; if a crop has fewer peaks than slots, the rest are filled and kept absent.
    rank = jnp.where(usable, out.logit, jnp.where(valid[None], out.logit - 1e3, -1e4))
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(rank).reshape(b, hc * wc), n_slots)

    def gather(a):
        flat = a.reshape((b, hc * wc) + a.shape[3:])
        return jnp.take_along_axis(flat, idx.reshape(idx.shape + (1,) * (flat.ndim - 2)), axis=1)

    xx, yy = cell_centres((hc, wc), out.stride)
    return {
        "logit": jnp.where(gather(usable), gather(out.logit), ABSENT_LOGIT),
        "x": gather(jnp.broadcast_to(xx, out.logit.shape)) + gather(out.offset[..., 0]),
        "y": gather(jnp.broadcast_to(yy, out.logit.shape)) + gather(out.offset[..., 1]),
        "x_std": gather(out.offset_scale[..., 0]),
        "y_std": gather(out.offset_scale[..., 1]),
        "log_radius": gather(out.log_radius),
        "log_radius_scale": gather(out.log_radius_scale),
        "composition": gather(out.composition),
        "composition_scale": gather(out.composition_scale),
        "index": idx,  # flat cell index of each slot
    }


def fit_background(out: CellOutputs, shape: tuple[int, int]) -> Background:
    """Least-squares fit of the model's background (colour + illumination field, in logit
    units) to the encoder's per-cell background map, per crop (leading batch axis)."""
    grid = out.logit.shape[-2:]
    weight = cell_mask(grid, out.stride, shape).astype(jnp.float32).reshape(-1)
    xx, yy = cell_centres(grid, out.stride)
    design = jnp.concatenate([jnp.ones(grid + (1,)), illumination_at(xx, yy, shape)], -1)
    design = design.reshape(-1, 1 + N_ILLUMINATION)  # (M, 6)
    target = jnp.clip(out.background, 1e-3, 1 - 1e-3)
    target = jnp.log(target) - jnp.log1p(-target)
    target = target.reshape(target.shape[0], -1, target.shape[-1])  # (B, M, C)
    gram = (design * weight[:, None]).T @ design + 1e-4 * jnp.eye(1 + N_ILLUMINATION)
    rhs = jnp.einsum("mk,m,bmc->bkc", design, weight, target)
    coef = jnp.linalg.solve(gram[None], rhs)  # (B, 6, C)
    colour = jax.nn.sigmoid(coef[:, 0])
    return Background(colour, jnp.swapaxes(coef[:, 1:], 1, 2))


# ---------------------------------------------------------------------------------------
# Model and guide


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def bernoulli_kl(q_logit: jnp.ndarray, p: float) -> jnp.ndarray:
    """KL(Bernoulli(sigmoid(q_logit)) || Bernoulli(p)), elementwise, stable in logit space."""
    q = jax.nn.sigmoid(q_logit)
    log_q, log_1mq = jax.nn.log_sigmoid(q_logit), jax.nn.log_sigmoid(-q_logit)
    return q * (log_q - math.log(p)) + (1 - q) * (log_1mq - math.log1p(-p))


def wake_model(
    images: jnp.ndarray,
    *,
    n_crops: int,
    n_slots: int,
    scene: SceneConfig,
    encoder: EncoderConfig,
    render_config: RenderConfig,
    wake: WakeConfig,
    optics_init: dict,
) -> None:
    """The scene model for a minibatch of crops (B, H, W, C) drawn from `n_crops`, rendered
    at `wake.pool` times their size (latents in that frame; see `WakeConfig.samples`)."""
    b, h, w, c = images.shape
    h, w = h * wake.pool, w * wake.pool
    optics = numpyro.param("optics", optics_init)
    noise = jnp.exp(numpyro.param("log_noise", jnp.log(jnp.float32(wake.noise_init))))
    # The prior rate is per *cell*: the encoder's grid is the real set of slots (one droplet
    # per cell), and the candidates are just the cells worth instantiating. A per-candidate
    # rate (expected count / candidates, about 0.26) made the KL pull every empty candidate
    # towards presence 0.26, and the encoder's background presence rose until the peak rule
    # reported droplets everywhere (first runs on ../shared/data/droplets). Cells left out
    # cost KL(0 || rate) ~ rate each, which is negligible and dropped.
    rate = min(scene.density * encoder.stride**2 / 1e4, 0.5)
    temp = wake.temperature
    reach = _reach(encoder)
    log_mean, log_sd = scene.log_radius_prior
    lo, hi = math.log(scene.radius_min), math.log(scene.radius_max)
    a, bb = scene.composition_concentration
    with numpyro.plate("crops", n_crops, subsample_size=b):
        with handlers.mask(mask=False):  # scored by the Bernoulli KL below
            presence_logit = numpyro.sample(
                "presence_logit", dist.Logistic(_logit(rate) / temp, 1.0 / temp).expand([b, n_slots]).to_event(1)
            )
        q_logit = numpyro.sample("presence_q", dist.ImproperUniform(dist.constraints.real, (b,), (n_slots,)))
        numpyro.factor("presence_kl", -jnp.sum(bernoulli_kl(q_logit, rate), axis=-1))
        x = numpyro.sample("x", dist.Uniform(-0.5 - reach, w - 0.5 + reach).expand([b, n_slots]).to_event(1))
        y = numpyro.sample("y", dist.Uniform(-0.5 - reach, h - 0.5 + reach).expand([b, n_slots]).to_event(1))
        log_radius = numpyro.sample(
            "log_radius",
            dist.TruncatedNormal(log_mean, log_sd, low=lo, high=hi).expand([b, n_slots]).to_event(1),
        )
        composition = numpyro.sample(
            "composition", dist.Beta(a, bb).expand([b, n_slots, scene.n_types]).to_event(2)
        )
        colour = numpyro.sample(
            "background_colour",
            dist.Uniform(scene.background_min, scene.background_max).expand([b, c]).to_event(1),
        )
        illumination = numpyro.sample(
            "illumination",
            dist.Normal(0.0, max(scene.illumination_sd, 1e-3)).expand([b, c, N_ILLUMINATION]).to_event(2),
        )
        field = None
        if tuple(wake.field_knots) != (0, 0):
            field = numpyro.sample(
                "background_field", dist.Normal(0.0, FIELD_SD).expand([b, c, *wake.field_knots]).to_event(3))
        sigma = None
        if wake.blur_max > 0:
            sigma = numpyro.param("blur_sigma", jnp.float32(wake.blur_max / 2),
                                  constraint=dist.constraints.interval(0.0, wake.blur_max))
        droplets = Droplets(x, y, jnp.exp(log_radius), composition, jax.nn.sigmoid(presence_logit))
        mean = jax.vmap(lambda d, bg: model_mean(d, optics, bg, (h, w), render_config, wake, sigma))(
            droplets, Background(colour, illumination, field))
        mean = numpyro.deterministic("rendered", mean)
        inside = jnp.asarray(interior_mask(images.shape[1:3], wake.border))[None, :, :, None]
        numpyro.sample("image", dist.Normal(mean, noise).mask(inside).to_event(3), obs=images)


def wake_guide(
    images: jnp.ndarray,
    *,
    n_crops: int,
    n_slots: int,
    scene: SceneConfig,
    encoder: EncoderConfig,
    render_config: RenderConfig,
    wake: WakeConfig,
    optics_init: dict,
) -> None:
    """The amortized guide: the encoder's answer for each crop as a distribution."""
    del render_config, optics_init  # the model's; same signature as wake_model
    b, h, w, _ = images.shape
    net = flax_module("encoder", Encoder(encoder), input_shape=(1, ALIGN, ALIGN, encoder.input_channels))
    z, stats = standardise(input_features(images, encoder))
    out = decode_outputs(net(pad_to_align(z)), stats, encoder.n_types, encoder.stride)
    slots = candidate_slots(out, n_slots, (h, w))
    background = fit_background(out, (h, w))
    temp = wake.temperature
    reach = _reach(encoder)
    lo, hi = math.log(scene.radius_min), math.log(scene.radius_max)
    comp = jnp.clip(slots["composition"], 1e-3, 1 - 1e-3)
    comp_loc = jnp.clip(jnp.log(comp) - jnp.log1p(-comp), -COMP_LOGIT_LIMIT, COMP_LOGIT_LIMIT)
    # Delta method: sd of logit(c) ~ sd(c) / (c (1 - c)).
    comp_scale = jnp.minimum(slots["composition_scale"] / (comp * (1 - comp)), COMP_LOGIT_SCALE_MAX)
    colour = jnp.clip(background.colour, scene.background_min + BACKGROUND_EPS,
                      scene.background_max - BACKGROUND_EPS)
    with numpyro.plate("crops", n_crops, subsample_size=b):
        with handlers.mask(mask=False):  # the relaxed draw only renders; see the module notes
            numpyro.sample("presence_logit", dist.Logistic(slots["logit"] / temp, 1.0 / temp).to_event(1))
        numpyro.sample("presence_q", dist.Delta(slots["logit"]).to_event(1))
        numpyro.sample("x", dist.TruncatedNormal(slots["x"], slots["x_std"], low=-0.5 - reach,
                                                 high=w - 0.5 + reach).to_event(1))
        numpyro.sample("y", dist.TruncatedNormal(slots["y"], slots["y_std"], low=-0.5 - reach,
                                                 high=h - 0.5 + reach).to_event(1))
        numpyro.sample("log_radius", dist.TruncatedNormal(
            jnp.clip(slots["log_radius"], lo, hi), slots["log_radius_scale"], low=lo, high=hi
        ).to_event(1))
        numpyro.sample("composition", dist.TransformedDistribution(
            dist.Normal(comp_loc, comp_scale), dist.transforms.SigmoidTransform()
        ).to_event(2))
        numpyro.sample("background_colour", dist.Delta(colour).to_event(1))
        numpyro.sample("illumination", dist.Delta(background.illumination).to_event(2))


# ---------------------------------------------------------------------------------------
# The ELBO and its parts


#: Sites grouped for logging: (guide sites, model sites); sum log q - sum log p of a group is
#: its KL estimate (presence: the Bernoulli KL factor).
LATENT_GROUPS = {
    "kl_presence": (("presence_q",), ("presence_q", "presence_kl")),
    "kl_geometry": (("x", "y", "log_radius"),) * 2,
    "kl_composition": (("composition",),) * 2,
    "kl_background": (("background_colour", "illumination"),) * 2,
}


def _site_log_prob(site: dict) -> jnp.ndarray:
    lp = site["fn"].log_prob(site["value"])
    if site.get("mask") is not None:
        lp = jnp.where(site["mask"], lp, 0.0)
    if site.get("scale") is not None:
        lp = lp * site["scale"]
    return jnp.sum(lp)


def elbo_parts(params: dict, key: jax.Array, images: jnp.ndarray, **kwargs) -> dict[str, jnp.ndarray]:
    """One-sample ELBO estimate and its parts, all scaled to the whole corpus.

    The same estimator as numpyro's `Trace_ELBO` (guide trace, model replayed on it), kept
    by site so that the reconstruction and each latent group's KL can be logged.

    Returns:
        elbo, log_likelihood, the KL of each group in `LATENT_GROUPS`, and recon_rmse (the
        minibatch's root mean squared error of the rendered mean inside the crop border).
    """
    guide = handlers.trace(handlers.seed(handlers.substitute(wake_guide, data=params), key))
    guide_trace = guide.get_trace(images, **kwargs)
    model = handlers.trace(handlers.replay(handlers.substitute(wake_model, data=params), guide_trace))
    model_trace = model.get_trace(images, **kwargs)
    parts = {"log_likelihood": _site_log_prob(model_trace["image"])}
    for group, (guide_sites, model_sites) in LATENT_GROUPS.items():
        parts[group] = (sum(_site_log_prob(guide_trace[s]) for s in guide_sites)
                        - sum(_site_log_prob(model_trace[s]) for s in model_sites))
    parts["elbo"] = parts["log_likelihood"] - sum(parts[g] for g in LATENT_GROUPS)
    inside = jnp.asarray(interior_mask(images.shape[1:3], kwargs["wake"].border))[None, :, :, None]
    err = jnp.where(inside, model_trace["rendered"]["value"] - images, 0.0)
    parts["recon_rmse"] = jnp.sqrt(jnp.sum(err**2) / (jnp.sum(inside) * images.shape[0] * images.shape[-1]))
    return parts


def init_params(encoder_params: dict, optics_params: dict, wake: WakeConfig) -> dict:
    """The numpyro parameter map: encoder (guide) and decoder (model) parameters."""
    return {
        ENCODER_PARAM: encoder_params["params"],
        "optics": optics_params,
        "log_noise": jnp.log(jnp.float32(wake.noise_init)),
    }


def encoder_variables(params: dict) -> dict:
    """The encoder's flax variables back out of the parameter map (for predict)."""
    return {"params": params[ENCODER_PARAM]}
