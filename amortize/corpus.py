"""A folder of real, unlabeled images, served as random augmented crops for the wake phase.

The images are read once and kept as 8-bit arrays (a corpus of 50 full frames is a few
hundred MB, not GB). Each minibatch is a set of random crops, each flipped and rotated by a
random multiple of 90 degrees: the droplets' statistics do not depend on orientation, so
these are free extra data.

Bad files are skipped, each with a one-line warning, and counted; a folder with nothing left
is an error. Images smaller than the crop in either dimension are skipped too (padding would
invent a border the decoder would then have to explain), and the warning says so.
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings

import numpy as np

from amortize import io
from amortize.errors import AmortizeError, BadArgument, BadInput


@dataclasses.dataclass
class Corpus:
    """Images of one folder, kept as uint8 (H, W, 3) arrays.

    Attributes:
        images: the usable images.
        files: their paths, in the same order.
        skipped: (path, reason) of every file left out.
    """

    images: list[np.ndarray]
    files: list[pathlib.Path]
    skipped: list[tuple[pathlib.Path, str]]

    @property
    def pixels(self) -> int:
        return int(sum(im.shape[0] * im.shape[1] for im in self.images))

    def n_crops(self, crop: tuple[int, int]) -> int:
        """How many crops of this size the corpus holds: the plate size of the wake ELBO."""
        return max(1, round(self.pixels / (crop[0] * crop[1])))


def load_corpus(folder: str | pathlib.Path, crop: tuple[int, int], warn=None) -> Corpus:
    """Read every PNG, JPEG and TIFF in `folder` (not recursive).

    Args:
        folder: the corpus directory.
        crop: (H, W) of the training crops; smaller images are skipped.
        warn: called with one line per skipped file (default: `warnings.warn`).

    Raises:
        BadInput: the folder is missing, empty, or has no usable image.
    """
    folder = pathlib.Path(folder)
    warn = warn or (lambda line: warnings.warn(line, stacklevel=2))
    if not folder.is_dir():
        raise BadInput(folder, "--data must be a folder of images" if folder.exists() else "no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in io.IMAGE_SUFFIXES)
    if not files:
        raise BadInput(folder, "folder holds no PNG, JPEG or TIFF images")
    images, kept, skipped = [], [], []
    for path in files:
        try:
            image = io.read_image(path, warn=warn)
        except AmortizeError as err:
            skipped.append((path, err.reason))
            warn(f"{path}: skipped, {err.reason}")
            continue
        h, w = image.shape[:2]
        if h < crop[0] or w < crop[1]:
            reason = f"{w}x{h} px is smaller than the {crop[1]}x{crop[0]} crop"
            skipped.append((path, reason))
            warn(f"{path}: skipped, {reason}")
            continue
        images.append(io.to_uint8(image))
        kept.append(path)
    if not images:
        raise BadInput(folder, f"no usable image: all {len(files)} files were skipped (see warnings)")
    return Corpus(images, kept, skipped)


#: The crop augmentations `sample_crops` knows.
AUGMENTATIONS = ("turns", "mirror", "none")


def augment(crop: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 flips and quarter turns of a square crop; `code` in 0..7."""
    if code & 4:
        crop = crop[:, ::-1]
    return np.rot90(crop, k=code & 3, axes=(0, 1))


def sample_crops(corpus: Corpus, rng: np.random.Generator, batch: int, crop: tuple[int, int],
                 augmentation: str = "turns") -> np.ndarray:
    """(batch, H, W, 3) float32 crops in [0, 1], images picked in proportion to their area.

    `augmentation` (one of `AUGMENTATIONS`): "turns" gives square crops any of the 8 flips
    and quarter turns, rectangular ones those that keep their shape (flips and half turns);
    "mirror" only left-right mirrors, for optics with a direction (a caustic on the droplets'
    lower side stays below them); "none" keeps the crops as they are.
    """
    if augmentation not in AUGMENTATIONS:
        raise BadArgument("augmentation", f"must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")
    h, w = crop
    areas = np.array([im.shape[0] * im.shape[1] for im in corpus.images], np.float64)
    picks = rng.choice(len(corpus.images), size=batch, p=areas / areas.sum())
    if augmentation == "turns":
        codes = rng.integers(0, 8, size=batch) if h == w else 2 * rng.integers(0, 4, size=batch)
    else:  # code 4 is the left-right mirror
        codes = 4 * rng.integers(0, 2 if augmentation == "mirror" else 1, size=batch)
    out = np.empty((batch, h, w, 3), np.float32)
    for i, (k, code) in enumerate(zip(picks, codes)):
        image = corpus.images[k]
        y0 = rng.integers(0, image.shape[0] - h + 1)
        x0 = rng.integers(0, image.shape[1] - w + 1)
        out[i] = augment(image[y0 : y0 + h, x0 : x0 + w], int(code)).astype(np.float32) / 255.0
    return out


def check_crop(crop) -> tuple[int, int]:
    crop = tuple(int(c) for c in crop)
    if len(crop) != 2 or min(crop) < 32:
        raise BadArgument("crop", f"need two sizes of at least 32 px, got {crop}")
    return crop
