"""Simulation-trained encoder: scenes from the prior, rendered inside the jitted step.

One jitted function simulates a batch of scenes (prior sample, render, nuisances), encodes
them, evaluates the set likelihood and applies one optimiser update, so the input pipeline
can never starve the step: there is no pipeline. Scene keys are `fold_in(seed key, step)`,
so a resumed run sees exactly the scenes it would have seen.

A run lives in a workdir:

    config.json      the resolved config (recipe after defaults)
    checkpoints/     orbax steps holding {params, opt_state, step} and the config, plus the
                     composition read-out (`amortize.readout`) when the recipe has one:
                     fitted once the encoder's steps are done, saved one step later
    logs/            tensorboardX events: losses, gradient norm, learning rate,
                     preview images with predicted circles, radius histograms
"""

from __future__ import annotations

import dataclasses
import functools
import json
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

from amortize import checkpoint, io
from amortize.config import SimulationConfig, _check, check_types, config_from_file, from_saved, to_dict
from amortize.detect import DEFAULT_THRESHOLD, cell_droplets, to_droplet_table
from amortize.droplets import to_table
from amortize.encoder import EncoderConfig, encode, init_encoder
from amortize.errors import AmortizeError, BadArgument, BadInput
from amortize.looks import LOOKS, look_params
from amortize.losses import batch_set_loss
from amortize.optics import (
    channels_of, default_optics_params, is_anchored, with_edge_blur_scaled, with_shading_shifted,
)
from amortize.overlay import draw_overlay
from amortize.readout import ReadoutConfig, fit_readout, init_readout, simulated_examples
from amortize.simulate import simulate_scene
from amortize.writers import TensorboardWriter, Writer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        crop: (H, W) of the simulated training scenes, multiples of 32.
        batch_size: scenes per step.
        steps: total optimiser steps.
        learning_rate: peak learning rate (AdamW, linear warm-up then cosine decay).
        warmup_steps: linear warm-up length.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: global gradient-norm clip.
        optics_jitter: each scene's droplet contrast is scaled by exp(U(-j, j)), so that the
            encoder does not lock onto one exact droplet appearance.
        blur_jitter: with anchored optics, each scene's edge blur is scaled by exp(U(-j, j)),
            so that the encoder reads a droplet's radius where its edge crosses half its
            contrast, however soft the edge is.
        shading_jitter: with anchored optics, each scene's droplet shading is moved by up to
            j radii in a random direction (`optics.with_shading_shifted`), so that the
            encoder reads a droplet's centre from its edge, not from where it is darkest.
        looks: other droplet appearances (`amortize.looks.LOOKS`: ring, disc, glow) mixed
            into the simulated scenes, so that the encoder also finds droplets that look
            nothing like the decoder's.
        look_fraction: share of the scenes drawn with one of `looks` (uniformly) instead of
            the decoder's optics.
        init: a model (folder) whose encoder weights start the training instead of random
            ones: a fine-tuning recipe. Its architecture must be the recipe's [encoder]; a
            relative path is taken from the directory training runs in. The composition
            read-out is fitted afresh at the end, as after any training.
        seed: root PRNG seed (scenes and initial weights).
        checkpoint_every: steps between checkpoints (a crash loses at most this many).
        log_every: steps between scalar logs.
        preview_every: steps between preview images and radius histograms.
    """

    crop: tuple[int, int] = (192, 192)
    batch_size: int = 8
    steps: int = 4000
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    optics_jitter: float = 0.2
    blur_jitter: float = 0.0
    shading_jitter: float = 0.0
    looks: tuple[str, ...] = ()
    look_fraction: float = 0.5
    init: str = ""
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 25
    preview_every: int = 500

    def __post_init__(self) -> None:
        h, w = self.crop
        _check(h % 32 == 0 and w % 32 == 0 and h > 0 and w > 0, "crop", "H and W must be positive multiples of 32")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.steps >= 1, "steps", "must be >= 1")
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.grad_clip > 0, "grad_clip", "must be > 0")
        _check(self.seed >= 0, "seed", "must be >= 0")
        for name in ("optics_jitter", "blur_jitter", "shading_jitter"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        unknown = sorted(set(self.looks) - set(LOOKS))
        _check(not unknown, "looks", f"unknown {unknown}; choose from {sorted(LOOKS)}")
        _check(0 <= self.look_fraction <= 1, "look_fraction", "must be in [0, 1]")
        for name in ("checkpoint_every", "log_every", "preview_every"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")

    @classmethod
    def tiny(cls) -> "TrainConfig":
        return cls(crop=(64, 64), batch_size=2, steps=4, warmup_steps=1, checkpoint_every=2,
                   log_every=1, preview_every=2)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole training recipe: what to simulate, which encoder, how to optimise."""

    simulation: SimulationConfig = dataclasses.field(default_factory=SimulationConfig)
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    readout: ReadoutConfig = dataclasses.field(default_factory=ReadoutConfig)

    def __post_init__(self) -> None:
        scene = self.simulation.scene
        _check(self.encoder.n_types == scene.n_types, "encoder.n_types", f"must equal simulation.scene.n_types ({scene.n_types})")
        _check(self.encoder.channels == scene.channels, "encoder.channels", f"must equal simulation.scene.channels ({scene.channels})")
        _check(self.readout.seed >= 0, "readout.seed", "must be >= 0")

    @classmethod
    def tiny(cls) -> "RunConfig":
        return cls(SimulationConfig.tiny(), EncoderConfig.tiny(), TrainConfig.tiny())


