"""Circles drawn on an image, coloured by composition: the picture a user checks first."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from amortize.io import to_uint8


def composition_colour(composition: np.ndarray) -> tuple[int, int, int]:
    """An RGB colour for a composition vector: the first three types map to R, G and B.

    With fewer than three types the missing channels are 0; a droplet with no dye at all is
    drawn white so that it stays visible.
    """
    c = np.zeros(3)
    k = min(3, composition.shape[-1])
    c[:k] = np.clip(composition[:k], 0, 1)
    if c.max() < 0.15:
        return (255, 255, 255)
    c = c / c.max()
    return tuple(int(round(40 + 215 * v)) for v in c)


def draw_overlay(image: np.ndarray, table: dict[str, np.ndarray], width: int | None = None):
    """(H, W, 3) uint8: `image` (float in [0, 1]) with a circle per table row.

    Circles follow the coordinate convention (centre of the top-left pixel is (0, 0)).
    """
    canvas = Image.fromarray(to_uint8(image), "RGB")
    draw = ImageDraw.Draw(canvas)
    h, w = image.shape[:2]
    width = width or max(1, round(max(h, w) / 700))
    comp_cols = sorted((k for k in table if k.startswith("comp_")), key=lambda k: int(k[5:]))
    comp = np.stack([table[k] for k in comp_cols], axis=-1) if comp_cols else np.zeros((len(table["x"]), 0))
    for i in range(len(table["x"])):
        x, y, r = float(table["x"][i]), float(table["y"][i]), float(table["radius"][i])
        draw.ellipse([x - r, y - r, x + r, y + r], outline=composition_colour(comp[i]), width=width)
    return np.asarray(canvas)
