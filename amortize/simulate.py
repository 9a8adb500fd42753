"""Simulated droplet scenes with ground truth: prior sample -> render -> nuisances.

`simulate` returns images and tables in memory; `write_simulation` is what
`amortize simulate` runs: it writes `<stem>.png`, `<stem>.csv` and `manifest.json`.
Scenes are made in jitted, vmapped batches; image i depends only on (seed, i), so the output
is deterministic for a seed whatever the batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from tqdm.auto import tqdm

from amortize import io
from amortize.config import SimulationConfig, to_dict, validate_request
from amortize.droplets import Background, Droplets, table_columns, to_table
from amortize.errors import BadArgument
from amortize.model import droplet_model, scene_from_trace
from amortize.nuisance import degrade
from amortize.optics import channels_of, default_optics_params, n_types_of
from amortize.render import overflow

#: Pixels simulated per jitted batch; bounds memory for any image size.
PIXELS_PER_BATCH = 1 << 20


@dataclasses.dataclass
class Simulation:
    """A batch of simulated scenes.

    Attributes:
        images: (n, H, W, C) float32 in [0, 1] (8-bit values when quantised).
        tables: per image, the ground-truth table of droplets centred inside the image.
        nuisance: per image, the drawn noise, blur and compression settings.
        overflow: droplets the renderer's cell table could not hold (should be 0).
    """

    images: np.ndarray
    tables: list[dict[str, np.ndarray]]
    nuisance: list[dict[str, float]]
    overflow: int


def simulate_scene(
    key: jax.Array,
    shape: tuple[int, int],
    config: SimulationConfig,
    optics_params: dict,
) -> tuple[jnp.ndarray, Droplets, Background, dict]:
    """One scene: (image (H, W, C), droplets, background, nuisance values incl. overflow).

    Jittable; `shape` and `config` are static.
    """
    k_model, k_nuisance = jax.random.split(key)
    trace = handlers.trace(handlers.seed(droplet_model, k_model)).get_trace(
        shape=shape,
        optics_params=optics_params,
        scene=config.scene,
        render_config=config.render,
    )
    droplets, background, noise = scene_from_trace(trace)
    image, info = degrade(k_nuisance, trace["rendered"]["value"], noise, config.nuisance)
    info["overflow"] = overflow(droplets, shape, config.render)
    return image, droplets, background, info


@functools.partial(jax.jit, static_argnames=("shape", "config"))
def _simulate_batch(keys, shape, config, optics_params):
    return jax.vmap(lambda k: simulate_scene(k, shape, config, optics_params))(keys)


def iter_simulation(
    n: int,
    size: tuple[int, int],
    seed: int = 0,
    config: SimulationConfig | None = None,
    optics_params: dict | None = None,
):
    """Yield (index, image, table, nuisance, overflow) scene by scene, batch by batch."""
    validate_request(n, size)
    config = config or SimulationConfig()
    w, h = int(size[0]), int(size[1])
    if optics_params is None:
        optics_params = default_optics_params(config.scene.n_types, config.scene.channels)
    batch = int(max(1, min(n, PIXELS_PER_BATCH // (w * h))))
    root = jax.random.PRNGKey(seed)
    for start in range(0, n, batch):
        idx = np.arange(start, start + batch)
        keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(idx))
        images, droplets, _, info = jax.device_get(_simulate_batch(keys, (h, w), config, optics_params))
        for j, i in enumerate(idx[idx < n]):
            one = jax.tree_util.tree_map(lambda a: a[j], droplets)
            nuisance = {k: float(v[j]) for k, v in info.items() if k != "overflow"}
            yield int(i), images[j], to_table(one, (h, w)), nuisance, int(info["overflow"][j])


def simulate(
    n: int,
    size: tuple[int, int],
    seed: int = 0,
    config: SimulationConfig | None = None,
    optics_params: dict | None = None,
) -> Simulation:
    """Simulate `n` scenes of `size` = (W, H) px from the prior, with ground truth.

    Args:
        n: number of scenes.
        size: (width, height) in px.
        seed: PRNG seed; image i depends only on (seed, i).
        config: prior, renderer and nuisances (defaults: `SimulationConfig()`).
        optics_params: optics MLP weights (defaults: the built-in lens-like droplet).
    """
    images, tables, nuisance, total_overflow = [], [], [], 0
    for _, image, table, info, over in iter_simulation(n, size, seed, config, optics_params):
        images.append(image)
        tables.append(table)
        nuisance.append(info)
        total_overflow += over
    return Simulation(np.stack(images), tables, nuisance, total_overflow)


def model_look(model: str | pathlib.Path, config: SimulationConfig) -> dict:
    """The decoder optics of the model at `model`, checked against the scenes' types and
    channels (`BadArgument` naming `--look` if they differ)."""
    from amortize.predict import Predictor  # predict imports the training modules, which import this one

    optics = Predictor.load(model).optics
    scene = config.scene
    drawn = (n_types_of(optics), channels_of(optics))
    if drawn != (scene.n_types, scene.channels):
        raise BadArgument("--look", f"{model} draws {drawn[0]} composition types in {drawn[1]} channels; "
                                    f"the scenes have {scene.n_types} in {scene.channels}")
    return optics


def versions() -> dict[str, str]:
    names = ("amortize", "jax", "jaxlib", "numpyro", "flax", "numpy", "pillow")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_simulation(
    out_dir: str | pathlib.Path,
    n: int,
    size: tuple[int, int],
    seed: int = 0,
    config: SimulationConfig | None = None,
    force: bool = False,
    progress: bool = True,
    look: str | pathlib.Path | None = None,
) -> dict:
    """Write `n` simulated scenes to `out_dir` and return the manifest.

    Writes `scene_00000.png` + `scene_00000.csv`, ... and `manifest.json` last. Everything is
    validated before the directory is touched; each file is written atomically.
    `look`, a model's path, draws the droplets with that model's decoder instead of the
    built-in droplet (`model_look`).
    """
    validate_request(n, size)
    config = config or SimulationConfig()
    optics_params = None if look is None else model_look(look, config)
    out = io.prepare_output_dir(out_dir, force)
    digits = max(5, len(str(n - 1)))
    start = time.perf_counter()
    files, total_overflow = [], 0
    scenes = iter_simulation(n, size, seed, config, optics_params)
    bar = tqdm(scenes, total=n, desc="simulate", unit="img", disable=None if progress else True, leave=False)
    for i, image, table, _, over in bar:
        stem = f"scene_{i:0{digits}d}"
        io.write_png(out / f"{stem}.png", image, force=True)
        io.write_table(out / f"{stem}.csv", table, force=True)
        files.append(stem)
        total_overflow += over
    manifest = {
        "kind": "amortize.simulate",
        "n": n,
        "size": [int(size[0]), int(size[1])],
        "seed": seed,
        "columns": table_columns(config.scene.n_types),
        "coordinates": "px; centre of the top-left pixel is (0, 0); x right, y down",
        "density_unit": "droplet centres per 100 x 100 px",
        "config": to_dict(config),
        "optics": (f"decoder of the model {look}" if look is not None
                   else "built-in lens-like droplet (amortize/assets/default_optics.msgpack)"),
        "renderer_overflow": total_overflow,
        "versions": versions(),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "stems": files,
    }
    io.write_json(out / "manifest.json", manifest, force=True)
    return manifest
