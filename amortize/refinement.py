"""Per-image SVI refinement, starting from the encoder's answer.

The model is the wake objective's scene model (`amortize.wake.wake_model`) for a single
image: the same priors, renderer, relaxed presence and learned pixel noise. The guide is
*not* amortized here: every droplet slot has its own variational parameters (a mean-field
guide with the same distribution families as the encoder's), and they start where the
encoder put them, with the encoder's predicted scales. So SVI starts next to the answer
instead of at the prior, and converges in hundreds of steps instead of the original
notebooks' 100k.

Births and deaths.
- Deaths: each slot's presence is a variational Bernoulli probability scored against the
  per-cell prior rate, so a slot that explains nothing is switched off by the ELBO.
- Births: the slots also include the encoder's sub-threshold presence peaks (a droplet it
  half-saw can be switched on), and spare slots. Between SVI rounds, a residual-driven
  proposal places spare or dead slots on the strongest blobs of the squared residual that
  no present droplet sits on, with a radius from the blob's scale; SVI then keeps or kills
  them.

The optics MLP is frozen by default (the trained decoder's look); `freeze_optics=False`
fine-tunes it on this image as well. The same jitted code runs on a CPU or a GPU; only the
device placement differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.infer import SVI
from numpyro.infer.elbo import ELBO
from numpyro.infer.util import log_density
from tqdm.auto import tqdm

from amortize.autoscale import choose_scale
from amortize.config import AUTO, RefineConfig, RenderConfig
from amortize.detect import DEFAULT_THRESHOLD, cell_droplets, input_px, to_work_table
from amortize.droplets import Background, Droplets
from amortize.encoder import decode_outputs
from amortize.errors import AmortizeError, BadArgument
from amortize.nuisance import fixed_gaussian_blur, gaussian_blur
from amortize.predict import MIN_SIDE, Predictor, check_image, resize, resize_to
from amortize.program_store import stored_jit
from amortize.reconstruct import SLOT_BUCKET, render_table, rmse, slot_count
from amortize.render import render_logits
from amortize.wake import (
    ABSENT_LOGIT, BACKGROUND_EPS, COMP_LOGIT_LIMIT, WakeConfig, _reach, candidate_slots,
    model_mean, wake_model,
)

#: Candidate slots start with logits in this range, so that none starts saturated (a
#: sigmoid at -30 has no gradient left to switch a droplet on). Spare slots stay at
#: `ABSENT_LOGIT`, out of play, until a birth proposal places them: switched on anywhere,
#: they took pixels from real droplets to fit blur the model does not have (simulated
#: scenes: 40 false droplets per 512 x 384 image).
INIT_LOGIT_RANGE = (-6.0, 8.0)
#: Starting presence logit of the droplets predict reports (see `slots_from_encoder`).
DETECTED_LOGIT = 6.0
#: Presence of a slot placed by a birth proposal: undecided, for SVI to settle.
BIRTH_LOGIT = 0.0
#: Smallest starting scales (px for positions, log units for radii).
MIN_INIT_SCALE = {"offset": 0.01, "log_radius": 0.005, "composition": 0.02}


@dataclasses.dataclass
class RefineResult:
    """What one refinement produced (coordinates in the input image's pixels).

    Attributes:
        table: droplet table (predict's columns): posterior medians (centres that ran into
            their trust region's edge keep their start) and posterior standard deviations.
        start_table: the table refinement started from (predict's answer).
        recon_before, recon_after: the decoder's renderings of the two tables, (H, W, 3).
        recon_rmse_before, recon_rmse_after: their RMSE against the image.
        losses: negative ELBO at every step.
        steps: steps taken; converged: whether a relative-change test stopped it, and
            stopped_by which ("loss" or "fit"; None when the step budget ran out).
        answer_step: the step whose state is reported (the last, or with the fit test on,
            the one whose reported droplets fit the image best; see `RefineConfig.fit_stop`).
        fits: with the fit test on, that fit after each chunk (RMSE on the likelihood's grid).
        coarse_steps: how many of the first steps scored the coarse grid, one point per
            image pixel (`RefineConfig.coarse_steps`); included in `steps`.
        births: slots placed by residual proposals; wall_s: seconds; device: where it ran.
        scale: the scale it worked at; scale_search: {scale: reconstruction RMSE} of the
            scales `scale="auto"` tried (empty otherwise).
    """

    table: dict[str, np.ndarray]
    start_table: dict[str, np.ndarray]
    recon_before: np.ndarray
    recon_after: np.ndarray
    recon_rmse_before: float
    recon_rmse_after: float
    losses: np.ndarray
    steps: int
    converged: bool
    births: int
    wall_s: float
    device: str
    scale: float = 1.0
    scale_search: dict = dataclasses.field(default_factory=dict)
    stopped_by: str | None = None
    answer_step: int = 0
    fits: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    coarse_steps: int = 0
    params: dict = dataclasses.field(repr=False, default_factory=dict)
    anchor: dict = dataclasses.field(repr=False, default_factory=dict)

    def summary(self) -> dict:
        return {
            "recon_rmse_before": round(self.recon_rmse_before, 6),
            "recon_rmse_after": round(self.recon_rmse_after, 6),
            "steps": self.steps,
            "converged": self.converged,
            "stopped_by": self.stopped_by,
            "answer_step": self.answer_step,
            "coarse_steps": self.coarse_steps,
            "fit_rmse_per_check": [round(float(e), 6) for e in self.fits],
            "births_proposed": self.births,
            "count_before": int(len(self.start_table["x"])),
            "count_after": int(len(self.table["x"])),
            "final_loss": float(self.losses[-1]) if len(self.losses) else None,
            "wall_s": round(self.wall_s, 3),
            "device": self.device,
        }


def pick_device(name: str) -> jax.Device:
    """`cpu`, `gpu` or `auto` (a GPU when JAX sees one, else the CPU)."""
    if name not in ("cpu", "gpu", "auto"):
        raise BadArgument("--device", f"must be cpu, gpu or auto, got {name!r}")
    if name in ("gpu", "auto"):
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if gpus:
            return gpus[0]
        if name == "gpu":
            raise BadArgument("--device", "gpu asked for, but JAX sees no GPU (install jax[cuda12])")
    return jax.devices("cpu")[0]


# ---------------------------------------------------------------------------------------
# Slots: anchors and starting values, from the encoder or from a table


#: Trust region of refinement around each slot's starting answer: a centre moves at most
#: max(TRUST_PX, TRUST_RADII * r) px (TRUST_PX in input px, see `input_trust`) and a radius
#: changes by at most a factor exp(+-TRUST_LOG_RADIUS). The nearest-droplet compositing
#: gives no gradient for the pixels a droplet takes from its neighbours, so without bounds a
#: droplet half hidden in a larger one drifts and grows into it (seen on simulated scenes:
#: radii tripled, centres moved 3 px). With soft overlaps at scale 1 and the background
#: correction on enlarged copies the floor could widen from 1 to 1.5 px: droplets that
#: predict had put 1-1.3 px off could reach their place (10 validation scenes, seed 555:
#: position RMSE 0.1366 px with 1, 0.1332 with 1.5, 0.1352 with 2; the slide at 4x:
#: 0.0242 -> 0.0240, the 507 x 380 stand-in 0.0246 -> 0.0244).
TRUST_PX, TRUST_RADII, TRUST_LOG_RADIUS = 1.5, 0.1, 0.2
#: A centre that moved more than this fraction of its trust region's half-width is reported
#: at its starting place (see `posterior_table`). On a simulated 512 x 384 scene, 15 of 231
#: droplets ended there; keeping their start cut the position RMSE from 0.40 to 0.28 px.
PINNED_SHIFT = 0.8
#: Largest starting logit-scale of a composition (the encoder's scales, converted by the delta
#: method, reach 5 near 0 or 1; sampling that wide paints random colours and swamps the ELBO).
MAX_COMP_LOGIT_SCALE = 0.5
#: The guide's scales start at this fraction of the encoder's. The encoder's are amortized
#: predictive scales, wide enough for any image it may see; the posterior of one image
#: under the full likelihood is an order of magnitude tighter, and sampling at the encoder's
#: width made the first hundred steps paint blurred droplets (the fitted noise doubled and
#: centres drifted) before Adam had shrunk them.
INIT_SCALE_FACTOR = 0.1


def _anchor(x, y, log_r) -> dict:
    r = np.exp(log_r)
    return {"x": x, "y": y, "log_r": log_r,
            "pos_width": np.maximum(TRUST_PX, TRUST_RADII * r),
            "log_r_width": np.full_like(log_r, TRUST_LOG_RADIUS)}


def input_trust(anchor: dict, scale: float) -> dict:
    """`anchor` with its centres' trust floor at TRUST_PX *input* px (TRUST_PX / scale work
    px). On a copy enlarged 4x, a floor of 1 work px (a quarter input px) pinned a fifth of
    the slide's droplets after 100 steps; reported at their starts, the reconstruction error
    rose from 0.0249 to 0.0262 (right half of the slide at 4x), against 0.0241 with this."""
    if scale >= 1.0:
        return anchor
    return {**anchor, "pos_width": jnp.maximum(anchor["pos_width"], TRUST_PX / scale)}


def _start_values(x, y, x_std, y_std, log_r, log_r_scale, comp, comp_scale, logit) -> tuple[dict, dict]:
    """(anchor, guide parameter start values), each array with a leading axis of 1 (the crop)."""
    comp = np.clip(comp, 1e-3, 1 - 1e-3)
    comp_loc = np.clip(np.log(comp) - np.log1p(-comp), -COMP_LOGIT_LIMIT, COMP_LOGIT_LIMIT)
    comp_logit_scale = np.clip(comp_scale / (comp * (1 - comp)), MIN_INIT_SCALE["composition"] / INIT_SCALE_FACTOR,
                               MAX_COMP_LOGIT_SCALE)
    anchor = _anchor(x, y, log_r)
    values = {
        "q_logit": np.where(logit <= ABSENT_LOGIT, ABSENT_LOGIT, np.clip(logit, *INIT_LOGIT_RANGE)),
        "x_shift": np.zeros_like(x), "y_shift": np.zeros_like(y), "log_radius_shift": np.zeros_like(log_r),
        "x_scale": np.clip(INIT_SCALE_FACTOR * x_std, MIN_INIT_SCALE["offset"], 0.5 * anchor["pos_width"]),
        "y_scale": np.clip(INIT_SCALE_FACTOR * y_std, MIN_INIT_SCALE["offset"], 0.5 * anchor["pos_width"]),
        "log_radius_scale": np.clip(INIT_SCALE_FACTOR * log_r_scale, MIN_INIT_SCALE["log_radius"],
                                    TRUST_LOG_RADIUS),
        "comp_loc": comp_loc, "comp_scale": INIT_SCALE_FACTOR * comp_logit_scale,
    }

    def batch(d):
        return {k: jnp.asarray(np.asarray(v, np.float32)[None]) for k, v in d.items()}

    return batch(anchor), batch(values)


def prior_start(n_slots: int, shape: tuple[int, int], scene, n_types: int, seed: int = 0) -> tuple[dict, dict]:
    """Anchors and guide start values as in the original notebooks: a fixed number of slots
    at random places with random radii and compositions drawn from the prior, and a trust
    region as wide as the image (nothing is known yet). Presence starts undecided (logit 0).
    Used by `amortize bench refine` as the baseline start."""
    h, w = shape
    rng = np.random.default_rng(seed)
    mean, sd = scene.log_radius_prior
    log_r = np.clip(rng.normal(mean, sd, n_slots), math.log(scene.radius_min), math.log(scene.radius_max))
    anchor, values = _start_values(
        rng.uniform(-0.5, w - 0.5, n_slots), rng.uniform(-0.5, h - 0.5, n_slots),
        np.full(n_slots, 1.0), np.full(n_slots, 1.0), log_r, np.full(n_slots, 0.3),
        rng.uniform(0.05, 0.95, (n_slots, n_types)), np.full((n_slots, n_types), 0.1),
        np.zeros(n_slots),
    )
    anchor["pos_width"] = jnp.full_like(anchor["pos_width"], float(max(h, w)))
    anchor["log_r_width"] = jnp.full_like(anchor["log_r_width"], math.log(scene.radius_max / scene.radius_min))
    return anchor, values


def slots_from_encoder(predictor: Predictor, work: np.ndarray, min_presence: float,
                       spare: float) -> tuple[dict, dict, Background]:
    """Anchors and guide start values for every encoder peak with presence >=
    `min_presence`, plus spare (absent) slots, and the background fitted to the encoder's
    background map."""
    shape = tuple(work.shape[:2])
    raw, stats = predictor.reading(work)
    k, stride = predictor.n_types, predictor.run.encoder.stride
    reported, n_found = _slot_census(raw, stats, jnp.float32(min_presence), n_types=k, stride=stride)
    n_slots = min(slot_count(int(int(n_found) * (1 + spare)) + SLOT_BUCKET // 16), reported.size)
    slots = jax.device_get(_candidates(raw, stats, reported, n_types=k, stride=stride, shape=shape,
                                       n_slots=n_slots))
    # What predict reports (a peak's presence summed over its 3 x 3 cells) starts confident:
    # a relaxed draw leaves out a slot of presence p with probability 1 - p, and at the
    # encoder's peak values a fifth of the real droplets went missing from each draw, which
    # doubled the fitted noise before SVI could raise them.
    detected = np.asarray(reported[0]).reshape(-1)[slots["index"][0]]
    logit = np.where(jax.nn.sigmoid(slots["logit"]) >= min_presence, slots["logit"], ABSENT_LOGIT)
    logit = np.where(detected[None], np.maximum(logit, DETECTED_LOGIT), logit)
    anchor, values = _start_values(
        slots["x"][0], slots["y"][0], slots["x_std"][0], slots["y_std"][0],
        slots["log_radius"][0], slots["log_radius_scale"][0], slots["composition"][0],
        slots["composition_scale"][0], logit[0],
    )
    return anchor, values, predictor.background(work)


# The two steps of `slots_from_encoder` that work on the cell grid, each jitted as one
# program: op by op, a fresh process traced and loaded about a hundred small programs
# (1.6 s on the slide at 4x).
@stored_jit(static_argnames=("n_types", "stride"))
def _slot_census(raw, stats, min_presence, *, n_types, stride):
    """(cells predict reports (1, Hc, Wc), how many cells become slots)."""
    out = decode_outputs(raw[None], stats[None], n_types, stride)
    p = jax.nn.sigmoid(out.logit)
    peak = p >= jax.lax.reduce_window(p, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), "SAME")
    # Predict also reports confident cells that are not 3 x 3 peaks; they are slots too.
    reported = cell_droplets(jax.tree_util.tree_map(lambda a: a[0], out), DEFAULT_THRESHOLD)["detected"][None]
    return reported, jnp.sum((peak & (p >= min_presence)) | reported)


@stored_jit(static_argnames=("n_types", "stride", "shape", "n_slots"))
def _candidates(raw, stats, reported, *, n_types, stride, shape, n_slots):
    return candidate_slots(decode_outputs(raw[None], stats[None], n_types, stride), n_slots, shape,
                           include=reported)


def check_start_table(table: dict, n_types: int) -> None:
    """Raise BadArgument unless `table` has predict's columns, finite centres and radii > 0."""
    need = ["x", "y", "radius"] + [f"comp_{k}" for k in range(n_types)]
    missing = [c for c in need if c not in table]
    if missing:
        raise BadArgument("start_table", f"missing column(s) {', '.join(missing)}")
    n = len(table["x"])
    if any(len(table[c]) != n for c in need):
        raise BadArgument("start_table", "columns of different lengths")
    if n and not (np.all(np.isfinite(table["x"])) and np.all(np.isfinite(table["y"]))
                  and np.all(np.asarray(table["radius"]) > 0)):
        raise BadArgument("start_table", "centres must be finite and radii > 0")


def slots_from_table(table: dict[str, np.ndarray], n_types: int, spare: float) -> tuple[dict, dict]:
    """Anchors and guide start values for the droplets of a table (work-scale px), plus
    spare slots."""
    check_start_table(table, n_types)
    n = len(table["x"])
    size = slot_count(int(n * (1 + spare)) + SLOT_BUCKET // 16)

    def col(name, fill):
        v = np.full(size, fill, np.float32)
        if name in table and n:
            v[:n] = table[name]
        return v

    radius = col("radius", 3.0)
    comp = np.full((size, n_types), 0.5, np.float32)
    for k in range(n_types):
        comp[:n, k] = table[f"comp_{k}"]
    presence = np.clip(col("presence", 0.0), 1e-6, 1 - 1e-6)
    logit = np.where(np.arange(size) < n, np.log(presence) - np.log1p(-presence), ABSENT_LOGIT)
    return _start_values(
        col("x", 0.0), col("y", 0.0), col("x_std", 0.3), col("y_std", 0.3),
        np.log(radius), col("radius_std", 0.1 * 3.0) / radius, comp,
        np.full((size, n_types), 0.1, np.float32), logit,
    )


# ---------------------------------------------------------------------------------------
# Model and guide


def refine_model(images, anchor, start, background, optics, **kwargs):
    """`wake.wake_model` for one image with `optics` as the decoder (the other arguments
    are the guide's).

    Everything that belongs to the image is an argument, not a closure, so one compiled
    SVI step serves every image of a shape (see `solver`).
    """
    del anchor, start, background
    wake_model(images, optics_init=optics, **kwargs)


def locations(params: dict, anchor: dict) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Guide means of x, y and log r (1, N): each slot's anchor plus its bounded shift."""
    x = anchor["x"] + anchor["pos_width"] * jnp.tanh(params["x_shift"])
    y = anchor["y"] + anchor["pos_width"] * jnp.tanh(params["y_shift"])
    log_r = anchor["log_r"] + anchor["log_r_width"] * jnp.tanh(params["log_radius_shift"])
    return x, y, log_r


def refine_guide(images, anchor, start: dict, background: Background, optics, *, n_crops, n_slots,
                 scene, encoder, render_config, wake):
    """Mean-field guide with one set of variational parameters per slot (see module notes).

    Same sites and families as `wake.wake_guide`. Locations are the slots' anchors plus
    bounded shifts (the trust region); `start` and `background` give the starting values.
    """
    del optics, n_crops, n_slots, render_config  # the model's
    b, h, w, c = images.shape
    h, w = h * wake.pool, w * wake.pool  # the rendering's size (`wake.wake_model`)
    reach = _reach(encoder)
    lo, hi = math.log(scene.radius_min), math.log(scene.radius_max)
    pos = dist.constraints.positive
    params = {name: numpyro.param(name, start[name]) for name in
              ("q_logit", "x_shift", "y_shift", "log_radius_shift", "comp_loc")}
    for name in ("x_scale", "y_scale", "log_radius_scale", "comp_scale"):
        params[name] = numpyro.param(name, start[name], constraint=pos)
    x_loc, y_loc, r_loc = locations(params, anchor)
    # Means stay inside the model's support: spare slots can sit on the encoder's padding
    # cells past the image, and a truncated normal centred outside its support has no
    # finite density there.
    x_loc = jnp.clip(x_loc, -0.5 - reach + 0.1, w - 0.5 + reach - 0.1)
    y_loc = jnp.clip(y_loc, -0.5 - reach + 0.1, h - 0.5 + reach - 0.1)
    colour = numpyro.param(
        "colour_value",
        jnp.clip(background.colour, scene.background_min + BACKGROUND_EPS,
                 scene.background_max - BACKGROUND_EPS)[None],
        constraint=dist.constraints.interval(scene.background_min, scene.background_max),
    )
    illumination = numpyro.param("illumination_value", background.illumination[None])
    knots = tuple(wake.field_knots)
    if knots != (0, 0):
        start_field = jnp.zeros((c,) + knots) if background.field is None else background.field
        field = numpyro.param("field_value", start_field[None])
    temp = wake.temperature
    q_logit = params["q_logit"]
    with numpyro.plate("crops", 1):
        with handlers.mask(mask=False):  # the relaxed draw only renders (wake module notes)
            numpyro.sample("presence_logit", dist.Logistic(q_logit / temp, 1.0 / temp).to_event(1))
        numpyro.sample("presence_q", dist.Delta(q_logit).to_event(1))
        numpyro.sample("x", dist.TruncatedNormal(x_loc, params["x_scale"], low=-0.5 - reach,
                                                 high=w - 0.5 + reach).to_event(1))
        numpyro.sample("y", dist.TruncatedNormal(y_loc, params["y_scale"], low=-0.5 - reach,
                                                 high=h - 0.5 + reach).to_event(1))
        numpyro.sample("log_radius", dist.TruncatedNormal(
            jnp.clip(r_loc, lo, hi), params["log_radius_scale"], low=lo, high=hi).to_event(1))
        numpyro.sample("composition", dist.TransformedDistribution(
            dist.Normal(params["comp_loc"], params["comp_scale"]), dist.transforms.SigmoidTransform()
        ).to_event(2))
        numpyro.sample("background_colour", dist.Delta(colour).to_event(1))
        numpyro.sample("illumination", dist.Delta(illumination).to_event(2))
        if knots != (0, 0):
            numpyro.sample("background_field", dist.Delta(field).to_event(3))


def field_knots(shape: tuple[int, int], spacing: float) -> tuple[int, int]:
    """Knots (Gy, Gx) of the background correction on an (H, W) input image, at most
    `spacing` px apart (both ends on the image's edge pixels)."""
    return tuple(1 + max(1, math.ceil((n - 1) / spacing)) for n in shape)


def fitted_background(params: dict) -> Background:
    """The background of the guide's parameters (one image, no crop axis)."""
    field = params.get("field_value")
    return Background(params["colour_value"][0], params["illumination_value"][0],
                      None if field is None else field[0])


def posterior_droplets(params: dict, anchor: dict, threshold: float = 0.5) -> Droplets:
    """Posterior-mean droplets (one image, no crop axis); presence 1 where >= threshold."""
    x, y, log_r = locations(params, anchor)
    presence = (jax.nn.sigmoid(params["q_logit"][0]) >= threshold).astype(jnp.float32)
    return Droplets(x[0], y[0], jnp.exp(log_r[0]), jax.nn.sigmoid(params["comp_loc"][0]), presence)


def pin_centres(params: dict) -> dict:
    """`params` with every centre pinned at the edge of its trust region put back at its
    start. Such a centre is a misfit the model could not resolve (typically a droplet half
    hidden by a larger one, or next to one nobody found), not a refinement."""
    pinned = jnp.maximum(jnp.abs(jnp.tanh(params["x_shift"])), jnp.abs(jnp.tanh(params["y_shift"]))) > PINNED_SHIFT
    return {**params, "x_shift": jnp.where(pinned, 0.0, params["x_shift"]),
            "y_shift": jnp.where(pinned, 0.0, params["y_shift"])}


def posterior_table(params: dict, anchor: dict, shape: tuple[int, int], threshold: float,
                    scale: float = 1.0) -> dict:
    """The droplet table (predict's columns) of slots with presence >= threshold centred in
    the (H, W) work image, mapped to input px by `scale`."""
    p = {k: np.array(v) for k, v in jax.device_get(pin_centres(params)).items()}
    x, y, log_r = (np.asarray(a[0]) for a in jax.device_get(locations(p, anchor)))
    h, w = shape
    presence = np.asarray(jax.nn.sigmoid(p["q_logit"][0]))
    keep = (presence >= threshold) & (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)
    radius = np.exp(log_r)
    comp = 1 / (1 + np.exp(-np.asarray(p["comp_loc"][0])))
    table = {
        "x": input_px(x[keep], scale), "y": input_px(y[keep], scale), "radius": radius[keep] * scale,
        "presence": presence[keep],
    }
    for k in range(comp.shape[-1]):
        table[f"comp_{k}"] = comp[keep, k]
    table["x_std"] = np.asarray(p["x_scale"][0])[keep] * scale
    table["y_std"] = np.asarray(p["y_scale"][0])[keep] * scale
    table["radius_std"] = radius[keep] * np.asarray(p["log_radius_scale"][0])[keep] * scale
    order = np.lexsort((table["x"], table["y"]))
    return {k: np.asarray(v, np.float32)[order] for k, v in table.items()}


# ---------------------------------------------------------------------------------------
# Birth proposals


#: Blob scales (px, Gaussian sigma) searched in the residual; a disc of radius r matches
#: sigma ~ r / 1.5.
BIRTH_SIGMAS = (1.0, 1.6, 2.5, 4.0, 6.5, 10.0, 16.0)


@functools.partial(jax.jit, static_argnames=("n",))
def residual_blobs(residual: jnp.ndarray, n: int) -> tuple[jnp.ndarray, ...]:
    """The `n` strongest blobs of the squared residual (H, W, C): (x, y, sigma, strength).

    Scale selection as in LoG blob detection, on the residual energy: at each scale, the
    mean energy in a Gaussian window minus that of a window twice as wide (a difference of
    Gaussians, so a uniform misfit gives nothing), and each pixel keeps its best scale.
    Peaks are 5 x 5 local maxima. Strength is relative to the median energy.
    """
    energy = jnp.sum(residual**2, axis=-1)
    median = jnp.median(energy) + 1e-12
    blurred = [fixed_gaussian_blur(energy, s) for s in BIRTH_SIGMAS]
    wide = [fixed_gaussian_blur(energy, 2 * s) for s in BIRTH_SIGMAS]
    response = jnp.stack([a - b for a, b in zip(blurred, wide)])  # (S, H, W)
    best = jnp.argmax(response, axis=0)
    strength = jnp.take_along_axis(jnp.stack(blurred), best[None], 0)[0] / median
    score = jnp.max(response, axis=0)
    peak = score >= jax.lax.reduce_window(score, -jnp.inf, jax.lax.max, (5, 5), (1, 1), "SAME")
    ranked = jnp.where(peak & (score > 0), strength, 0.0)
    top, idx = jax.lax.top_k(ranked.reshape(-1), n)
    h, w = score.shape
    return (idx % w).astype(jnp.float32), (idx // w).astype(jnp.float32), \
        jnp.asarray(BIRTH_SIGMAS)[best.reshape(-1)[idx]], top


def propose_births(params: dict, anchor: dict, image: np.ndarray, recon: np.ndarray,
                   config: RefineConfig, radius_range: tuple[float, float]) -> tuple[dict, dict, int]:
    """Move dead slots (presence < 1 %) onto unexplained residual blobs.

    Returns the new parameters, the new anchors and how many slots were placed.
    """
    p = {k: np.array(v) for k, v in jax.device_get(params).items()}
    a = {k: np.array(v) for k, v in jax.device_get(anchor).items()}
    presence = 1 / (1 + np.exp(-p["q_logit"][0]))
    dead = np.flatnonzero(presence < 0.01)
    if dead.size == 0:
        return params, anchor, 0
    bx, by, bs, strength = (np.asarray(v) for v in residual_blobs(jnp.asarray(image - recon), int(min(dead.size, 256))))
    ok = strength >= config.birth_snr
    # A blob inside a present droplet is that droplet's misfit (or a droplet hidden in it
    # that the image cannot pin down), not a new droplet.
    x, y, log_r = (np.asarray(v[0]) for v in jax.device_get(locations(params, anchor)))
    live = presence >= config.threshold
    if live.any():
        d = np.hypot(bx[:, None] - x[live][None], by[:, None] - y[live][None])
        ok &= ~np.any(d <= np.exp(log_r[live])[None], axis=1)
    bx, by, bs = bx[ok], by[ok], bs[ok]
    k = bx.size
    if k == 0:
        return params, anchor, 0
    slots = dead[:k]
    log_r = np.log(np.clip(1.5 * bs, *radius_range))
    born = _anchor(bx, by, log_r)
    born["pos_width"] = np.maximum(born["pos_width"], 0.5 * np.exp(log_r))  # a rough guess
    born["log_r_width"][:] = 0.5
    for name, v in born.items():
        a[name][0, slots] = v
    p["q_logit"][0, slots] = BIRTH_LOGIT
    for name in ("x_shift", "y_shift", "log_radius_shift", "comp_loc"):
        p[name][0, slots] = 0.0
    p["x_scale"][0, slots] = p["y_scale"][0, slots] = 0.5
    p["log_radius_scale"][0, slots] = 0.1
    p["comp_scale"][0, slots] = MAX_COMP_LOGIT_SCALE

    def back(d):
        return {name: jnp.asarray(v) for name, v in d.items()}

    return back(p), back(a), k


# ---------------------------------------------------------------------------------------
# SVI


class OrderedTraceELBO(ELBO):
    """numpyro's `Trace_ELBO` estimator (one guide draw, the model replayed on it), with the
    sites summed in the traces' own order.

    `Trace_ELBO` sums its per-site terms over a Python set of site names, whose order follows
    the per-process string hash. The traced SVI step then differed from process to process,
    JAX's persistent compilation cache never matched it, and every `amortize refine` paid
    for compiling its step again (5.5 s of a 28 s run on the real slide at 380 x 338 px).
    """

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        model_key, guide_key = jax.random.split(rng_key)
        guide_log_q, guide_trace = log_density(handlers.seed(guide, guide_key), args, kwargs, param_map)
        model = handlers.replay(handlers.seed(model, model_key), guide_trace)
        model_log_p, _ = log_density(model, args, kwargs, param_map)
        return {"loss": guide_log_q - model_log_p, "mutable_state": None}


def svi_render(render_config: RenderConfig, config: RefineConfig, scale: float) -> RenderConfig:
    """The renderer settings of SVI's model at `scale`: soft overlaps at scales >= 1 only
    (see `RefineConfig.overlap_softness`)."""
    return dataclasses.replace(render_config, overlap_softness=config.overlap_softness if scale >= 1 else 0.0)


def loss_capacity(n: int) -> int:
    """Length of the loss buffer of a run of n steps: a power of two, at least 32, so that
    the usual runs (chunks of 25, fit checks every 5 or 10 steps, a remainder) share one."""
    return max(32, 1 << (max(n, 1) - 1).bit_length())


class StepRunner:
    """`runner(state, args, n)`: n SVI steps as one compiled program whose step count is an
    argument, not part of the program, so that runs of different lengths (a round's
    remainder, the averaged chunk, fit checks every few steps) do not each compile one (7 to
    10 s apiece on the tests' tiny scenes, more on real ones). Returns (state, the n losses,
    the guide's parameters averaged over the n steps); the losses as a NumPy array.

    `setup` names everything `svi` was built from (`solver`'s arguments): the compiled run
    is kept in the program store under it (`amortize.program_store`)."""

    def __init__(self, svi: SVI, setup):
        self.svi = svi
        self.compiled = stored_jit(self._run, key=setup, static_argnames="capacity")

    def _run(self, state, args, n, *, capacity):
        svi = self.svi

        def body(i, carry):
            s, total, losses = carry
            s, loss = svi.stable_update(s, *args)
            total = jax.tree_util.tree_map(jnp.add, total, svi.get_params(s))
            return s, total, losses.at[i].set(loss)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, svi.get_params(state))
        losses = jnp.full(capacity, jnp.nan, jnp.float32)
        state, total, losses = jax.lax.fori_loop(0, n, body, (state, zeros, losses))
        return state, losses, jax.tree_util.tree_map(lambda t: t / n, total)

    def __call__(self, state, args, n: int):
        state, losses, averaged = self.compiled(state, args, np.int32(n), capacity=loss_capacity(n))
        return state, np.asarray(losses)[:n], averaged


@functools.lru_cache(maxsize=8)
def solver(n_slots: int, scene, encoder, render_config, wake: WakeConfig, freeze_optics: bool,
            learning_rate: float, shape_rate: float = 1.0):
    """(SVI, its jitted init, a `StepRunner`) for one static set-up, cached: later images of
    the same shape and slot count reuse the compiled functions. The learning rates live in
    the optimiser's state (`refine_optimizer`), so set-ups that differ only in them share one
    compiled step through the compilation cache."""
    # Hidden from SVI, the optics param keeps its initial value: the decoder passed in.
    model = handlers.block(refine_model, hide=["optics"]) if freeze_optics else refine_model
    svi = SVI(model, refine_guide, refine_optimizer(learning_rate, shape_rate), OrderedTraceELBO(), n_crops=1,
              n_slots=n_slots, scene=scene, encoder=encoder, render_config=render_config, wake=wake)
    # `SVI.init` traces the model and guide; eagerly, op by op through the renderer, that took
    # longer than the SVI steps themselves (16 s on a 380 x 338 image).
    setup = (n_slots, scene, encoder, render_config, wake, freeze_optics, learning_rate, shape_rate)
    return svi, jax.jit(svi.init), StepRunner(svi, setup)


def reported_fit(params: dict, anchor: dict, images: jnp.ndarray, optics: dict, *,
                 render_config: RenderConfig, wake: WakeConfig, threshold: float) -> jnp.ndarray:
    """RMSE between the image and the model's mean image of the droplets refinement would
    report now: posterior medians, presence >= threshold, pinned centres at their start
    (`pin_centres`), on the likelihood's own grid (`wake.model_mean`)."""
    _, h, w, _ = images.shape
    droplets = posterior_droplets(pin_centres(params), anchor, threshold)
    bg = fitted_background(params)
    mean = model_mean(droplets, params.get("optics", optics), bg, (h * wake.pool, w * wake.pool),
                      render_config, wake, params.get("blur_sigma"))
    return jnp.sqrt(jnp.mean((mean - images[0]) ** 2))


_reported_fit = stored_jit(reported_fit, static_argnames=("render_config", "wake", "threshold"))


def sample_points(pool: int, samples: int) -> int:
    """Points per image pixel side at which SVI renders a copy enlarged `pool` times: the
    largest divisor of `pool` that is at most `samples`.

    Two per side on the slide at 4x (predict's table, 2 704 droplets): the box average of
    2 x 2 points is 0.0015 RMS from that of all 4 x 4 work pixels, the reconstruction error
    0.03491 against 0.03483, and a step's gradient 0.31 s instead of 1.24 s. One point
    per pixel is 0.0056 RMS away (0.03559)."""
    return max(d for d in range(1, min(pool, samples) + 1) if pool % d == 0)


def exact_enlargement(shape: tuple[int, int], work_shape: tuple[int, int]) -> int:
    """k if the working image is the input enlarged exactly k >= 2 times, else 1."""
    k = work_shape[0] // shape[0]
    return k if k >= 2 and tuple(work_shape) == (k * shape[0], k * shape[1]) else 1


def svi_wake(config: RefineConfig, shape: tuple[int, int], work_shape: tuple[int, int]) -> WakeConfig:
    """The likelihood's settings for SVI on an (H, W) input image worked at `work_shape`."""
    h, w = work_shape
    pool = exact_enlargement(shape, work_shape)
    fitted = config.field == "always" or (config.field == "enlarged" and pool > 1)
    return WakeConfig(crop=(max(h, 32), max(w, 32)), batch_size=1, temperature=config.temperature,
                      border=0, blur_max=config.blur_max, pool=pool, samples=sample_points(pool, config.samples),
                      field_knots=field_knots(shape, config.field_spacing) if fitted else (0, 0))


def svi_rates(config: RefineConfig, pool: int) -> tuple[float, float]:
    """(Adam's step size, the radius and composition shifts' factor on it) for SVI on a copy
    enlarged `pool` times (1: not enlarged)."""
    if pool > 1:
        return config.enlarged_learning_rate, config.enlarged_shape_rate
    return config.learning_rate, 1.0


def refine(
    image: np.ndarray,
    predictor: Predictor,
    *,
    config: RefineConfig = RefineConfig(),
    scale: float | str | None = None,
    device: str = "auto",
    start_table: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> RefineResult:
    """Refine one image's droplets by SVI from the encoder's answer.

    Args:
        image: (H, W, 3) float in [0, 1] (grey (H, W) is expanded).
        predictor: the trained encoder (its decoder's optics and prior are the model's).
        config: steps, learning rate, rounds, convergence test and the rest.
        scale: input px per encoder px, as in `Predictor.predict`, or "auto" for the scale
            `predict --scale auto` chooses (`amortize.autoscale`); its answer there is
            the start, not predicted again.
        device: cpu, gpu or auto.
        start_table: start from this table (input px) instead of the encoder's cells, e.g.
            to refine an edited answer; the background still comes from the encoder.
        seed: of the ELBO's Monte Carlo draws.
        progress: show a progress bar with the current loss.
    """
    image = check_image(image)
    dev = pick_device(device)
    t0 = time.perf_counter()
    choice = None
    if scale == AUTO:
        choice = choose_scale(predictor, image)
        scale = choice.scale
    scale = 1.0 if scale is None else float(scale)
    if not (scale > 0 and np.isfinite(scale)):
        raise BadArgument("--scale", f"must be a positive number, got {scale}")
    work = resize(image, scale)
    h, w = work.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise BadArgument("image", f"{w}x{h} px at scale {scale:g} is smaller than {MIN_SIDE} px")
    run = predictor.run
    scene, enc, render_config = run.simulation.scene, run.encoder, run.simulation.render
    from_encoder = start_table is None
    if from_encoder:
        start_table = choice.table if choice else predictor.predict(image, DEFAULT_THRESHOLD, scale)
    else:
        check_start_table(start_table, predictor.n_types)
    with _placed_on(dev):
        anchor, values, background = slots_from_encoder(predictor, work, config.min_presence, config.spare)
        if not from_encoder:
            anchor, values = slots_from_table(_work_table(start_table, scale, (h, w), _reach(enc)),
                                              predictor.n_types, config.spare)
        anchor = input_trust(anchor, scale)
        optics = jax.tree_util.tree_map(jnp.asarray, predictor.optics)
        # What `Predictor.reconstruct` draws (same background fit, optics and resizing),
        # without encoding the image once more.
        if from_encoder and choice and choice.recon is not None:
            recon_before = choice.recon
        else:
            recon_before = _render_table_input(start_table, background, optics, None, image, (h, w), scale,
                                               render_config, predictor.n_types)
        rmse_before = rmse(image, recon_before)
        # On a copy enlarged k times the likelihood is scored on the image's own pixels (the
        # rendering averaged over k x k blocks, as `recon_rmse` measures it), not on
        # interpolated ones that are not data. Right half of the slide at 4x, 50 steps:
        # 0.0254 scored on the interpolated copy, 0.0249 on the image's pixels.
        wake = svi_wake(config, image.shape[:2], (h, w))
        pool = wake.pool
        n_slots, model_render, rates = anchor["x"].shape[1], svi_render(render_config, config, scale), \
            svi_rates(config, pool)
        svi, svi_init, run_chunk = solver(n_slots, scene, enc, model_render, wake, config.freeze_optics, *rates)
        coarse = (solver(n_slots, scene, enc, model_render, dataclasses.replace(wake, samples=1),
                         config.freeze_optics, *rates)
                  if config.coarse_steps and wake.samples > 1 else None)
        coarse_taken = 0
        images = jnp.asarray(image if pool > 1 else work)[None]
        key = jax.random.PRNGKey(seed)
        # The pixel noise starts at the encoder's reconstruction error.
        start_noise = {"log_noise": jnp.log(jnp.float32(max(rmse_before, 1e-3)))}
        state = _on_device(svi_init(key, images, anchor, values, background, optics,
                                    init_params=start_noise), dev)

        losses: list[np.ndarray] = []
        fits: list[float] = []
        births, stopped_by, answer_step = 0, None, 0
        watch_fit = config.fit_stop == "always" or (config.fit_stop == "enlarged" and pool > 1)
        bar = tqdm(total=config.steps, desc="refine", unit="step", disable=None if progress else True, leave=False)
        for r in range(config.rounds):
            done = sum(len(v) for v in losses)
            if done >= config.steps:
                break
            if r > 0:
                params = svi.get_params(state)
                recon = _render_params(params, anchor, optics if config.freeze_optics else params["optics"],
                                       (h, w), render_config, config.threshold)
                params, anchor, placed = propose_births(params, anchor, work, recon, config,
                                                        (scene.radius_min, scene.radius_max))
                anchor = input_trust(anchor, scale)
                births += placed
                if placed == 0:
                    break
                key, sub = jax.random.split(key)
                state = _on_device(svi_init(sub, images, anchor, values, background, optics,
                                            init_params=params), dev)
            # Steps a round leaves unused pass on to the next ones.
            budget = (config.steps - done) // (config.rounds - r)
            args = _on_device((images, anchor, values, background, optics), dev)
            if r == 0 and coarse is not None and budget > 1:
                coarse_taken = min(config.coarse_steps, budget // 2)
                state = _coarse_phase(coarse, svi, state, args, coarse_taken, losses, bar)
                done, budget = done + coarse_taken, budget - coarse_taken

            def fit(s, args=args):
                return _reported_fit(svi.get_params(s), args[1], args[0], args[4], render_config=render_config,
                                     wake=wake, threshold=config.threshold)

            state, stopped_by, at, averaged = _svi_round(run_chunk, state, args, budget, config, losses, fits,
                                                         bar, fit if watch_fit else None)
            answer_step = done + at
        bar.close()
        params = jax.device_get(svi.get_params(state) if averaged is None else averaged)
        final_optics = optics if config.freeze_optics else params["optics"]
        table = posterior_table(params, anchor, (h, w), config.threshold, scale)
        bg = fitted_background(params)
        recon_after = _render_table_input(table, bg, final_optics, params.get("blur_sigma"), image,
                                          (h, w), scale, render_config, predictor.n_types)
    all_losses = np.concatenate(losses) if losses else np.zeros(0)
    return RefineResult(
        table=table, start_table=start_table, recon_before=recon_before, recon_after=recon_after,
        recon_rmse_before=rmse_before, recon_rmse_after=rmse(image, recon_after),
        losses=all_losses, steps=int(all_losses.size), converged=stopped_by is not None,
        stopped_by=stopped_by, answer_step=answer_step, fits=np.asarray(fits), births=births,
        coarse_steps=coarse_taken,
        wall_s=time.perf_counter() - t0, device=f"{dev.platform}:{dev.id}", scale=scale,
        scale_search=dict(choice.tried) if choice else {}, params=params, anchor=jax.device_get(anchor),
    )


def _placed_on(dev: jax.Device):
    """A context that places new arrays on `dev`, or none when `dev` is where they go anyway.
    Under `jax.default_device` every jitted function traces again (the default device is
    part of its trace's key), so the programs the scale search had just traced at the same
    sizes, the background fit and the final reconstruction at the work scale, were traced
    and lowered a second time: about 1.5 s of the stand-in frame's run."""
    if jax.config.jax_default_device is None and dev == jax.devices()[0]:
        return contextlib.nullcontext()
    return jax.default_device(dev)


def _on_device(tree, dev: jax.Device):
    """Every array of `tree` committed to `dev`. A jitted function compiles once per mix of
    committed and uncommitted arguments: the SVI step's outputs are committed when any input
    is (a learned decoder's optics are), the initial state was not, and the step compiled
    twice per image (6 s more on the slide at 4x)."""
    return jax.device_put(tree, dev)


#: Presence logits learn this many times faster than the rest: Adam moves each parameter by
#: about the learning rate per step, and a birth or a death is a change of several logits.
PRESENCE_LR_FACTOR = 2.0


#: With `freeze_optics=False`, the optics MLP's weights learn this many times slower: at the
#: full rate its look changed faster than the droplets could follow, and centres moved to
#: fit the new look (simulated scene: median position error 0.15 -> 0.8 px).
OPTICS_LR_FACTOR = 0.05


#: The guide parameters with a rate of their own (`refine_optimizer`); the rest learn at the
#: base rate.
RATE_GROUPS = {"q_logit": "presence", "log_radius_shift": "radius", "comp_loc": "composition",
               "optics": "optics"}


def refine_optimizer(lr: float, shape_rate: float = 1.0):
    """Adam, with presence logits and optics weights at their own rates (see above), and
    radius and composition shifts `shape_rate` times faster than the rest
    (`RefineConfig.enlarged_shape_rate`)."""
    rates = {"presence": lr * PRESENCE_LR_FACTOR, "radius": lr * shape_rate, "composition": lr * shape_rate,
             "optics": lr * OPTICS_LR_FACTOR, "rest": lr}

    def labels(params):
        return {k: RATE_GROUPS.get(k, "rest") for k in params}

    def label_tree(params):
        names = labels(params)
        return {k: jax.tree_util.tree_map(lambda _: names[k], v) for k, v in params.items()}

    # Rates as optimiser state (`inject_hyperparams`), not constants of the compiled step;
    # each group's arrays as one flat vector (`optax.flatten`, as in training).
    tx = optax.multi_transform({name: _flat(optax.inject_hyperparams(optax.adam)(learning_rate=rate))
                                for name, rate in rates.items()}, label_tree)
    return numpyro.optim.optax_to_numpyro(tx)


def _flat(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on its parameters raveled into one vector (`optax.flatten`), or as it is when a
    group has none (frozen optics), which `optax.flatten` cannot ravel."""
    flat = optax.flatten(inner)

    def pick(tree):
        return flat if jax.tree_util.tree_leaves(tree) else inner

    return optax.GradientTransformation(lambda params: pick(params).init(params),
                                        lambda updates, state, params=None: pick(updates).update(updates, state, params))


def _svi_round(run_chunk, state, args, budget, config, losses, fits, bar, fit=None):
    """SVI steps until `budget` is spent or a convergence test fires.

    Returns (state, stopped_by, at, averaged): the final state, or with a `fit` (state ->
    RMSE of the reported droplets, checked every `fit_every` steps and appended to `fits`)
    the state that fit best; "loss", "fit" or None (budget spent); the round's steps at that
    state; and without a `fit`, the guide's parameters averaged over the last chunk (None
    with one). When the loss test stops a round without a `fit`, one more chunk runs (within
    the budget) and its average is the answer: Adam's iterates jitter around the optimum,
    and their mean sits closer to it (Polyak-Ruppert averaging; 10 validation scenes,
    seed 555: position RMSE 0.1380 px from the last iterate, 0.1366 from the mean of 25).
    Relative-change tests:
    - loss, over windows of `chunk` steps: `patience` windows in a row have not lowered the
      best window-mean loss by more than `tol` of it. (A single-draw ELBO of a whole image
      is noisy, a few per cent from step to step, so it is compared through window means
      and a patience.)
    - fit (only with `fit`), every `fit_every` steps: `fit_patience` checks in a row have
      not lowered the best fit by more than `fit_tol` of it.
    """
    unit = config.fit_every if fit is not None else config.chunk
    best, stale = None, 0
    best_fit, fit_stale, answer, at, averaged = None, 0, state, 0, None
    used, window = 0, []

    def advance(state, n):
        state, unit_losses, chunk_params = run_chunk(state, args, n)
        losses.append(unit_losses)
        bar.update(n)
        return state, unit_losses, chunk_params

    while used < budget:
        n = min(unit, budget - used)
        state, unit_losses, chunk_params = advance(state, n)
        window.append(unit_losses)
        used += n
        if fit is None:
            answer, at, averaged = state, used, chunk_params
        else:
            err = float(fit(state))
            fits.append(err)
            if best_fit is None or err <= best_fit:
                answer, at = state, used
            if best_fit is None or err < best_fit * (1 - config.fit_tol):
                best_fit, fit_stale = err, 0
            else:
                best_fit, fit_stale = min(best_fit, err), fit_stale + 1
                if n == unit and fit_stale >= config.fit_patience:
                    return answer, "fit", at, None
        complete = sum(map(len, window)) >= config.chunk
        if complete or n < unit or used >= budget:
            mean, window = _finite_mean(np.concatenate(window)), []
            bar.set_postfix(loss=f"{mean:.5g}", **({"fit": f"{fits[-1]:.4g}"} if fits else {}))
        if n < unit:
            break
        if not complete:
            continue
        if best is None or mean < best - config.tol * abs(best):
            best, stale = mean, 0
        else:
            stale += 1
            if stale >= config.patience:
                if fit is None and used < budget:  # the averaged chunk
                    n = min(config.chunk, budget - used)
                    answer, _, averaged = advance(answer, n)
                    at = used + n
                return answer, "loss", at, averaged
    return answer, None, at, averaged


def _coarse_phase(coarse, svi: SVI, state, args, n: int, losses: list, bar):
    """The state after n SVI steps by the `coarse` solver (one point per image pixel) from
    `state`. Its set-up differs from `svi`'s only in the likelihood's grid: the guide, its
    parameters and their constraints are the same, so the state carries over to `svi`, and
    so does the map to constrained values that `SVI.init` left on `svi` (`constrain_fn`).
    Shared, it spares the coarse solver an `init` of its own (a trace of the whole model)."""
    coarse_svi, _, run_coarse = coarse
    coarse_svi.constrain_fn = svi.constrain_fn
    state, coarse_losses, _ = run_coarse(state, args, n)
    losses.append(coarse_losses)
    bar.update(n)
    return state


def _finite_mean(losses: np.ndarray) -> float:
    """Mean of the finite losses; an error when none is (SVI diverged).
    `stable_update` skips a step whose loss is not finite but still returns it."""
    finite = np.isfinite(losses)
    if not finite.any():
        raise AmortizeError("refine", f"the loss was not finite for {losses.size} steps in a row "
                                      "(SVI diverged; try a lower --lr)")
    return float(np.mean(losses[finite]))


def _work_table(table: dict, scale: float, shape: tuple[int, int], reach: float) -> dict:
    """An input-px table in work-scale px, without droplets centred beyond the model's
    support (the image plus `reach`), which no slot can represent."""
    h, w = shape
    out = to_work_table(table, scale)
    inside = ((out["x"] > -0.5 - reach) & (out["x"] < w - 0.5 + reach)
              & (out["y"] > -0.5 - reach) & (out["y"] < h - 0.5 + reach))
    return {k: np.asarray(v)[inside] for k, v in out.items()}


def _render_params(params, anchor, optics, shape, render_config, threshold) -> np.ndarray:
    recon = np.asarray(_render_droplets(params, anchor, optics, shape=tuple(shape), render_config=render_config,
                                        threshold=threshold))
    return _blurred(recon, params.get("blur_sigma"))


@stored_jit(static_argnames=("shape", "render_config", "threshold"))
def _render_droplets(params, anchor, optics, *, shape, render_config, threshold):
    """The guide's posterior-mean droplets over its background, unblurred (one program; op by
    op the renderer compiled some sixty)."""
    droplets = posterior_droplets(params, anchor, threshold)
    return jax.nn.sigmoid(render_logits(droplets, optics, fitted_background(params), shape, render_config))


def _render_table_input(table, background, optics, blur, image, work_shape, scale, render_config,
                        n_types) -> np.ndarray:
    """Render an input-px table at the work scale with the fitted blur, brought back to the
    image's exact size."""
    recon = render_table(to_work_table(table, scale), background, optics, work_shape, render_config, n_types)
    return resize_to(_blurred(recon, blur), image.shape[:2])


_gaussian_blur = jax.jit(gaussian_blur, static_argnums=2)


def _blurred(image: np.ndarray, sigma) -> np.ndarray:
    """The model's blur (`blur_sigma`, px) applied to a rendering, as in `wake_model`.

    Jitted, with a support of at least 6 sigma (as wide as `wake_model`'s for the default
    blur_max) rather than BLUR_MAX_PX's: run op by op with the widest support it took 1.8 s
    on the slide at 4x (2 M px), a tenth of a 50-step refinement."""
    if sigma is None:
        return image
    support = max(1, math.ceil(2 * float(sigma)))
    return np.asarray(_gaussian_blur(jnp.asarray(image), jnp.float32(sigma), support))


# ---------------------------------------------------------------------------------------
# Files


def refine_files(
    inputs,
    out_dir,
    predictor: Predictor,
    config: RefineConfig = RefineConfig(),
    scale: float | str | None = AUTO,
    device: str = "auto",
    force: bool = False,
    progress: bool = True,
    report=print,
    max_pixels: int | None = None,
):
    """Refine every image and write its outputs; returns what was done
    (`amortize.outputs.FilesRun`).

    `scale` is input px per encoder px, or "auto" (the default, as in `predict_files`) to
    refine at the scale `predict --scale auto` chooses. On a copy enlarged 4x, SVI renders
    2 x 2 points per image pixel (`RefineConfig.samples`), 4x as many as at scale 1.

    Per image: `<stem>.csv` (predict's columns: posterior centre means, radius and
    composition medians, and standard deviations),
    `<stem>.recon.png`, `<stem>.residual.png` (0.5 + image - reconstruction),
    `<stem>.loss.png` and `<stem>.json` (recon_rmse before and after, steps, convergence,
    wall time, device, and predict's summary of the refined table). Outputs, bad inputs,
    reruns and interruptions behave as in `predict_files`.
    """
    from amortize import io
    from amortize.errors import AmortizeError, BadInput
    from amortize.outputs import (
        FilesRun, OutputSet, StopRequests, check_out_dir, input_identity, plan, remove_if_empty, staged,
    )
    from amortize.plots import line_plot
    from amortize.predict import collect_images, summary
    from amortize.progress import report_above

    out = pathlib.Path(out_dir)
    existed = check_out_dir(out)
    pick_device(device)  # a bad --device fails before any work
    run = FilesRun()
    report = report_above(report)
    if existed and io.remove_stale_temps(out):
        report(f"note: {out}: removed temporary files of an interrupted run")
    files, errors = collect_images(inputs)
    for err in errors:
        run.errors.append(err)
        report(f"error: {err}")
    kinds = ["csv", "recon.png", "residual.png", "loss.png", "json"]
    settings = {"command": "refine", "checkpoint": predictor.source, "checkpoint_step": predictor.step,
                "scale": scale,
                "config": dataclasses.asdict(config)}
    seen: dict[str, pathlib.Path] = {}
    with StopRequests(notify=report) as stop:
        for path in files:
            if stop.requested:
                break
            try:
                outputs = OutputSet(out, path.stem, kinds, {**settings, **input_identity(path)})
                if not plan(path, outputs, seen, force, report):
                    run.skipped += 1
                    continue
                image = io.read_image(path, max_pixels or io.DEFAULT_MAX_PIXELS,
                                      warn=lambda line: report(f"warning: {line}"))
                try:
                    result = refine(image, predictor, config=config, scale=scale, device=device,
                                    progress=progress)
                except BadArgument as err:
                    if err.subject == "image":
                        raise BadInput(path, err.reason) from None
                    raise
                meta = summary(result.table, image.shape[:2], predictor.n_types)
                meta.update(result.summary())
                meta.update({"image": str(path), "checkpoint": predictor.source,
                             "checkpoint_step": predictor.step, "scale": result.scale,
                             "config": dataclasses.asdict(config)})
                if scale == AUTO:
                    meta["scale_search"] = {f"{k:g}": round(e, 6) for k, e in result.scale_search.items()}
                with staged(outputs):
                    outputs.stage("csv", io.table_to_csv(result.table).encode())
                    outputs.stage("recon.png", io.png_bytes(result.recon_after))
                    outputs.stage("residual.png", io.png_bytes(np.clip(0.5 + image - result.recon_after, 0, 1)))
                    outputs.stage("loss.png", io.png_bytes(line_plot(result.losses, f"{path.stem}: negative ELBO")))
                    outputs.stage_json(meta)
                    outputs.commit()
                run.done += 1
            except AmortizeError as err:
                run.errors.append(err)
                report(f"error: {err}")
        run.stopped = stop.requested
    remove_if_empty(out, existed)
    return run
