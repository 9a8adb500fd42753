"""Files in and out: images to float32 RGB, droplet tables as CSV, atomic writes.

Every output goes to a temporary file in the target directory and is renamed into place, so a
crash never leaves a half-written file, and nothing is overwritten unless asked.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pathlib
import re
import tempfile
import time
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from amortize.config import DEFAULT_MAX_PIXELS
from amortize.errors import BadArgument, BadInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: Temporary files of atomic writes: `.<name>.amortize-<pid>-<random>.tmp`, beside the target.
TEMP_MARK = ".amortize-"


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, warn=None) -> np.ndarray:
    """Read an image as float32 RGB in [0, 1], shape (H, W, 3).

    Accepts PNG, JPEG and TIFF; 8- or 16-bit; grey, grey+alpha, RGB, RGBA or palette. Alpha
    is dropped (micrographs carry no transparency). Of a file with several pages or frames
    (a TIFF stack) only the first is read, and `warn` (if given) gets one line saying so.

    Raises:
        BadInput: missing, empty, truncated, not an image, an unsupported mode, too small,
            or larger than `max_pixels` (its size is read from the header, before decoding).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise BadInput(path, "no such file")
    if path.is_dir():
        raise BadInput(path, "is a directory, not an image")
    if path.stat().st_size == 0:
        raise BadInput(path, "empty file (0 bytes)")
    try:
        with _no_pillow_pixel_limit(), Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadInput(path, f"image is {w}x{h} px ({w * h / 1e6:.0f} MP), over the limit of "
                                     f"{max_pixels / 1e6:.0f} MP (raise it with --max-pixels {w * h})")
            pages = getattr(im, "n_frames", 1)
            if pages > 1 and warn is not None:
                warn(f"{path}: {pages} pages; only page 0 analysed")
            im.load()
            array = _to_float_rgb(im, path)
    except UnidentifiedImageError:
        raise BadInput(path, "not a readable image (PNG, JPEG or TIFF expected)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadInput(path, f"corrupt or truncated image ({err})") from None
    if min(array.shape[:2]) < 2:
        raise BadInput(path, f"image is too small ({array.shape[1]}x{array.shape[0]} px)")
    return array


def _to_float_rgb(im: Image.Image, path: pathlib.Path) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA"):
        a = np.asarray(im.convert("RGB") if mode in ("1", "LA") else im, np.float32) / 255.0
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, np.float32)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        a = a / top
    elif mode == "F":
        a = np.asarray(im, np.float32)
        hi = float(a.max()) if a.size else 1.0
        a = a / hi if hi > 1.0 else a
    else:
        raise BadInput(path, f"unsupported image mode {mode!r}")
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    a = a[..., :3]
    if not np.all(np.isfinite(a)):
        raise BadInput(path, "image holds non-finite values")
    return np.clip(a, 0.0, 1.0).astype(np.float32)


@contextlib.contextmanager
def _no_pillow_pixel_limit() -> Iterator[None]:
    """Pillow's own guard against decompression bombs off: `read_image` checks the size
    itself, with a message that says how to go on, instead of Pillow's warning or error."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float image -> uint8, rounding to nearest."""
    return np.clip(np.round(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    Raises:
        BadArgument: `path` exists and `force` is False.
    """
    path = pathlib.Path(path)
    if path.exists() and not force:
        raise BadArgument(path, "already exists (use --force to overwrite)")
    tmp_path = temp_beside(path)
    try:
        yield tmp_path
        publish(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def temp_beside(path: pathlib.Path, data: bytes = b"") -> pathlib.Path:
    """A new temporary file of this process beside `path` (named so that
    `remove_stale_temps` knows its writer), holding `data`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return pathlib.Path(tmp)


def publish(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Rename the temporary file `tmp` onto `path`, with the usual umask-based mode (mkstemp
    makes files private, 0600)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


#: Temporary files of versions before the writer's pid was in the name: `.<name>.<8 chars>.tmp`.
_LEGACY_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
#: Age (s) past which such a file, whose writer cannot be known, is taken as left behind.
LEGACY_TEMP_AGE_S = 600


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Remove temporary files left in `folder` by a killed run (of a process that no longer
    runs; other live processes' files are kept; files of earlier versions, which do not
    name their process, once `LEGACY_TEMP_AGE_S` old). Returns how many were removed."""
    removed = 0
    for path in pathlib.Path(folder).glob(".*.tmp"):
        if TEMP_MARK in path.name:
            try:
                pid = int(path.name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0])
            except ValueError:
                continue
            if pid != os.getpid() and _alive(pid):
                continue
        elif not _LEGACY_TEMP.match(path.name):
            continue
        try:
            if TEMP_MARK not in path.name and time.time() - path.stat().st_mtime < LEGACY_TEMP_AGE_S:
                continue
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes, force: bool = False) -> None:
    with atomic_path(path, force) as tmp:
        tmp.write_bytes(data)


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) [0, 1] float or uint8 image encoded as an 8-bit PNG."""
    array = image if np.asarray(image).dtype == np.uint8 else to_uint8(image)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def write_png(path: str | os.PathLike, image: np.ndarray, force: bool = False) -> None:
    """Write an (H, W, 3) [0, 1] float or uint8 image as an 8-bit PNG, atomically."""
    write_bytes(path, png_bytes(image), force)


def write_json(path: str | os.PathLike, data: dict, force: bool = False) -> None:
    write_bytes(path, json_bytes(data), force)


def table_to_csv(table: dict[str, np.ndarray]) -> str:
    """CSV text of a droplet table (header, then one row per droplet)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = list(table)
    writer.writerow(columns)
    values = [np.asarray(table[c]) for c in columns]
    for row in zip(*values):
        writer.writerow([f"{float(v):.4f}" for v in row])
    return buf.getvalue()


def write_table(path: str | os.PathLike, table: dict[str, np.ndarray], force: bool = False):
    write_bytes(path, table_to_csv(table).encode(), force)


def read_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a droplet table CSV into column name -> float32 array.

    Raises:
        BadInput: missing file, no header, or a non-numeric value.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise BadInput(path, "no such file")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise BadInput(path, "empty CSV (a header row is expected)")
    header, body = rows[0], rows[1:]
    try:
        data = np.array(body, dtype=np.float32).reshape(len(body), len(header))
    except ValueError:
        raise BadInput(path, "non-numeric value or ragged row in the CSV") from None
    return {name: data[:, i] for i, name in enumerate(header)}


def prepare_output_dir(path: str | os.PathLike, force: bool) -> pathlib.Path:
    """Create (or accept) an output directory, refusing a non-empty one without `force`.

    Raises:
        BadArgument: the path is a file, is not writable, or holds files and `force` is False.
    """
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise BadArgument(path, "exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise BadArgument(path, "output directory is not empty (use --force to overwrite)")
    parent = path if path.exists() else existing_parent(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadArgument(path, "output directory is not writable")
    path.mkdir(parents=True, exist_ok=True)
    return path


def existing_parent(path: pathlib.Path) -> pathlib.Path:
    """The nearest folder above `path` that exists (BadArgument if it is a file)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadArgument(path, f"{parent} is a file, not a directory")
            return parent
    return pathlib.Path("/")