def load_recipe(path: str | pathlib.Path) -> RunConfig:
    """Parse a TOML recipe ([simulation.*], [encoder], [train], [readout] tables; all optional).

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
    return config_from_file(RunConfig, data, path)


# ---------------------------------------------------------------------------------------
# The jitted step


def _jitter_optics(key: jax.Array, optics_params: dict, cfg: TrainConfig) -> dict:
    """One scene's optics: the colour change scaled by exp(U(-j, j)) for j = optics_jitter
    (the output layer, or for anchored optics its inside-colour half: the tail is bounded by
    the core colour, which scales with it, and the edge stays); for anchored optics also the
    edge blur and the shading's position (`blur_jitter`, `shading_jitter`)."""
    k_contrast = key  # the contrast's draw as before these options, so old recipes reproduce
    k_blur, k_shift, k_angle = jax.random.split(jax.random.fold_in(key, 1), 3)
    if cfg.blur_jitter or cfg.shading_jitter:
        if not is_anchored(optics_params):
            raise BadArgument("train.blur_jitter", "blur_jitter and shading_jitter need anchored optics "
                                                   "(set them to 0, or adapt with optics_start = \"anchored\")")
        if cfg.blur_jitter:
            factor = jnp.exp(jax.random.uniform(k_blur, (), minval=-cfg.blur_jitter, maxval=cfg.blur_jitter))
            optics_params = with_edge_blur_scaled(optics_params, factor)
        if cfg.shading_jitter:
            length = cfg.shading_jitter * jax.random.uniform(k_shift, ())
            angle = jax.random.uniform(k_angle, (), maxval=2 * jnp.pi)
            optics_params = with_shading_shifted(optics_params, length * jnp.cos(angle), length * jnp.sin(angle))
    jitter = cfg.optics_jitter
    if jitter == 0:
        return optics_params
    layers = optics_params["params"]
    last = max((k for k in layers if k.startswith("Dense_")), key=lambda k: int(k[6:]))
    factor = jnp.exp(jax.random.uniform(k_contrast, (), minval=-jitter, maxval=jitter))
    if is_anchored(optics_params):
        c = channels_of(optics_params)
        factor = jnp.concatenate([jnp.full((c,), factor), jnp.ones((c,))])
    scaled = jax.tree_util.tree_map(lambda a: a * factor, layers[last])
    return {**optics_params, "params": {**layers, last: scaled}}


def _pick_look(key: jax.Array, optics_params: dict, run: RunConfig) -> dict:
    """The decoder's optics, or with probability `look_fraction` one of the recipe's looks."""
    cfg = run.train
    if not cfg.looks or cfg.look_fraction == 0:
        return optics_params
    if is_anchored(optics_params):
        raise BadArgument("train.looks", "the other looks are free optics; they cannot be mixed "
                                         "with anchored optics (set look_fraction = 0)")
    scene = run.simulation.scene
    table = [optics_params] + [look_params(n, scene.n_types, scene.channels) for n in cfg.looks]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *table)
    k_use, k_which = jax.random.split(key)
    other = 1 + jax.random.randint(k_which, (), 0, len(cfg.looks))
    index = jnp.where(jax.random.uniform(k_use) < cfg.look_fraction, other, 0)
    return jax.tree_util.tree_map(lambda a: a[index], stacked)


