"""How far `--scale auto` reaches: one built-in droplet of each radius, found with no scale.

    python benchmarks/scale_range.py [--model checkpoints/default] [--radii 60 120 200 300]

For each radius r, renders one droplet of the built-in look (composition 0.7, 0.2, 0.1) in
the middle of a frame 2.56 r wide (at least 256 px) over a flat background with pixel noise
0.01, runs `amortize.choose_scale` (what `amortize predict --scale auto` does) and prints a
Markdown table: the scale chosen, the scales weighed with their reconstruction RMSE, the
radius found and its error, the centre error, and the wall time of the search (warm: each
size is searched twice and the second time is reported).
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from amortize.autoscale import choose_scale
from amortize.config import RenderConfig
from amortize.droplets import Background, Droplets
from amortize.optics import default_optics_params
from amortize.predict import Predictor
from amortize.render import render


def one_droplet(radius: float, size: int, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """(size, size, 3) frame with one built-in droplet of `radius` px centred near the middle."""
    droplets = Droplets(x=jnp.array([size / 2 - 0.3]), y=jnp.array([size / 2 + 0.2]),
                        radius=jnp.array([radius]), composition=jnp.array([[0.7, 0.2, 0.1]]),
                        presence=jnp.ones(1))
    background = Background(colour=jnp.array([0.7, 0.65, 0.55]), illumination=jnp.zeros((3, 5)))
    levels = max(4, int(np.ceil(np.log2(radius / 5.0))) + 2)  # the renderer's reach covers r
    image = np.asarray(render(droplets, default_optics_params(3, 3), background, (size, size),
                              RenderConfig(levels=levels)))
    rng = np.random.default_rng(seed)
    return np.clip(image + noise * rng.standard_normal(image.shape), 0, 1).astype(np.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: checkpoints/default)")
    ap.add_argument("--radii", type=float, nargs="+", default=[60.0, 120.0, 200.0, 300.0])
    args = ap.parse_args(argv)
    predictor = Predictor.load(args.model)
    print("| radius | frame | scale chosen | scales weighed (RMSE) | radius found | radius error "
          "| centre error | search, warm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in args.radii:
        size = max(256, int(round(2.56 * r)))
        image = one_droplet(r, size)
        choose_scale(predictor, image)  # compile
        start = time.perf_counter()
        choice = choose_scale(predictor, image)
        seconds = time.perf_counter() - start
        t = choice.table
        weighed = ", ".join(f"{s:g}: {e:.3f}" for s, e in sorted(choice.tried.items()))
        if len(t["x"]):
            i = int(np.argmax(t["radius"]))
            found = float(t["radius"][i])
            centre = float(np.hypot(t["x"][i] - (size / 2 - 0.3), t["y"][i] - (size / 2 + 0.2)))
            print(f"| {r:g} px | {size}² | {choice.scale:g} | {weighed} | {found:.1f} px "
                  f"| {100 * abs(found / r - 1):.1f} % | {centre:.1f} px | {seconds:.2f} s |")
        else:
            print(f"| {r:g} px | {size}² | {choice.scale:g} | {weighed} | none | | | {seconds:.2f} s |")


if __name__ == "__main__":
    main()
