"""Instant inference: a trained encoder, one forward pass, a table of droplets.

    predictor = Predictor.load()            # checkpoints/default/, or a path
    table = predictor.predict(image)        # image: (H, W, 3) float32 in [0, 1]

`predict_files` is what `amortize predict` runs: for each image it writes `<stem>.csv`,
`<stem>.overlay.png` and `<stem>.json` into the output directory.

Images of any size from 32 x 32 up are padded to multiples of 32. Frames larger than
`MAX_UNTILED_PIXELS` are cut into overlapping tiles; each tile contributes only the cells of
its core, and peaks are found on the stitched cell grid, so a droplet on a tile border is
found once and where it would be without tiling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from amortize import checkpoint, io
from amortize.autoscale import ScaleChoice, choose_scale
from amortize.config import AUTO, from_saved
from amortize.detect import DEFAULT_THRESHOLD, cell_droplets, to_droplet_table, to_work_table
from amortize.droplets import Background
from amortize.encoder import ALIGN, Encoder, decode_outputs, input_features, standardise, unmirror_raw
from amortize.errors import AmortizeError, BadArgument, BadInput
from amortize.optics import default_optics_params
from amortize.outputs import (
    FilesRun, OutputSet, StopRequests, check_out_dir, input_identity, plan, remove_if_empty, staged,
)
from amortize.overlay import draw_overlay
from amortize.program_store import stored_jit
from amortize.progress import progress_bar, report_above
from amortize.readout import read_out
from amortize.reconstruct import render_table, rmse
from amortize.wake import fit_background

#: The tables of a checkpoint's config that describe the encoder and its simulation prior.
RUN_TABLES = ("simulation", "encoder", "train", "readout")
#: The shipped model.
DEFAULT_CHECKPOINT = pathlib.Path(__file__).resolve().parent.parent / "checkpoints" / "default"
#: The default's encoder with the built-in optics, which draw what the simulator draws: the
#: model for refining or reconstructing simulated scenes.
SIMULATED_CHECKPOINT = DEFAULT_CHECKPOINT.parent / "simulated"
#: Padded frames above this many pixels are tiled (bounds peak memory to a few GB).
MAX_UNTILED_PIXELS = 2048 * 2048
#: Tile core side and the context margin around it (px, multiples of ALIGN). The margin
#: covers the encoder's effective receptive field, so tiling leaves predictions unchanged.
TILE_CORE = 1536
TILE_MARGIN = 160
#: Smallest image side accepted (the encoder's deepest level needs a few cells).
MIN_SIDE = 32
#: Encoder readings a `Predictor` remembers (see `Predictor.reading`).
READ_MEMORY = 4
#: Images encoded together when predicting a directory.
BATCH = 4


def _pad(z: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = z.shape[:2]
    return np.pad(z, ((0, shape[0] - h), (0, shape[1] - w), (0, 0)))


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def tile_starts(n: int, core: int) -> range:
    """Starts of the tile cores along one padded axis of length `n`."""
    return range(0, n, core)


@dataclasses.dataclass
class Predictor:
    """A trained encoder ready for inference.

    Attributes:
        params: encoder variables.
        config: the resolved training config (dict, as saved in the checkpoint).
        step: training step of the checkpoint.
        source: where it was loaded from.
        mirror_average: read every image twice, as it is and mirrored left-right, and
            average the two sets of cell outputs. Droplets look the same in a mirror (the
            optics are left-right symmetric; the caustic falls below the centre, not beside
            it), so the mirror is a second reading that shares none of the network's
            left-right quirks: composition R^2 0.885 -> 0.891 on the held-out scenes, for
            one more encoder pass.
    """

    params: dict
    config: dict
    step: int
    source: str = ""
    mirror_average: bool = True

    def __post_init__(self) -> None:
        from amortize.train import RunConfig  # train imports the simulator

        # An adaptation run's config also holds its [wake] and [adapt] tables.
        self.run = from_saved(RunConfig, {k: v for k, v in self.config.items() if k in RUN_TABLES})
        params = jax.tree_util.tree_map(jnp.asarray, dict(self.params))
        self.decoder = params.pop("decoder", None)
        # The composition read-out, when the model has a fitted one (`amortize.readout`).
        self.readout = params.pop("readout", None)
        self.params = params
        self._readings: dict = {}
        # Kept in the program store (`amortize.program_store`) under the encoder's config,
        # which is all these closures capture.
        setup = self.run.encoder
        encoder = Encoder(setup)
        self._encode = stored_jit(lambda p, z: encoder.apply(p, z), key=setup)
        # Whole-frame statistics, so that tiles share them and the encoder's compiled
        # program depends only on the padded shape; jitted, as NumPy is 5x slower here.
        self._standardise = stored_jit(lambda image: standardise(input_features(image, setup)), key=setup)
        k, stride = self.run.encoder.n_types, self.run.encoder.stride
        self._detect = stored_jit(
            lambda raw, stats, threshold: cell_droplets(decode_outputs(raw, stats, k, stride), threshold), key=setup
        )
        # Jitted as one program: op by op, a fresh process traced and loaded some forty
        # small programs per image size (0.5-0.9 s per size on the slide at 4x).
        self._background = stored_jit(
            lambda raw, stats, shape: fit_background(decode_outputs(raw[None], stats[None], k, stride), shape),
            key=setup, static_argnums=2,
        )

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Predictor":
        """Load a model directory or a training workdir (default: the shipped model)."""
        path = pathlib.Path(path) if path is not None else DEFAULT_CHECKPOINT
        params, config, step = checkpoint.load_model(path)
        try:
            return cls(params, config, step, str(path))
        except (AmortizeError, TypeError, KeyError) as err:
            raise BadInput(path, f"checkpoint config is not usable ({err})") from None

    @property
    def n_types(self) -> int:
        return self.run.encoder.n_types

    @property
    def largest_radius(self) -> float:
        """The largest droplet radius (working px) of the scenes the encoder learned on."""
        return float(self.run.simulation.scene.radius_max)

    def standardised(self, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the network reads from `work` (H, W, C), standardised with the whole
        frame's per-channel statistics: (z (H, W, C'), stats (2, C'))."""
        z, stats = self._standardise(np.asarray(work, np.float32))
        return np.asarray(z), np.asarray(stats)

    def raw_cells(self, z: np.ndarray, **tiling) -> np.ndarray:
        """Raw head outputs (Hc, Wc, n) for one standardised, aligned image (H, W, C),
        averaged with its mirror image's when `mirror_average`."""
        return self._with_mirror(lambda v: self._one_reading(v, **tiling), z)

    def reading(self, work: np.ndarray, **tiling) -> tuple[np.ndarray, np.ndarray]:
        """Raw head outputs (Hc, Wc, n) of one working-scale image (H, W, C), padded to
        `ALIGN`, and its standardisation statistics (2, C').

        The last `READ_MEMORY` readings are remembered by the image's bytes: predicting an
        image, fitting the background for its reconstruction and refining it each read the
        same working image, and on the slide at 4x each reading (two encoder passes over
        2 M px) took about 1.5 s of refinement's 33 s."""
        work = np.ascontiguousarray(work, np.float32)
        key = (id(self.params), self.mirror_average, tuple(sorted(tiling.items())), work.shape,
               hashlib.blake2b(work.data, digest_size=16).digest())
        if key in self._readings:
            return self._readings[key]
        h, w = work.shape[:2]
        z, stats = self.standardised(work)
        reading = self.raw_cells(_pad(z, (aligned(h), aligned(w))), **tiling), stats
        self._readings[key] = reading
        while len(self._readings) > READ_MEMORY:
            self._readings.pop(next(iter(self._readings)))
        return reading

    def _with_mirror(self, read, z: np.ndarray) -> np.ndarray:
        """`read(z)` for z (..., H, W, C), averaged with the reading of its left-right
        mirror image mapped back, when `mirror_average`."""
        raw = read(z)
        if self.mirror_average:
            raw = 0.5 * (raw + unmirror_raw(read(z[..., ::-1, :])))
        return raw

    def _one_reading(self, z: np.ndarray, tile_core: int = TILE_CORE, margin: int = TILE_MARGIN,
                     max_untiled: int = MAX_UNTILED_PIXELS) -> np.ndarray:
        h, w = z.shape[:2]
        if h * w <= max_untiled:
            return np.asarray(self._encode(self.params, z[None]))[0]
        s = self.run.encoder.stride
        cells = np.zeros((h // s, w // s, self.run.encoder.n_outputs), np.float32)
        # Every window has the same shape (one compiled program) and lies inside the frame:
        # it is the tile core plus `margin` of context, slid inwards at the frame's edges,
        # so a cell sees the frame's true border exactly as the untiled encoder does.
        side_y, side_x = min(tile_core + 2 * margin, h), min(tile_core + 2 * margin, w)
        for y0 in tile_starts(h, tile_core):
            for x0 in tile_starts(w, tile_core):
                wy = min(max(y0 - margin, 0), h - side_y)
                wx = min(max(x0 - margin, 0), w - side_x)
                raw = np.asarray(self._encode(self.params, z[None, wy : wy + side_y, wx : wx + side_x]))[0]
                y1, x1 = min(y0 + tile_core, h), min(x0 + tile_core, w)
                cells[y0 // s : y1 // s, x0 // s : x1 // s] = raw[
                    (y0 - wy) // s : (y1 - wy) // s, (x0 - wx) // s : (x1 - wx) // s
                ]
        return cells

    def predict(self, image: np.ndarray, threshold: float = DEFAULT_THRESHOLD, scale: float | None = None,
                **tiling) -> dict[str, np.ndarray]:
        """Droplets of one image.

        Args:
            image: (H, W, 3) float in [0, 1] (grey (H, W) is expanded to RGB).
            threshold: presence needed to report a droplet, in (0, 1).
            scale: input px per encoder px. The default model covers radii of 1.5 to 40 px
                at scale 1; use 2 for radii of 3 to 80 px, and so on.

        Returns:
            A droplet table (x, y, radius, presence, comp_*, x_std, y_std, radius_std) in the
            input image's pixels.
        """
        image = check_image(image)
        if not 0 < threshold < 1:
            raise BadArgument("--threshold", f"must be in (0, 1), got {threshold}")
        scale = 1.0 if scale is None else float(scale)
        if not (scale > 0 and np.isfinite(scale)):
            raise BadArgument("--scale", f"must be a positive number, got {scale}")
        work = resize(image, scale)
        h, w = work.shape[:2]
        if min(h, w) < MIN_SIDE:
            raise BadArgument("image", f"{w}x{h} px at scale {scale:g} is smaller than {MIN_SIDE} px")
        raw, stats = self.reading(work, **tiling)
        cells = jax.device_get(self._detect(raw, stats, jnp.float32(threshold)))
        return self._read_out(work, to_droplet_table(cells, (h, w), scale), scale)

    def _read_out(self, work: np.ndarray, table: dict, scale: float = 1.0) -> dict:
        """`table` with compositions from the read-out, if the model has one."""
        return table if self.readout is None else read_out(self.readout, work, table, scale)

    @property
    def optics(self) -> dict:
        """The decoder's optics: learned by adaptation, else the built-in droplet."""
        if self.decoder is not None:
            return self.decoder["optics"]
        scene = self.run.simulation.scene
        return default_optics_params(scene.n_types, scene.channels)

    def background(self, work: np.ndarray) -> Background:
        """The model's background (colour and illumination field) fitted to the encoder's
        background map of one working-scale image (H, W, C)."""
        raw, stats = self.reading(work)
        fitted = self._background(raw, stats, tuple(work.shape[:2]))
        return Background(fitted.colour[0], fitted.illumination[0])

    def reconstruct(self, image: np.ndarray, table: dict[str, np.ndarray],
                    scale: float | None = None) -> np.ndarray:
        """The decoder's rendering (H, W, 3) of `table` (from `predict` with the same
        `scale`) over the background the encoder sees in `image`."""
        image = check_image(image)
        scale = 1.0 if scale is None else float(scale)
        work = resize(image, scale)
        h, w = work.shape[:2]
        recon = render_table(to_work_table(table, scale), self.background(work), self.optics, (h, w),
                             self.run.simulation.render, self.n_types)
        # Exactly the input's size: a ratio can round a pixel short on odd sizes.
        return resize_to(recon, image.shape[:2])

    def predict_batch(self, images: list[np.ndarray], threshold: float = DEFAULT_THRESHOLD,
                      scale: float | None = None) -> list[dict[str, np.ndarray]]:
        """`predict` for several images; same-size frames share one encoder call.

        The batch is padded to `BATCH` images so that a directory of any length compiles
        one program per frame size.
        """
        if len(images) < 2 or (scale or 1.0) != 1.0 or len({np.shape(im) for im in images}) > 1:
            return [self.predict(im, threshold, scale) for im in images]
        images = [check_image(im) for im in images]
        h, w = images[0].shape[:2]
        if aligned(h) * aligned(w) > MAX_UNTILED_PIXELS or min(h, w) < MIN_SIDE:
            return [self.predict(im, threshold) for im in images]
        if not 0 < threshold < 1:
            raise BadArgument("--threshold", f"must be in (0, 1), got {threshold}")
        out = []
        for start in range(0, len(images), BATCH):
            chunk = images[start : start + BATCH]
            zs, stats = zip(*(self.standardised(im) for im in chunk))
            z = np.zeros((BATCH, aligned(h), aligned(w), zs[0].shape[-1]), np.float32)
            for i, zi in enumerate(zs):
                z[i, :h, :w] = zi
            raw = self._with_mirror(lambda v: np.asarray(self._encode(self.params, v)), z)
            for i in range(len(chunk)):
                cells = jax.device_get(self._detect(raw[i], stats[i], jnp.float32(threshold)))
                out.append(self._read_out(chunk[i], to_droplet_table(cells, (h, w))))
        return out


def check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise BadArgument("image", f"expected (H, W, 3), got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise BadArgument("image", "contains NaN or inf")
    return image


def resize(image: np.ndarray, scale: float) -> np.ndarray:
    """Shrink (scale > 1) or enlarge (scale < 1) an image by `scale` with area averaging."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    return resize_to(image, (max(1, round(h / scale)), max(1, round(w / scale))))


def resize_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, C) image to exactly `shape` (H, W): area averaging when shrinking,
    bilinear when enlarging."""
    h, w = image.shape[:2]
    if (h, w) == tuple(shape):
        return image
    shrink = shape[0] * shape[1] < h * w
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
            (shape[1], shape[0]), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR))
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Files


def summary(table: dict[str, np.ndarray], shape: tuple[int, int], n_types: int) -> dict:
    """The per-image JSON: count, radius distribution and composition summary."""
    r = table["radius"].astype(np.float64)
    comp = np.stack([table[f"comp_{k}"] for k in range(n_types)], axis=-1).astype(np.float64)
    n = int(r.size)

    def stats(v):
        if v.size == 0:
            return None
        return float(np.round(v, 4)) if np.ndim(v) == 0 else [round(float(a), 4) for a in v]

    return {
        "count": n,
        "image_size": [int(shape[1]), int(shape[0])],
        "radius_px": {
            "mean": stats(np.mean(r)) if n else None,
            "median": stats(np.median(r)) if n else None,
            "deciles": stats(np.percentile(r, np.arange(10, 100, 10))) if n else None,
        },
        "composition": {
            "mean": stats(comp.mean(axis=0)) if n else None,
            "std": stats(comp.std(axis=0)) if n else None,
        },
    }


def collect_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[pathlib.Path], list[AmortizeError]]:
    """Image files named directly or found (non-recursively) in directories."""
    files, errors = [], []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in io.IMAGE_SUFFIXES)
            if not found:
                errors.append(BadInput(path, "directory holds no PNG, JPEG or TIFF images"))
            files.extend(found)
        else:
            files.append(path)  # read_image reports missing or unreadable files
    return files, errors