def simulate_batch(key: jax.Array, run: RunConfig, optics_params: dict):
    """(images (B, H, W, C), droplets, backgrounds) for one step. Jittable."""
    cfg = run.train

    def one(k):
        k_optics, k_scene = jax.random.split(k)
        k_look, k_optics = jax.random.split(k_optics)
        optics = _pick_look(k_look, optics_params, run)
        optics = _jitter_optics(k_optics, optics, cfg)
        image, droplets, background, _ = simulate_scene(k_scene, cfg.crop, run.simulation, optics)
        return image, droplets, background

    return jax.vmap(one)(jax.random.split(key, cfg.batch_size))


def make_optimizer(cfg: TrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * 0.02,
    )
    # On one flat vector (`optax.flatten`): the same arithmetic, but Adam's dozen operations
    # per array are written once instead of once for each of the encoder's 60-odd arrays, so
    # every program that updates the encoder is smaller to trace and compile (the tiny
    # training step: 4395 -> 2799 operations).
    tx = optax.flatten(optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    ))
    return tx, schedule


def init_state(run: RunConfig) -> dict:
    """Fresh training state {step, params, opt_state}: random encoder weights, or those of
    the `train.init` model."""
    key = jax.random.fold_in(jax.random.PRNGKey(run.train.seed), 1)
    params = init_encoder(key, run.encoder)
    if run.train.init:
        params = _init_weights(run.train.init, params)
    tx, _ = make_optimizer(run.train)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if run.readout.scenes > 0:
        state["readout"] = init_readout(run.readout, run.simulation.scene.channels, run.encoder.n_types)
    return state


def _init_weights(path: str, template: dict) -> dict:
    """The encoder variables of model `path`, checked against the recipe's architecture."""
    loaded, _, _ = checkpoint.load_model(path)
    encoder = {k: v for k, v in loaded.items() if k in template}
    shapes = jax.tree_util.tree_map(np.shape, template)
    if set(encoder) != set(template) or jax.tree_util.tree_map(np.shape, encoder) != shapes:
        raise BadInput(path, "[train] init: this model's encoder is not the recipe's [encoder] "
                             "architecture")
    return jax.tree_util.tree_map(jnp.asarray, encoder)


#: The part of the training state a step updates; the rest (the read-out) passes it by.
STEP_STATE = ("step", "params", "opt_state")


def make_train_step(run: RunConfig, optics_params: dict, tx=None):
    """The step: (state, data key) -> (state, metrics), jitted on `STEP_STATE` alone, so that
    recipes with and without a read-out share one compiled program.

    `tx` replaces the recipe's optimiser (the sleep phases of wake-sleep use a constant step).
    """
    schedule = None
    if tx is None:
        tx, schedule = make_optimizer(run.train)
    shape = run.train.crop

    def loss_fn(params, images, truth, background):
        out = encode(params, run.encoder, images)
        return batch_set_loss(out, truth, background, shape)

    @jax.jit
    def core_step(state, data_key):
        key = jax.random.fold_in(data_key, state["step"])
        images, truth, background = simulate_batch(key, run, optics_params)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], images, truth, background
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state["step"])
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def step(state, data_key):
        core, metrics = core_step({k: state[k] for k in STEP_STATE}, data_key)
        return {**state, **core}, metrics

    return step


# ---------------------------------------------------------------------------------------
# The loop


class NonFinite(AmortizeError):
    """Training produced NaN or inf; the last good checkpoint is kept."""


#: Parts of a training state that runs saved by earlier versions lack: the composition
#: read-out's state and the optimiser of adaptation's final optics fit.
LATER_STATE = ("readout", "decoder_opt")


def resume(mgr, state: dict, workdir: pathlib.Path) -> tuple[dict, dict | None]:
    """(state, saved config) from the workdir's newest intact checkpoint, or (state, None) if
    it has none. A newer step that cannot be read is set aside with one warning and the run
    resumes from the one before (`checkpoint.latest_intact`); BadInput if none can be read."""

    def read(step: int) -> tuple[dict, dict]:
        try:
            return checkpoint.restore(mgr, step, "state", target=state)
        except Exception as err:
            later = {k: v for k, v in state.items() if k in LATER_STATE}
            if later:
                # Perhaps a run saved before its recipe had these parts (a read-out, the final
                # optics fit): the rest as saved, the new parts fresh.
                try:
                    earlier = {k: v for k, v in state.items() if k not in LATER_STATE}
                    restored, config = checkpoint.restore(mgr, step, "state", target=earlier)
                    return {**restored, **later}, config
                except Exception:
                    pass
            raise BadInput(workdir / checkpoint.CHECKPOINT_SUBDIR / str(step),
                           f"cannot resume from this checkpoint ({checkpoint._cause(err)})") from None

    # The damaged step must leave orbax's sight: this run saves that step number again.
    found = checkpoint.latest_intact(mgr, read, set_aside_or_fail=True)
    return (state, None) if found is None else found[1]


