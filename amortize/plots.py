"""Small plots drawn with Pillow (no plotting library): the refinement loss curve."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def line_plot(values: np.ndarray, title: str = "", size: tuple[int, int] = (640, 400)) -> np.ndarray:
    """A line plot of `values` against their index, as an (H, W, 3) float image in [0, 1].

    The y axis spans the finite values from their minimum to their 98th percentile (a
    single-draw ELBO has rare spikes that would flatten the rest of the curve; values above
    are drawn at the top); its ends and the last step are labelled.
    """
    w, h = size
    left, right, top, bottom = 90, 20, 30, 40
    im = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    if title:
        draw.text((left, 8), title, fill=(0, 0, 0))
    v = np.asarray(values, np.float64)
    finite = np.isfinite(v)
    if finite.sum() >= 1:
        lo, hi = float(v[finite].min()), float(np.percentile(v[finite], 98))
        span = hi - lo if hi > lo else 1.0
        n = max(len(v) - 1, 1)
        xs = left + (w - right - left) * np.arange(len(v)) / n
        ys = (h - bottom) - (h - bottom - top) * (np.clip(np.where(finite, v, hi), lo, hi) - lo) / span
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(200, 40, 40), width=2)
        draw.text((4, top - 6), f"{hi:.4g}", fill=(0, 0, 0))
        draw.text((4, h - bottom - 6), f"{lo:.4g}", fill=(0, 0, 0))
        draw.text((w - right - 60, h - bottom + 8), f"step {len(v)}", fill=(0, 0, 0))
    draw.text((left, h - bottom + 8), "0", fill=(0, 0, 0))
    return np.asarray(im, np.float32) / 255.0