def predict_files(
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    predictor: Predictor,
    threshold: float = DEFAULT_THRESHOLD,
    scale: float | str | None = AUTO,
    force: bool = False,
    progress: bool = True,
    report=print,
    reconstruction: bool = False,
    max_pixels: int = io.DEFAULT_MAX_PIXELS,
) -> FilesRun:
    """Predict every image and write its outputs; returns what was done (`FilesRun`).

    `scale` is input px per encoder px, or "auto" (`amortize.autoscale.choose_scale`):
    scale 1 unless the droplets are too small for the encoder and an enlarged image is
    explained better. The JSON records the scale used and, for "auto", the reconstruction
    RMSE of each scale tried.

    With `reconstruction`, also `<stem>.recon.png` (the decoder's rendering of the droplets
    found), `<stem>.residual.png` (0.5 + image - reconstruction) and `recon_rmse` in the JSON.

    An image's files appear together or not at all (`amortize.outputs`): without `force`,
    images whose outputs are complete are skipped and incomplete ones redone. A bad input
    is reported through `report` (one line) and skipped; the rest still run. SIGINT or
    SIGTERM stops the run after the image at hand. `--out` is made only when an image's
    outputs are written.
    """
    if not 0 < threshold < 1:
        raise BadArgument("--threshold", f"must be in (0, 1), got {threshold}")
    out = pathlib.Path(out_dir)
    existed = check_out_dir(out)
    run = FilesRun()
    report = report_above(report)

    def fail(path, err):
        if isinstance(err, BadArgument) and err.subject == "image":
            err = BadInput(path, err.reason)
        run.errors.append(err)
        report(f"error: {err}")

    if existed and io.remove_stale_temps(out):
        report(f"note: {out}: removed temporary files of an interrupted run")
    files, errors = collect_images(inputs)
    for err in errors:
        fail(None, err)
    bar = progress_bar(total=len(files), enabled=progress and len(files) > 1, desc="predict", unit="img",
                       leave=False)
    kinds = ["csv", "overlay.png"] + (["recon.png", "residual.png"] if reconstruction else []) + ["json"]
    settings = {"command": "predict", "checkpoint": predictor.source, "checkpoint_step": predictor.step,
                "threshold": threshold,
                "scale": scale, "reconstruction": reconstruction}
    auto = scale == AUTO
    fixed = None if auto else scale
    seen: dict[str, pathlib.Path] = {}
    pending: list[tuple[pathlib.Path, OutputSet, np.ndarray]] = []

    def write(path, outputs, image, table):
        choice = (choose_scale(predictor, image, threshold, table) if auto
                  else ScaleChoice(fixed or 1.0, table, None, {}))
        table = choice.table
        meta = summary(table, image.shape[:2], predictor.n_types)
        meta.update({"image": str(path), "checkpoint": predictor.source,
                     "checkpoint_step": predictor.step, "threshold": threshold,
                     "scale": choice.scale})
        if auto:
            meta["scale_search"] = {f"{s:g}": round(e, 6) for s, e in choice.tried.items()}
        with staged(outputs):
            if reconstruction:
                recon = (choice.recon if choice.recon is not None
                         else predictor.reconstruct(image, table, choice.scale))
                meta["recon_rmse"] = round(rmse(image, recon), 6)
                outputs.stage("recon.png", io.png_bytes(recon))
                outputs.stage("residual.png", io.png_bytes(np.clip(0.5 + image - recon, 0.0, 1.0)))
            outputs.stage("csv", io.table_to_csv(table).encode())
            outputs.stage("overlay.png", io.png_bytes(draw_overlay(image, table)))
            outputs.stage_json(meta)
            outputs.commit()
        run.done += 1

    def flush():
        try:
            tables = predictor.predict_batch([im for _, _, im in pending], threshold, fixed)
        except AmortizeError:  # find the culprit image by image
            tables = []
            for path, _, im in pending:
                try:
                    tables.append(predictor.predict(im, threshold, fixed))
                except AmortizeError as err:
                    fail(path, err)
                    tables.append(None)
        for (path, outputs, image), table in zip(pending, tables):
            if table is not None:
                try:
                    write(path, outputs, image, table)
                except AmortizeError as err:
                    fail(path, err)
            bar.update()
        pending.clear()

    with StopRequests(notify=report) as stop:
        for path in files:
            if stop.requested:
                break
            try:
                outputs = OutputSet(out, path.stem, kinds, {**settings, **input_identity(path)})
                if not plan(path, outputs, seen, force, report):
                    run.skipped += 1
                    bar.update()
                    continue
                image = io.read_image(path, max_pixels, warn=lambda line: report(f"warning: {line}"))
            except AmortizeError as err:
                fail(path, err)
                bar.update()
                continue
            if pending and pending[0][2].shape != image.shape:
                flush()
            pending.append((path, outputs, image))
            if len(pending) == BATCH:
                flush()
        if pending and not stop.requested:  # images read but not yet predicted wait for the rerun
            flush()
        run.stopped = stop.requested
    bar.close()
    remove_if_empty(out, existed)
    return run