def resume_or_close(mgr, state: dict, workdir: pathlib.Path, writer=None) -> tuple[dict, dict | None]:
    """`resume`, closing `mgr` (and `writer`, when given: one the run opened itself) if it
    fails, so that a run that cannot start leaves nothing open."""
    try:
        return resume(mgr, state, workdir)
    except BaseException:
        mgr.close()
        if writer is not None:
            writer.close()
        raise


def finite_metrics(metrics: dict, where: str, mgr, workdir: pathlib.Path) -> dict[str, float]:
    """Metrics as floats; a one-line NonFinite naming the last good checkpoint otherwise."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise NonFinite("training", f"non-finite {', '.join(bad)} at {where}; stopped, last good "
                        f"checkpoint is step {mgr.latest_step()} in {workdir}")
    return values


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
    root = jax.random.PRNGKey(seed)
    return jax.random.fold_in(root, 2), jax.random.fold_in(root, 3)  # data, preview


def make_preview(run: RunConfig, optics_params: dict, key: jax.Array):
    """A function params -> (overlay of a fixed simulated scene, true radii, predicted radii).

    The scene is simulated at the first preview, not before: a finished run started again
    never compiles the simulator for it."""

    @functools.cache
    def scene():
        image, droplets, _, _ = jax.jit(simulate_scene, static_argnums=(1, 2))(
            key, run.train.crop, run.simulation, optics_params
        )
        return image, to_table(droplets, run.train.crop)

    encode_one = jax.jit(lambda p, image: cell_droplets(
        jax.tree_util.tree_map(lambda a: a[0], encode(p, run.encoder, image[None])), DEFAULT_THRESHOLD))

    def preview(params):
        image, truth = scene()
        table = to_droplet_table(jax.device_get(encode_one(params, image)), run.train.crop)
        return draw_overlay(np.asarray(image), table), truth["radius"], table["radius"]

    return preview


def _same_run(saved: dict, resolved: dict, config_type) -> bool:
    """Whether a workdir's saved config is the recipe's run. Settings added to the code since
    it was saved take their defaults, and a run saved before recipes had a [readout] table
    takes the recipe's (the read-out is fitted after the encoder, so a finished run can gain
    one)."""
    had_readout = "readout" in saved
    try:
        saved = to_dict(from_saved(config_type, saved))
    except (BadArgument, TypeError):
        return False
    if "readout" in resolved and not had_readout:
        saved["readout"] = resolved["readout"]
    return json.loads(json.dumps(saved)) == json.loads(json.dumps(resolved))


def prepare_workdir(workdir: pathlib.Path, run: RunConfig) -> dict:
    """Create the workdir, or check that an existing one belongs to this recipe.

    Everything is checked before anything is created or written. A config.json with no
    checkpoint beside it is a run that stopped before its first checkpoint (a bad argument
    found late, a crash): there is nothing to resume, so the recipe's config replaces it
    rather than being refused as a different run.
    """
    resolved = to_dict(run)
    plain = json.loads(json.dumps(resolved))  # as config.json holds it
    config_file = workdir / "config.json"
    if workdir.exists() and not workdir.is_dir():
        raise BadArgument(workdir, "--workdir exists and is not a directory")
    if config_file.exists():
        try:
            saved = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = None
            if _holds_checkpoint(workdir):
                raise BadInput(config_file, "unreadable config.json in the workdir") from None
        if saved is not None and not _same_run(saved, resolved, type(run)) and _holds_checkpoint(workdir):
            raise BadArgument(
                workdir, "holds a run with a different config; use a new --workdir to start over"
            )
        if saved != plain:
            io.write_json(config_file, resolved, force=True)  # with the fields it lacked, or anew
    else:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BadArgument(workdir, f"cannot create the workdir ({err.strerror or err})") from None
        io.write_json(config_file, resolved, force=True)
    return resolved


def _holds_checkpoint(workdir: pathlib.Path) -> bool:
    """Whether the workdir has a finished checkpoint step (orbax names them by the step)."""
    directory = workdir / checkpoint.CHECKPOINT_SUBDIR
    return directory.is_dir() and any(p.name.isdigit() and p.is_dir() for p in directory.iterdir())


def train(
    run: RunConfig,
    workdir: str | pathlib.Path,
    writer: Writer | None = None,
    progress: bool = True,
    optics_params: dict | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train (or resume) the encoder in `workdir`; returns the final metrics.

    Args:
        run: the recipe.
        workdir: where config, checkpoints and logs go; an existing run there is resumed
            from its latest checkpoint.
        writer: metric writer (default: tensorboardX under `workdir/logs`).
        progress: show a progress bar with ETA.
        optics_params: decoder optics (default: the built-in droplet).
        stop_after: stop (with a checkpoint) after this many steps in this call; for tests
            that simulate a crash.
    """
    workdir = pathlib.Path(workdir)
    check_types(run)  # a recipe built in code: nothing is created before it is checked
    resolved = prepare_workdir(workdir, run)
    if optics_params is None:
        optics_params = default_optics_params(run.simulation.scene.n_types, run.simulation.scene.channels)
    own_writer = writer is None
    writer = TensorboardWriter(workdir / "logs") if own_writer else writer
    mgr = checkpoint.manager(workdir / checkpoint.CHECKPOINT_SUBDIR)
    cfg = run.train
    state = init_state(run)
    state, _ = resume_or_close(mgr, state, workdir, writer if own_writer else None)
    start = int(state["step"])
    step_fn = make_train_step(run, optics_params)
    data_key, preview_key = _keys(cfg.seed)
    preview = make_preview(run, optics_params, preview_key)
    metrics_np: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    done_here = 0
    stopping = False
    try:
        for step in range(start, cfg.steps):
            state, metrics = step_fn(state, data_key)
            metrics_np = finite_metrics(metrics, f"step {step + 1}", mgr, workdir)
            done = step + 1
            done_here += 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - t0
                metrics_np["scenes_per_second"] = done_here * cfg.batch_size / max(elapsed, 1e-9)
                writer.scalars({f"train/{k}": v for k, v in metrics_np.items()}, done)
                bar.set_postfix(loss=f"{metrics_np['loss']:.2f}", refresh=False)
            if done % cfg.preview_every == 0 or done == cfg.steps:
                overlay, true_r, pred_r = preview(state["params"])
                writer.image("preview/overlay", overlay, done)
                writer.histogram("radius/true", true_r, done)
                writer.histogram("radius/predicted", pred_r, done)
            stopping = stop_after is not None and done_here >= stop_after
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                checkpoint.save(mgr, done, "state", state, resolved)
            if stopping:
                break
        needs_readout = "readout" in state and not int(state["readout"]["fitted"])
        if needs_readout and not stopping and int(state["step"]) >= cfg.steps:
            state["readout"], readout_metrics = train_readout(run, state, resolved, progress)
            writer.scalars({f"readout/{k}": v for k, v in readout_metrics.items()}, cfg.steps)
            checkpoint.save(mgr, cfg.steps + 1, "state", state, resolved)
            metrics_np.update(readout_metrics)
    finally:
        bar.close()
        mgr.wait_until_finished()
        mgr.close()
        if own_writer:
            writer.close()
    metrics_np["step"] = int(state["step"])
    metrics_np["wall_seconds"] = time.perf_counter() - t0
    return metrics_np


def train_readout(run: RunConfig, state: dict, resolved: dict, progress: bool = False) -> tuple[dict, dict]:
    """Fit the composition read-out for the trained encoder in `state` (see
    `amortize.readout`); returns (read-out state, metrics)."""
    from amortize.predict import Predictor

    t0 = time.perf_counter()
    predictor = Predictor(jax.device_get(state["params"]), resolved, int(state["step"]))
    features, targets, groups = simulated_examples(predictor, run, run.readout, progress)
    params, metrics = fit_readout(features, targets, groups, run.readout)
    if metrics["droplets_fit"] == 0:
        tqdm.write("warning: the encoder found droplets in fewer than two of the read-out's "
                   "scenes; the read-out keeps the encoder's compositions", file=sys.stderr)
    metrics["readout_seconds"] = time.perf_counter() - t0
    return {**params, "fitted": jnp.ones((), jnp.int32)}, metrics


__all__ = [
    "RunConfig", "TrainConfig", "NonFinite", "load_recipe", "make_train_step", "init_state",
    "simulate_batch", "train",
]
