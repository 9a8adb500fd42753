"""Adapting a trained model to a folder of real, unlabeled images by wake-sleep.

    amortize train --config train/adapt_droplets.toml --data DIR --workdir W [--init MODEL]

The encoder starts from a simulation-trained model (`--init`, by default the shipped one):
reconstruction-only training from scratch gets stuck, so the warm start is the design. Then
`adapt.cycles` times:

1. *wake*, `adapt.wake_steps` steps: the ELBO of `amortize.wake` on random augmented crops of
   the corpus; the encoder (guide) and the decoder (optics MLP, pixel noise) learn together.
2. *refit*: the scene prior is refitted to what the encoder now finds on a fixed set of
   corpus crops (`amortize.prior_fit`).
3. *sleep*, `adapt.sleep_steps` steps: the simulation objective of `amortize.train`, on scenes
   drawn from the refitted prior and rendered by the *current* decoder, so that synthetic
   scenes come to look like the user's.

Then, `adapt.decoder_fit_steps` steps: the optics alone are fitted to the final encoder's
point estimates on corpus crops (`amortize.decoder_fit`), since the wake ELBO leaves them
fitted to its sampled, blurred answers rather than to the means a reconstruction renders.

The workdir is laid out as for simulation training and resumes the same way. Every checkpoint
holds {step, params (encoder), decoder, wake_opt, sleep_opt, decoder_opt}, and its config
records the prior in force, so a resumed run continues with the prior it had.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sys
import time
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from amortize import checkpoint
from amortize.config import (
    BadRecipe, SceneConfig, SimulationConfig, _check, check_types, config_from_file, from_saved, to_dict,
)
from amortize.corpus import Corpus, sample_crops
from amortize.decoder_fit import fit_targets, make_fit_step
from amortize.detect import DEFAULT_THRESHOLD, cell_droplets, to_droplet_table
from amortize.encoder import EncoderConfig, encode
from amortize.errors import BadInput
from amortize.optics import default_optics_params, is_anchored, with_shading_blur
from amortize.prior_fit import prior_summary, refit_scene
from amortize.train import (
    RunConfig, TrainConfig, finite_metrics, make_train_step, prepare_workdir, resume_or_close,
)
from amortize.reconstruct import reconstruct_cells
from amortize.wake import WakeConfig, elbo_parts, fit_background, interior_mask
from amortize.writers import TensorboardWriter, Writer


#: `AdaptConfig.optics_start` values.
OPTICS_STARTS = ("model", "anchored")


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """The wake-sleep schedule and its optimisers.

    Attributes:
        cycles: wake-refit-sleep cycles.
        wake_steps, sleep_steps: steps of each phase per cycle (sleep may be 0).
        encoder_learning_rate: Adam step of the encoder in the wake phase. 0, with no sleep
            steps, freezes the encoder: only the decoder adapts, so detection stays exactly
            that of the `--init` model, whose composition read-out then stays valid and is
            kept.
        decoder_learning_rate: Adam step of the optics and noise (they start from a generic
            droplet and have further to go).
        sleep_learning_rate: Adam step of the encoder in the sleep phase.
        sleep_end_fraction: the sleep step falls along a cosine, over the sleep steps of all
            cycles, to this fraction of `sleep_learning_rate` (1: constant). An encoder
            fine-tuned at a constant step ends as noisy as that step; a smaller last step
            lets it settle.
        grad_clip: global norm clip of every update.
        anchor_fraction: share of sleep steps drawn from the recipe's own prior and the
            starting optics instead of the refitted ones, so that adapting to one corpus
            does not unlearn the scenes the model was trained on.
        anchor_look_fraction: share of the anchor scenes drawn with one of the `--init`
            model's other looks rather than its own optics (`amortize adapt` only; `train
            --data` refuses it); None: the share it was trained with. 1 leaves its own look
            out of the anchor steps: on adapting to a look close to it (the broad model's
            built-in bright-field droplet and the real slide), its un-jittered shading
            pulled the encoder's centres of the slide's droplets 0.3-0.4 px low.
        refit_crops: corpus crops the prior is refitted on.
        decoder_fit_steps: full-batch Adam steps of the final optics fit (0: none).
        decoder_fit_crops: corpus crops (of the wake crop size) the optics are fitted on.
        decoder_fit_learning_rate: its Adam step.
        threshold: presence at which the refit counts a detection.
        optics_start: the decoder's starting optics: "model", the `--init` model's; or
            "anchored", anchored optics (`amortize.optics`), whose latent x, y and r stay
            the droplet's centre and radius whatever the optics learn: the `--init`
            model's when they are anchored already, else the built-in droplet in the
            anchored geometry. The anchor steps simulate with the starting optics.
        edge_blur_start: with anchored optics, the edge blur (px, the sd of the point
            spread) the decoder starts from; 0 keeps the starting optics' own. The anchor
            steps keep the starting optics' blur. A blur far below the microscope's lets the
            wake settle on discs drawn too large with edges too sharp, a pair the encoder
            then learns.
        shading_blur: with anchored optics, let the decoder's point-spread blur the droplets'
            shading as well as their edge (`optics.shading_keep`), so that small droplets,
            which a blur as wide as themselves leaves evenly dark, are drawn so.
        keep_readout: keep the `--init` model's composition read-out even though the
            encoder learns (it reads the droplet's own pixels, so it suits an encoder that
            was fine-tuned rather than retrained).
        seed: crops, augmentations and simulated scenes derive from it and the step.
        checkpoint_every, log_every, preview_every: as for simulation training.
    """

    cycles: int = 4
    wake_steps: int = 100
    sleep_steps: int = 50
    encoder_learning_rate: float = 1e-4
    decoder_learning_rate: float = 2e-3
    sleep_learning_rate: float = 1e-4
    sleep_end_fraction: float = 1.0
    grad_clip: float = 1.0
    anchor_fraction: float = 0.5
    anchor_look_fraction: float | None = None
    refit_crops: int = 32
    decoder_fit_steps: int = 0
    decoder_fit_crops: int = 16
    decoder_fit_learning_rate: float = 3e-3
    threshold: float = DEFAULT_THRESHOLD
    optics_start: str = "model"
    edge_blur_start: float = 0.0
    shading_blur: bool = False
    keep_readout: bool = False
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    preview_every: int = 50

    def __post_init__(self) -> None:
        _check(self.cycles >= 1, "cycles", "must be >= 1")
        _check(self.wake_steps >= 1, "wake_steps", "must be >= 1")
        _check(self.sleep_steps >= 0, "sleep_steps", "must be >= 0")
        _check(self.encoder_learning_rate >= 0, "encoder_learning_rate", "must be >= 0")
        for name in ("decoder_learning_rate", "sleep_learning_rate", "grad_clip"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        _check(0 < self.sleep_end_fraction <= 1, "sleep_end_fraction", "must be in (0, 1]")
        _check(0 <= self.anchor_fraction < 1, "anchor_fraction", "must be in [0, 1)")
        _check(self.anchor_look_fraction is None or 0 <= self.anchor_look_fraction <= 1, "anchor_look_fraction",
               "must be in [0, 1]")
        _check(self.refit_crops >= 1, "refit_crops", "must be >= 1")
        _check(self.decoder_fit_steps >= 0, "decoder_fit_steps", "must be >= 0")
        _check(self.decoder_fit_crops >= 1, "decoder_fit_crops", "must be >= 1")
        _check(self.decoder_fit_learning_rate > 0, "decoder_fit_learning_rate", "must be > 0")
        _check(0 < self.threshold < 1, "threshold", "must be in (0, 1)")
        _check(self.optics_start in OPTICS_STARTS, "optics_start", f"must be one of {', '.join(OPTICS_STARTS)}")
        _check(self.edge_blur_start >= 0, "edge_blur_start", "must be >= 0 (0: the starting optics' own)")
        _check(self.seed >= 0, "seed", "must be >= 0")
        for name in ("checkpoint_every", "log_every", "preview_every"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")

    @classmethod
    def tiny(cls) -> "AdaptConfig":
        return cls(cycles=1, wake_steps=2, sleep_steps=2, refit_crops=2, decoder_fit_steps=2,
                   decoder_fit_crops=2, checkpoint_every=2, log_every=1, preview_every=2)

    @property
    def encoder_frozen(self) -> bool:
        return self.encoder_learning_rate == 0 and self.sleep_steps == 0

    @property
    def steps(self) -> int:
        return self.cycles * (self.wake_steps + self.sleep_steps) + self.decoder_fit_steps

    def phase(self, step: int) -> tuple[str, int, int]:
        """(phase, cycle, step within the phase) of global step index `step`; the phase is
        "wake", "sleep" (refitted prior, current decoder), "anchor" (the recipe's prior) or,
        after the last cycle, "decoder" (the final optics fit)."""
        cycle, within = divmod(step, self.wake_steps + self.sleep_steps)
        if cycle >= self.cycles:
            return "decoder", self.cycles, step - self.cycles * (self.wake_steps + self.sleep_steps)
        if within < self.wake_steps:
            return "wake", cycle, within
        within -= self.wake_steps
        f = self.anchor_fraction
        anchor = math.floor((within + 1) * f) > math.floor(within * f)
        return ("anchor" if anchor else "sleep"), cycle, within


@dataclasses.dataclass(frozen=True)
class AdaptRun:
    """An adaptation recipe, with the encoder's architecture taken from the `--init` model.

    `simulation` is the starting prior of the sleep phases; `train` sets their crops and
    batch size (its steps and learning-rate schedule are unused).
    """

    encoder: EncoderConfig
    simulation: SimulationConfig = dataclasses.field(default_factory=SimulationConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    wake: WakeConfig = dataclasses.field(default_factory=WakeConfig)
    adapt: AdaptConfig = dataclasses.field(default_factory=AdaptConfig)

    def __post_init__(self) -> None:
        RunConfig(self.simulation, self.encoder, self.train)  # the same consistency checks

    def sleep_run(self, scene: SceneConfig) -> RunConfig:
        return RunConfig(dataclasses.replace(self.simulation, scene=scene), self.encoder, self.train)


def load_adapt_recipe(path: str | pathlib.Path, encoder: EncoderConfig,
                      simulation: SimulationConfig | None = None) -> AdaptRun:
    """Parse an adaptation recipe ([simulation.*], [train], [wake], [adapt]; all optional).

    A recipe without [simulation] tables takes `simulation` (the `--init` model's), so that
    the adapted model keeps the prior and rendering settings it was trained with.

    Every field's type and range is checked here, before any workdir exists: a bad one is a
    `amortize.config.BadRecipe` (a `BadArgument` and a `BadInput`) naming the file, table and
    field.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise BadInput(path, "recipe not found" if not path.exists() else "recipe must be a file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BadInput(path, f"not valid TOML ({err})") from None
    if "encoder" in data:
        raise BadRecipe(path, "an adaptation recipe takes its [encoder] from --init; remove the table")
    if "simulation" not in data and simulation is not None:
        data["simulation"] = to_dict(simulation)
    return config_from_file(AdaptRun, {**data, "encoder": to_dict(encoder)}, path)


# ---------------------------------------------------------------------------------------
# Steps


def wake_kwargs(run: AdaptRun, scene: SceneConfig, n_crops: int, optics_init: dict) -> dict:
    """The static keyword arguments of `wake_model` and `wake_guide`."""
    return dict(
        n_crops=n_crops, n_slots=run.wake.n_slots(scene, run.encoder), scene=scene,
        encoder=run.encoder, render_config=run.simulation.render, wake=run.wake,
        optics_init=optics_init,
    )


def wake_optimizer(cfg: AdaptConfig):
    """Adam on {"encoder", "decoder"} with their own step sizes, after a global clip; each
    part's Adam on one flat vector, as in `amortize.train.make_optimizer`."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.multi_transform(
            {"encoder": optax.flatten(optax.adam(cfg.encoder_learning_rate)),
             "decoder": optax.flatten(optax.adam(cfg.decoder_learning_rate))},
            {"encoder": "encoder", "decoder": "decoder"},
        ),
    )


def sleep_optimizer(cfg: AdaptConfig):
    """The encoder's optimiser in sleep and anchor steps: one state over all cycles, so that
    its step count (and the step size's cosine, `sleep_end_fraction`) runs across them."""
    rate = cfg.sleep_learning_rate
    if cfg.sleep_end_fraction < 1 and cfg.sleep_steps > 0:
        rate = optax.cosine_decay_schedule(rate, cfg.cycles * cfg.sleep_steps, alpha=cfg.sleep_end_fraction)
    return optax.flatten(optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(rate)))


def make_wake_step(run: AdaptRun, kwargs: dict):
    """Jitted (state, key, crops) -> (state, metrics): one ELBO step on encoder and decoder.

    The loss is the negative ELBO per observed value of the whole corpus, a constant rescaling
    that keeps gradient norms and learning rates independent of the corpus size.
    """
    tx = wake_optimizer(run.adapt)
    h, w = run.wake.crop
    n_obs = kwargs["n_crops"] * float(interior_mask((h, w), run.wake.border).sum()) * run.encoder.channels

    # Without a wake step size the encoder gets no gradient, so none is computed for it.
    frozen = run.adapt.encoder_learning_rate == 0

    def loss_fn(trainable, key, crops):
        encoder = trainable["encoder"]["params"]
        encoder = jax.lax.stop_gradient(encoder) if frozen else encoder
        params = {"encoder$params": encoder, **trainable["decoder"]}
        parts = elbo_parts(params, key, crops, **kwargs)
        return -parts["elbo"] / n_obs, parts

    @jax.jit
    def step(state, key, crops):
        trainable = {"encoder": state["params"], "decoder": state["decoder"]}
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, key, crops)
        updates, wake_opt = tx.update(grads, state["wake_opt"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, **{k: v / n_obs for k, v in parts.items() if k != "recon_rmse"},
                   "recon_rmse": parts["recon_rmse"], "noise": jnp.exp(trainable["decoder"]["log_noise"]),
                   "grad_norm_encoder": optax.tree.norm(grads["encoder"]),
                   "grad_norm_decoder": optax.tree.norm(grads["decoder"])}
        new = {**state, "step": state["step"] + 1, "params": trainable["encoder"],
               "decoder": trainable["decoder"], "wake_opt": wake_opt}
        return new, metrics

    return step


def make_sleep_step(run: AdaptRun, scene: SceneConfig, optics: dict):
    """Jitted (state, key) -> (state, metrics): one simulation step from the given prior."""
    inner = make_train_step(run.sleep_run(scene), optics, tx=sleep_optimizer(run.adapt))

    @jax.jit
    def step(state, key):
        sub = {"step": state["step"], "params": state["params"], "opt_state": state["sleep_opt"]}
        sub, metrics = inner(sub, key)
        return {**state, "step": sub["step"], "params": sub["params"], "sleep_opt": sub["opt_state"]}, metrics

    return step


# ---------------------------------------------------------------------------------------
# Refit


@functools.lru_cache(maxsize=4)
def _sweep_batch(encoder: EncoderConfig, shape: tuple[int, int], threshold: float):
    """One compiled encode-detect-fit pass per setting, reused by every refit of a run."""

    @jax.jit
    def one_batch(p, x):
        out = encode(p, encoder, x)
        cells = jax.vmap(lambda o: cell_droplets(o, threshold))(out)
        return cells, fit_background(out, shape)

    return one_batch


def sweep(params: dict, encoder: EncoderConfig, crops: np.ndarray, threshold: float, batch: int):
    """Detections and fitted backgrounds of the encoder over `crops` (n, H, W, C)."""
    shape = tuple(crops.shape[1:3])
    one_batch = _sweep_batch(encoder, shape, float(threshold))
    radii, comps, colours, illum = [], [], [], []
    for start in range(0, len(crops), batch):
        chunk = crops[start : start + batch]
        pad = batch - len(chunk)
        x = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        cells, background = jax.device_get(one_batch(params, jnp.asarray(x)))
        for i in range(len(chunk)):
            table = to_droplet_table(jax.tree_util.tree_map(lambda a: a[i], cells), shape)
            radii.append(table["radius"])
            comps.append(np.stack([table[f"comp_{k}"] for k in range(encoder.n_types)], -1))
            colours.append(background.colour[i])
            illum.append(background.illumination[i])
    return {
        "radii": np.concatenate(radii), "compositions": np.concatenate(comps),
        "area_px": float(len(crops) * shape[0] * shape[1]),
        "background_colours": np.stack(colours), "illumination": np.stack(illum),
    }


# ---------------------------------------------------------------------------------------
# The loop


def _decoder_fit_step(run: AdaptRun, corpus: Corpus, state: dict, config: dict):
    """(state) -> (state, metrics): one step of the final optics fit. Its targets are the
    frozen encoder's answers on a fixed set of crops, the same again after a resume."""
    from amortize.predict import Predictor  # predict imports the training modules

    cfg = run.adapt
    predictor = Predictor(checkpoint.model_of_state(state), config, int(state["step"]))
    crops = sample_crops(corpus, np.random.default_rng([cfg.seed, 3]), cfg.decoder_fit_crops,
                         run.wake.crop, run.wake.augmentation)
    targets = fit_targets(predictor, crops, run.wake.border)
    if targets.n_droplets == 0:
        # The rendering does not depend on the optics then; the fit leaves them as they are.
        tqdm.write("warning: the encoder found no droplets in the final optics fit's crops; "
                   "the optics stay as the wake phase left them", file=sys.stderr)
    _, fit = make_fit_step(targets, run.simulation.render, cfg.decoder_fit_learning_rate)

    def step(state):
        optics, opt_state, rmse = fit(state["decoder"]["optics"], state["decoder_opt"])
        new = {**state, "step": state["step"] + 1, "decoder": {**state["decoder"], "optics": optics},
               "decoder_opt": opt_state}
        return new, {"loss": rmse**2, "recon_rmse": rmse}

    return step


def _checkpoint_config(resolved: dict, scene: SceneConfig) -> dict:
    """The recipe with the prior currently in force (what a resumed run or export needs)."""
    return {**resolved, "simulation": {**resolved["simulation"], "scene": to_dict(scene)}}


def _preview(crop: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Input | reconstruction | residual (0.5 + difference), side by side."""
    residual = np.clip(0.5 + (crop - recon), 0.0, 1.0)
    gap = np.ones((crop.shape[0], 4, 3), np.float32)
    return np.concatenate([crop, gap, recon, gap, residual], axis=1)


def adapt(
    run: AdaptRun,
    corpus: Corpus,
    workdir: str | pathlib.Path,
    init_params: dict,
    init_optics: dict,
    writer: Writer | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    init_readout: dict | None = None,
    anchor_optics: dict | None = None,
    anchor_train: TrainConfig | None = None,
    cycle_end=None,
) -> dict:
    """Wake-sleep adaptation (or its resumption) in `workdir`; returns the last metrics.

    Args:
        run: the recipe.
        corpus: the real images.
        workdir: config, checkpoints and logs; an existing run there is resumed.
        init_params: encoder variables to start from (ignored when resuming).
        init_optics: decoder optics to start from, unless the recipe starts from anchored
            optics; the anchor steps keep simulating with the starting optics (pass the same
            optics when resuming).
        writer: metric writer (default: tensorboardX under `workdir/logs`).
        progress: show a progress bar.
        stop_after: stop (with a checkpoint) after this many steps in this call (tests).
        init_readout: the `--init` model's composition read-out; the adapted model keeps it
            when the recipe freezes the encoder, as it was fitted to that encoder's answers,
            and when `keep_readout` is set.
        anchor_optics, anchor_train: the optics and the [train] settings (looks, jitter) of
            the anchor steps, by default the starting optics and the recipe's [train]: a
            model trained on a family of looks keeps seeing that family.
        cycle_end: called as cycle_end(cycle, state, config) after each cycle's last step,
            before that step's checkpoint, with the checkpoint's config (the prior in force).
    """
    workdir = pathlib.Path(workdir)
    check_types(run)  # a recipe built in code: nothing is created before it is checked
    cfg = run.adapt
    if cfg.optics_start == "anchored" and not is_anchored(init_optics):
        scene0 = run.simulation.scene
        init_optics = default_optics_params(scene0.n_types, scene0.channels, anchored=True)
    decoder_optics = init_optics
    if cfg.edge_blur_start > 0:
        if not is_anchored(init_optics):
            raise BadInput("[adapt] edge_blur_start", "needs anchored optics (optics_start = \"anchored\")")
        decoder_optics = {**init_optics, "edge": {**init_optics["edge"],
                                                  "log_blur": jnp.log(jnp.float32(cfg.edge_blur_start))}}
    if cfg.shading_blur:
        if not is_anchored(init_optics):
            raise BadInput("[adapt] shading_blur", "needs anchored optics (optics_start = \"anchored\")")
        decoder_optics = with_shading_blur(decoder_optics)
    resolved = prepare_workdir(workdir, run)
    own_writer = writer is None
    writer = TensorboardWriter(workdir / "logs") if own_writer else writer
    mgr = checkpoint.manager(workdir / checkpoint.CHECKPOINT_SUBDIR)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": init_params,
        "decoder": {"optics": decoder_optics, "log_noise": jnp.log(jnp.float32(run.wake.noise_init))},
    }
    state["wake_opt"] = wake_optimizer(cfg).init({"encoder": state["params"], "decoder": state["decoder"]})
    state["sleep_opt"] = sleep_optimizer(cfg).init(state["params"])
    state["decoder_opt"] = optax.adam(cfg.decoder_fit_learning_rate).init(decoder_optics)
    if (cfg.encoder_frozen or cfg.keep_readout) and init_readout is not None:
        state["readout"] = init_readout
    state, saved = resume_or_close(mgr, state, workdir, writer if own_writer else None)
    scene = run.simulation.scene if saved is None else from_saved(SceneConfig, saved["simulation"]["scene"])
    start = int(state["step"])
    n_crops = corpus.n_crops(run.wake.crop)
    root = jax.random.PRNGKey(cfg.seed)
    wake_key, sleep_key = jax.random.fold_in(root, 4), jax.random.fold_in(root, 5)
    refit_set = sample_crops(corpus, np.random.default_rng([cfg.seed, 1]), cfg.refit_crops, run.wake.crop,
                             run.wake.augmentation)
    preview_crop = refit_set[0]
    compiled: dict = {}
    anchors: dict = {}  # the anchor step never changes: compile it once
    metrics_np: dict[str, float] = {}
    unlogged: dict[str, dict[str, float]] = {}
    bar = tqdm(total=cfg.steps, initial=start, desc="adapt", unit="step", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    done_here = 0
    try:
        for step in range(start, cfg.steps):
            phase, cycle, within = cfg.phase(step)
            if phase in ("sleep", "anchor") and within == 0:
                found = sweep(state["params"], run.encoder, refit_set, cfg.threshold, run.wake.batch_size)
                noise = float(jnp.exp(state["decoder"]["log_noise"]))
                scene = refit_scene(scene, noise=noise, **found)
                writer.scalars({f"prior/{k}": v for k, v in prior_summary(scene).items()}, step)
                writer.histogram("prior/detected_radius", found["radii"], step)
            if compiled.get("cycle") != (cycle, phase == "wake"):  # new decoder or prior
                optics = state["decoder"]["optics"]
                compiled = {"cycle": (cycle, phase == "wake")}
                if phase == "wake":
                    compiled["wake"] = make_wake_step(run, wake_kwargs(run, scene, n_crops, optics))
                elif phase == "decoder":
                    compiled["decoder"] = _decoder_fit_step(run, corpus, state, _checkpoint_config(resolved, scene))
                else:
                    compiled["sleep"] = make_sleep_step(run, scene, optics)
                    if cfg.anchor_fraction > 0:
                        if "fn" not in anchors:
                            anchor_run = run if anchor_train is None else dataclasses.replace(run, train=anchor_train)
                            anchors["fn"] = make_sleep_step(anchor_run, run.simulation.scene,
                                                            init_optics if anchor_optics is None else anchor_optics)
                        compiled["anchor"] = anchors["fn"]
            if phase == "wake":
                crops = sample_crops(corpus, np.random.default_rng([cfg.seed, 2, step]),
                                     run.wake.batch_size, run.wake.crop, run.wake.augmentation)
                state, metrics = compiled["wake"](state, jax.random.fold_in(wake_key, step), jnp.asarray(crops))
            elif phase == "decoder":
                state, metrics = compiled["decoder"](state)
            else:
                state, metrics = compiled[phase](state, sleep_key)
            metrics_np = finite_metrics(metrics, f"step {step + 1} ({phase})", mgr, workdir)
            done = step + 1
            done_here += 1
            bar.update(1)
            unlogged[phase] = metrics_np
            if done % cfg.log_every == 0 or done == cfg.steps:
                # Every phase run since the last log: sleep and anchor steps alternate, and
                # an even log_every would otherwise only ever show one of them.
                for name, values in unlogged.items():
                    writer.scalars({f"{name}/{k}": v for k, v in values.items()}, done)
                unlogged.clear()
                writer.scalars({"adapt/steps_per_second": done_here / max(time.perf_counter() - t0, 1e-9)}, done)
                bar.set_postfix(phase=phase, loss=f"{metrics_np['loss']:.3f}", refresh=False)
            if done % cfg.preview_every == 0 or done == cfg.steps:
                recon = reconstruct_cells(state["params"], run.encoder, state["decoder"]["optics"],
                                          preview_crop, run.simulation.render, cfg.threshold)
                writer.image("wake/input_reconstruction_residual", _preview(preview_crop, recon), done)
            stopping = stop_after is not None and done_here >= stop_after
            cycle_done = done <= cfg.cycles * (cfg.wake_steps + cfg.sleep_steps) and \
                done % (cfg.wake_steps + cfg.sleep_steps) == 0
            if cycle_done and cycle_end is not None:
                cycle_end(cycle, state, _checkpoint_config(resolved, scene))
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping or cycle_done:
                checkpoint.save(mgr, done, "state", state, _checkpoint_config(resolved, scene))
            if stopping:
                break
    finally:
        bar.close()
        mgr.wait_until_finished()
        mgr.close()
        if own_writer:
            writer.close()
    metrics_np["step"] = int(state["step"])
    metrics_np["wall_seconds"] = time.perf_counter() - t0
    return metrics_np
