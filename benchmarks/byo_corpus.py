"""Bring-your-own-corpus benchmark: does wake-sleep adaptation help on a new kind of image?

We have no labelled real images of other kinds, so this makes a stand-in: a *different*
simulator (other optics: emulsion-like droplets with a bright core and a thick dark ring and no
dye caustic; other sizes and density). It writes 30 unlabeled images for adaptation and 10
labelled held-out images, then reports detection on the held-out set for the model before and
after `amortize train --data` on the unlabeled ones, with the adaptation's wall time.

    python benchmarks/byo_corpus.py --workdir runs/byo [--init checkpoints/default]

The held-out truth is never seen by the adaptation. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import jax.numpy as jnp

from amortize import io
from amortize.config import SceneConfig, SimulationConfig
from amortize.evaluate import evaluate_dirs
from amortize.optics import fit_optics
from amortize.predict import Predictor, predict_files
from amortize.simulate import simulate

ROOT = pathlib.Path(__file__).resolve().parent.parent


def emulsion_droplet(features: jnp.ndarray, n_types: int = 3, channels: int = 3) -> jnp.ndarray:
    """Delta (logit units) of an emulsion droplet seen in phase-contrast-like optics."""
    colour = features[..., :channels]
    u, v = features[..., channels], features[..., channels + 1]
    comp = features[..., channels + 3 :]
    d = jnp.sqrt(u**2 + v**2 + 1e-12)
    core = jnp.exp(-((d / 0.55) ** 2))
    ring = jnp.exp(-(((d - 0.9) / 0.12) ** 2))
    tint = comp @ jnp.asarray([[0.5, 0.1, -0.3], [-0.2, 0.4, 0.1], [0.1, -0.3, 0.5]])[:n_types, :channels]
    delta = 0.9 * core[..., None] * (1.0 + tint) - 1.6 * ring[..., None]
    return delta * (0.8 + 0.4 * colour)


def make_sets(out: pathlib.Path, n_corpus: int, n_heldout: int, size: tuple[int, int]) -> None:
    optics, mse = fit_optics(emulsion_droplet, steps=2000, seed=7)
    scene = SceneConfig(density=18.0, radius_min=1.5, radius_max=30.0, radius_log_mean=1.9,
                        radius_log_sd=0.35, background_min=0.25, background_max=0.5,
                        composition_concentration=(2.0, 2.0))
    config = SimulationConfig(scene=scene)
    for name, n, seed in (("corpus", n_corpus, 101), ("heldout", n_heldout, 202)):
        sims = simulate(n, size, seed=seed, config=config, optics_params=optics)
        (out / name).mkdir(parents=True, exist_ok=True)
        for i, (image, table) in enumerate(zip(sims.images, sims.tables)):
            io.write_png(out / name / f"img_{i:03d}.png", image, force=True)
            if name == "heldout":  # the adaptation corpus stays unlabeled
                io.write_table(out / name / f"img_{i:03d}.csv", table, force=True)
    print(f"optics fit mse {mse:.4f}", file=sys.stderr)


def detect(model: str, images: pathlib.Path, out: pathlib.Path, truth: pathlib.Path) -> dict:
    predictor = Predictor.load(model)
    predict_files([images], out, predictor, force=True, progress=False)
    metrics, _ = evaluate_dirs(out, truth, rmin=2.0)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--init", default=str(ROOT / "checkpoints" / "default"))
    parser.add_argument("--recipe", default=str(ROOT / "train" / "adapt_droplets.toml"))
    parser.add_argument("--corpus", type=int, default=30)
    parser.add_argument("--heldout", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=(384, 384), metavar=("W", "H"))
    args = parser.parse_args()
    work = pathlib.Path(args.workdir)
    if not (work / "heldout").is_dir():
        make_sets(work, args.corpus, args.heldout, tuple(args.size))
    before = detect(args.init, work / "heldout", work / "pred-before", work / "heldout")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "amortize.cli", "train", "--config", args.recipe,
                    "--data", str(work / "corpus"), "--workdir", str(work / "adapt"),
                    "--init", args.init, "--quiet"], check=True)
    wall = time.perf_counter() - start
    after = detect(str(work / "adapt"), work / "heldout", work / "pred-after", work / "heldout")
    print(json.dumps({"before": before, "after": after, "adapt_wall_s": round(wall, 1),
                      "recipe": args.recipe, "corpus_images": args.corpus,
                      "heldout_images": args.heldout, "size": list(args.size)}))


if __name__ == "__main__":
    main()
