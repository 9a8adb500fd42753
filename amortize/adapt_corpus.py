"""`amortize adapt FOLDER --out MODEL`: make a model precise on a user's own unlabeled images.

One command, no labels and no knobs. It

1. reads the folder and **holds part of it out**: a fifth of the images (at most
   `MAX_HELDOUT_IMAGES`) when there are at least `MIN_IMAGES_TO_SPLIT`, otherwise the last
   quarter of every image along its longer side. Adaptation never sees what is held out;
2. picks the **working scale** the starting model (`--init`, by default the shipped one)
   chooses on the held-out images (`amortize.autoscale`; the median), and resamples the corpus
   to it, so that droplets of 100 px are adapted on as well as droplets of 3 px;
3. picks the **starting look** of the decoder: the built-in droplet or one of
   `amortize.looks`, whichever, briefly fitted, best renders the starting model's answers on
   the corpus;
4. runs **wake-sleep** (`amortize.adapt`, recipe `amortize/assets/adapt.toml`): the decoder
   learns the corpus's look, the prior is refitted to what the encoder finds, and the encoder
   learns on scenes drawn with that look, half of its steps on its own training family
   (anchor steps) so that it does not forget it. With the default recipe the sleep scenes
   have a hard core (`REAL_HARD_CORE`): real droplets are not centred inside one another.
   A snapshot of the encoder is kept after each cycle;
5. **chooses its stopping point** on the held-out images. Each candidate (the starting model
   and every cycle's snapshot) gives its droplets on fixed held-out crops; the decoder is
   fitted to each candidate's droplets from the same start (the last cycle's decoder), and
   the candidate scores the held-out reconstruction error that is left. The decoder is the
   same for all and fitted to each, so the score compares the droplet lists, not decoders:
   missed droplets, misplaced edges and wrong sizes leave residuals that no optics can
   explain. The winner must beat the starting model on the held-out crops by a paired
   bootstrap (`CONFIDENCE`); when it cannot, adapt says that it cannot tell whether
   detection improved and keeps the starting model's encoder.

The workdir (`--workdir`, by default `MODEL.work` beside the output) holds the wake-sleep
run, the cycle snapshots and the job's choices (`job.json`): running the same command again
resumes after a kill. The model written has the winner's encoder, a decoder fitted to its
answers on the corpus, and an `adapt.json` report of every choice and score.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from amortize import checkpoint, io
from amortize.adapt import AdaptRun, adapt, load_adapt_recipe
from amortize.autoscale import choose_scale
from amortize.corpus import Corpus, load_corpus, sample_crops
from amortize.decoder_fit import crop_rmse, fit_targets, make_fit_step
from amortize.errors import BadArgument, BadInput
from amortize.looks import LOOKS, look_params
from amortize.optics import default_optics_params
from amortize.predict import DEFAULT_CHECKPOINT, Predictor, resize
from amortize.train import TrainConfig

DEFAULT_RECIPE = pathlib.Path(__file__).parent / "assets" / "adapt.toml"
#: Fewer images than this are split inside each image instead of by image.
MIN_IMAGES_TO_SPLIT = 3
HELDOUT_FRACTION = 0.2
MAX_HELDOUT_IMAGES = 8
#: With few images: the share of each image, along its longer side, that is held out.
HELDOUT_STRIP = 0.25
#: Held-out images on which the working scale is chosen.
SCALE_IMAGES = 3
#: Fixed held-out crops every candidate is scored on, and the decoder steps fitted to each.
SCORE_CROPS = 16
SCORE_FIT_STEPS = 40
SCORE_LEARNING_RATE = 3e-3
#: Corpus crops and fit steps of the starting-look choice and of the final decoder.
LOOK_CROPS = 8
LOOK_FIT_STEPS = 15
FINAL_CROPS = 16
FINAL_FIT_STEPS = 100
#: A candidate replaces the starting model when its held-out error is lower in this share
#: of bootstrap resamples of the held-out crops.
CONFIDENCE = 0.95
BOOTSTRAP = 2000
#: Hard core of the sleep scenes with the default recipe: real droplets touch and may overlap
#: a little, but are not centred inside one another. Adapted on freely overlapping scenes,
#: the broad model added small circles on the bright spots and rim segments inside
#: condensation droplets (precision 0.75 -> 0.69 on the hand-checked window).
REAL_HARD_CORE = 0.5
JOB_FILE = "job.json"
CANDIDATES = "candidates"


def with_hard_core(run: AdaptRun, separation: float) -> AdaptRun:
    """`run` whose sleep scenes keep droplet centres at least `separation` times the sum of
    their radii apart (no less than the --init model's own prior does)."""
    scene = run.simulation.scene
    scene = dataclasses.replace(scene, min_separation=max(scene.min_separation, separation))
    return dataclasses.replace(run, simulation=dataclasses.replace(run.simulation, scene=scene))


def anchor_settings(recipe: TrainConfig, init: TrainConfig, look_fraction: float | None = None) -> TrainConfig:
    """The [train] settings of the anchor steps: the recipe's crop, batch and step sizes, with
    the --init model's own looks and optics jitters, since the anchor steps draw the scenes it
    was trained on with its own optics (a recipe's blur and shading jitter are for anchored
    optics, and the init model's optics may be free). `look_fraction` ([adapt]
    anchor_look_fraction), when given, replaces the init model's share of other looks."""
    share = init.look_fraction if look_fraction is None or not init.looks else look_fraction
    return dataclasses.replace(recipe, looks=init.looks, look_fraction=share,
                               optics_jitter=init.optics_jitter, blur_jitter=init.blur_jitter,
                               shading_jitter=init.shading_jitter)


@dataclasses.dataclass
class Split:
    """The corpus adapted on and the part held out to choose the stopping point."""

    fit: Corpus
    heldout: Corpus
    how: str


def split_corpus(corpus: Corpus, crop: tuple[int, int]) -> Split:
    """Hold out evenly spread images, or, with few images, the end strip of each one.

    Raises:
        BadInput: an image too small to give both parts a crop.
    """
    n = len(corpus.images)
    if n >= MIN_IMAGES_TO_SPLIT:
        k = min(MAX_HELDOUT_IMAGES, max(1, round(HELDOUT_FRACTION * n)))
        held = set(np.linspace(0, n - 1, k + 2)[1:-1].round().astype(int).tolist())
        pick = lambda keep: [i for i in range(n) if (i in held) != keep]  # noqa: E731
        part = lambda ids: Corpus([corpus.images[i] for i in ids], [corpus.files[i] for i in ids], [])  # noqa: E731
        names = ", ".join(corpus.files[i].name for i in sorted(held))
        return Split(part(pick(True)), part(pick(False)), f"{k} of {n} images held out ({names})")
    fit, heldout = [], []
    for image, path in zip(corpus.images, corpus.files):
        h, w = image.shape[:2]
        axis = 0 if h >= w else 1
        cut = round((1 - HELDOUT_STRIP) * image.shape[axis])
        if cut < crop[axis] or image.shape[axis] - cut < crop[axis]:
            raise BadInput(path, f"{w}x{h} px is too small to hold out a part of it: give "
                                 f"{MIN_IMAGES_TO_SPLIT} or more images, or larger ones")
        first, last = (image[:cut], image[cut:]) if axis == 0 else (image[:, :cut], image[:, cut:])
        fit.append(first)
        heldout.append(last)
    how = f"the end {HELDOUT_STRIP:.0%} of each image (along its longer side) held out"
    return Split(Corpus(fit, list(corpus.files), []), Corpus(heldout, list(corpus.files), []), how)


def working_scale(predictor: Predictor, images: list[np.ndarray]) -> float:
    """The median of the scales `predictor` chooses on up to `SCALE_IMAGES` of `images`."""
    picks = images[:: max(1, len(images) // SCALE_IMAGES)][:SCALE_IMAGES]
    scales = [choose_scale(predictor, im.astype(np.float32) / 255.0).scale for im in picks]
    return float(np.exp(np.median(np.log(scales))))


def rescaled(corpus: Corpus, scale: float) -> Corpus:
    """The corpus resampled to `scale` input px per working px (unchanged at 1)."""
    if scale == 1.0:
        return corpus
    images = [io.to_uint8(resize(im.astype(np.float32) / 255.0, scale)) for im in corpus.images]
    return Corpus(images, corpus.files, corpus.skipped)


# ---------------------------------------------------------------------------------------
# Scores


def fitted_errors(predictor: Predictor, crops: np.ndarray, start: dict, steps: int, border: int,
                  render_config) -> tuple[np.ndarray, dict, int]:
    """(per-crop RMSE, fitted optics, droplets found): `predictor`'s droplets on `crops`,
    rendered with optics fitted to them from `start` for `steps` full-batch Adam steps."""
    targets = fit_targets(predictor, crops, border)
    tx, fit = make_fit_step(targets, render_config, SCORE_LEARNING_RATE)
    optics, state = start, tx.init(start)
    for _ in range(steps):
        optics, state, _ = fit(optics, state)
    return np.asarray(crop_rmse(optics, targets, render_config)), optics, targets.n_droplets


def paired_win_rate(candidate: np.ndarray, base: np.ndarray, seed: int = 0) -> float:
    """Share of bootstrap resamples of the crops in which `candidate`'s mean error is below
    `base`'s (the same crops for both)."""
    diff = np.asarray(candidate) - np.asarray(base)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))
    return float(np.mean(diff[picks].mean(axis=1) < 0))


def look_optics(name: str, scene) -> dict:
    """The optics of look `name`: "built-in" (the dyed droplet) or one of `amortize.looks`."""
    if name == "built-in":
        return default_optics_params(scene.n_types, scene.channels)
    return look_params(name, scene.n_types, scene.channels)


def choose_start_look(predictor: Predictor, crops: np.ndarray, border: int, render_config,
                      progress: bool) -> tuple[str, dict, dict[str, float]]:
    """(name, fitted optics, RMSE per look) of the look that best renders `predictor`'s
    answers on `crops`, each look briefly fitted (`LOOK_FIT_STEPS`)."""
    scene = predictor.run.simulation.scene
    names = ["built-in"]
    if (scene.n_types, scene.channels) == (3, 3):  # looks ship for K = C = 3; others fit slowly
        names += sorted(LOOKS)
    looks = {name: look_optics(name, scene) for name in names}
    scores, fitted = {}, {}
    for name, optics in tqdm(looks.items(), desc="adapt: starting look", disable=not progress, leave=False):
        errors, fitted[name], _ = fitted_errors(predictor, crops, optics, LOOK_FIT_STEPS, border, render_config)
        scores[name] = float(np.mean(errors))
    best = min(scores, key=scores.get)
    return best, fitted[best], scores


# ---------------------------------------------------------------------------------------
# The job


def model_params(predictor: Predictor) -> dict:
    """A loaded model's variables as saved: the encoder's, with its decoder and read-out."""
    parts = {"decoder": predictor.decoder, "readout": predictor.readout}
    return {**predictor.params, **{k: v for k, v in parts.items() if v is not None}}


def _with_decoder(params: dict, optics: dict, log_noise) -> dict:
    return {**params, "decoder": {"optics": optics, "log_noise": jnp.asarray(log_noise, jnp.float32)}}


def _save_atomic(path: pathlib.Path, params: dict, config: dict, step: int, summary: dict | None = None) -> None:
    """Write a model (and `summary` as its adapt.json) beside `path`, then swap it in: `path`
    never holds a half-written model."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save_model(tmp, params, config, step)
    if summary is not None:
        io.write_json(tmp / "adapt.json", summary, force=True)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    tmp.rename(path)


def _job_state(workdir: pathlib.Path, fresh: dict) -> dict:
    """The job's choices: those of an earlier, interrupted run in `workdir` when it adapted
    the same folder from the same model, else `fresh()` (written before wake-sleep starts)."""
    path = workdir / JOB_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["folder"] != fresh["folder"] or saved["init"] != fresh["init"]:
            raise BadArgument(workdir, f"holds an adaptation of {saved['folder']} from {saved['init']}; "
                                       "choose another --workdir, or delete it")
        return saved
    return {}


def adapt_folder(folder: str | pathlib.Path, out: str | pathlib.Path, init: str | pathlib.Path | None = None,
                 recipe: str | pathlib.Path | None = None, workdir: str | pathlib.Path | None = None,
                 force: bool = False, progress: bool = True, report=print,
                 stop_after: int | None = None) -> dict:
    """Adapt model `init` to the images of `folder` and write the result to `out` (see the
    module notes). Returns the report also written to `out/adapt.json`; None when
    `stop_after` (tests) stopped the wake-sleep run early.

    Raises:
        BadArgument: `out` exists and holds files (without `force`), or `workdir` holds
            another job.
        BadInput: an unreadable folder, recipe or model.
    """
    t0 = time.perf_counter()
    folder, out = pathlib.Path(folder), pathlib.Path(out)
    init_path = pathlib.Path(init) if init is not None else DEFAULT_CHECKPOINT
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise BadArgument(out, "exists and is not empty (use --force to replace it)")
    workdir = pathlib.Path(workdir) if workdir is not None else out.with_name(out.name + ".work")
    job = _job_state(workdir, {"folder": str(folder.resolve()), "init": str(init_path.resolve())})
    predictor = Predictor.load(init_path)
    run = load_adapt_recipe(recipe or DEFAULT_RECIPE, predictor.run.encoder, predictor.run.simulation)
    if recipe is None:
        run = with_hard_core(run, REAL_HARD_CORE)
    corpus = load_corpus(folder, run.wake.crop, warn=lambda line: report(f"warning: {line}"))
    split = split_corpus(corpus, run.wake.crop)
    border, render_config = run.wake.border, run.simulation.render
    scale = working_scale(predictor, split.heldout.images) if not job else float(job["scale"])
    fit, heldout = rescaled(split.fit, scale), rescaled(split.heldout, scale)
    look_crops = sample_crops(fit, np.random.default_rng([run.adapt.seed, 7]), LOOK_CROPS, run.wake.crop, "none")
    if not job:
        look, start_optics, look_scores = choose_start_look(predictor, look_crops, border, render_config, progress)
        job = {"folder": str(folder.resolve()), "init": str(init_path.resolve()), "scale": scale,
               "split": split.how, "look": look, "look_rmse": look_scores}
        workdir.mkdir(parents=True, exist_ok=True)
        io.write_json(workdir / JOB_FILE, job, force=True)
    else:  # the same brief fit as when the look was chosen, so the same start
        start_optics = fitted_errors(predictor, look_crops, look_optics(job["look"], run.simulation.scene),
                                     LOOK_FIT_STEPS, border, render_config)[1]
    report(f"adapt: {len(corpus.images)} image(s) of {folder}; {job['split']}; working scale {scale:g}; "
           f"starting look {job['look']}")

    candidates = workdir / CANDIDATES

    def snapshot(cycle: int, state: dict, config: dict) -> None:
        candidates.mkdir(parents=True, exist_ok=True)
        _save_atomic(candidates / f"cycle_{cycle + 1}", checkpoint.model_of_state(state), config, int(state["step"]))

    anchor_train = anchor_settings(run.train, predictor.run.train, run.adapt.anchor_look_fraction)
    metrics = adapt(run, fit, workdir / "wake-sleep", predictor.params, start_optics, progress=progress,
                    stop_after=stop_after, init_readout=predictor.readout, anchor_optics=predictor.optics,
                    anchor_train=anchor_train, cycle_end=snapshot)
    if int(metrics["step"]) < run.adapt.steps:
        return None
    return _finish(run, predictor, job, fit, heldout, candidates, out, force, progress, report,
                   wake_sleep_seconds=metrics.get("wall_seconds", 0.0), t0=t0)


def _finish(run: AdaptRun, predictor: Predictor, job: dict, fit: Corpus, heldout: Corpus,
            candidates: pathlib.Path, out: pathlib.Path, force: bool, progress: bool, report,
            wake_sleep_seconds: float, t0: float) -> dict:
    """Score the candidates on the held-out crops, pick one, fit its decoder, write `out`."""
    border, render_config = run.wake.border, run.simulation.render
    cycles = sorted((p for p in candidates.iterdir() if p.name.startswith("cycle_") and p.is_dir()),
                    key=lambda p: int(p.name.split("_")[1]))
    loaded = {"init": (model_params(predictor), predictor.config)}
    for path in cycles:
        params, config, _ = checkpoint.load_model(path)
        loaded[path.name] = (params, config)
    last_params = loaded[cycles[-1].name][0] if cycles else loaded["init"][0]
    common = last_params["decoder"]["optics"]
    crops = sample_crops(heldout, np.random.default_rng([run.adapt.seed, 8]), SCORE_CROPS, run.wake.crop, "none")
    errors, found = {}, {}
    for name, (params, config) in tqdm(loaded.items(), desc="adapt: held-out scores", disable=not progress,
                                       leave=False):
        candidate = Predictor(params, config, 0)
        errors[name], _, found[name] = fitted_errors(candidate, crops, common, SCORE_FIT_STEPS, border, render_config)
    means = {k: float(np.mean(v)) for k, v in errors.items()}
    best = min(means, key=means.get)
    win = paired_win_rate(errors[best], errors["init"]) if best != "init" else 0.0
    if best != "init" and win < CONFIDENCE:
        verdict = (f"cannot tell whether detection improved: {best}'s held-out error is lower than the "
                   f"starting model's in only {win:.0%} of resamples; keeping the starting model's encoder")
        best = "init"
    elif best == "init":
        verdict = "no cycle explained the held-out images better; keeping the starting model's encoder"
    else:
        verdict = (f"detection improved: {best}'s held-out reconstruction error is "
                   f"{means[best]:.4f} against {means['init']:.4f} ({win:.0%} of resamples)")
    report(f"adapt: {verdict}")
    params, config = loaded[best]
    chosen = Predictor(params, config, 0)
    final_crops = sample_crops(fit, np.random.default_rng([run.adapt.seed, 9]), FINAL_CROPS, run.wake.crop, "none")
    _, optics, _ = fitted_errors(chosen, final_crops, common, FINAL_FIT_STEPS, border, render_config)
    log_noise = last_params["decoder"]["log_noise"]
    model = _with_decoder({k: v for k, v in params.items() if k != "decoder"}, optics, log_noise)
    if "readout" not in model and predictor.readout is not None:
        model["readout"] = predictor.readout
    summary = {
        "folder": job["folder"], "init": job["init"], "split": job["split"], "working_scale": job["scale"],
        "starting_look": job["look"], "chosen": best, "verdict": verdict,
        "heldout_rmse": {k: round(v, 5) for k, v in means.items()},
        "heldout_droplets": found, "heldout_crops": SCORE_CROPS,
        "wake_sleep_seconds": round(wake_sleep_seconds, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:  # made during the run
        raise BadArgument(out, "exists and is not empty (use --force to replace it)")
    _save_atomic(out, model, config, 1, summary=summary)
    report(f"adapt: wrote {out} ({summary['wall_seconds']:.0f} s)")
    return summary
