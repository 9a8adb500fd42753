"""Build hand-checked, fully labelled windows of the shared "other kinds" of droplet images.

What it does
------------
For each image listed in `SETS`, labels *every* droplet whose centre lies in a window of the
image (plus a margin around it, so that droplets on the window's border can be matched), and
writes `<set>/<stem>.csv` with `<set>/<stem>.region.json` (the window). `amortize evaluate
--truth DIR` then judges every prediction centred in the window: an unmatched one is a false
alarm, so precision is measured, not only recall. Nothing from amortize's models is used.

1. Contrast: a scalar image D that is high on what marks a droplet's edge and low on the
   background just outside it: for bright-field droplets with a dark outline, the RGB
   distance from the local background colour (masked Gaussian average of pixels near the
   image's background colour); for bright rims on a dark background (`kind` "rim"), the
   luminance above its local 10th percentile.
2. Seeds: circular Hough transform (scikit-image) on the Canny edges of D over the set's radius
   range, plus seeds added by eye (`ADDED`, x y r) for droplets the transform missed.
3. Edge points: from each seed centre, 48 rays sample D (cubic spline, 0.05 px steps). On each
   ray the edge is the droplet's physical outline: the first outward crossing, after the
   outline's contrast peak, of halfway between that peak and the level just outside it (the
   outer 50 % transition to the background). A ray is rejected when its peak is weak (below
   40 % of the droplet's median peak), when the profile does not fall near the outside
   level within a short distance, or when the crossing lies beyond 1.1 r + 1 px (a touching
   neighbour occludes the edge).
4. Circle fit: robust circle fit of `slide_truth.py` (Kasa fit, MAD outlier rejection,
   geometric least squares), four rounds from the new centre; the first searches further
   out, since a Hough radius is often that of the outline's inner edge. A fit needs inliers
   on 30 % of the rays (a packed droplet meets the background only between its
   neighbours), no angular gap over 120 degrees and a small residual.
5. De-duplication (the best fit of circles whose centres lie within half the larger radius;
   no circle centred inside a droplet twice its size, such as a condensation droplet's
   central spot or a bead of its rim), then the eye check: `--sheets DIR`
   writes the window (yellow) and its margin enlarged 3x, in overlapping tiles, with every
   circle drawn and numbered. Circles that did not sit on a droplet's outline (mostly the
   light gaps between three touching droplets, which look like small droplets) are listed
   in `EXCLUDED` by their centre and drawn red; droplets without a circle were added to
   `ADDED` and the script rerun, until every droplet centred in the window had one green
   circle on its outline.

Physical edge: an emulsion droplet (bright-field) is clear or dyed, with a dark refracting
outline; its radius is that of the outer edge of the dark outline. A condensation droplet is
a dark disc with a bright rim; the droplet is the disc plus its rim, and its radius is that
of the rim's outer edge.

Convention: image pixels, centre of the top-left pixel (0, 0), x right, y down.

Dependencies: numpy, scipy, Pillow and scikit-image (this script only; not a dependency of
amortize). Usage, from the repository root::

    .venv/bin/python benchmarks/real_truth.py --out benchmarks/real_truth --sheets /tmp/sheets
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from slide_truth import STEP as SLIDE_STEP, max_gap, outward_crossing, robust_circle  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

N_RAYS = 48
STEP = SLIDE_STEP  # the crossings are interpolated on the same grid as slide_truth.py's
#: A fit needs edge points on this fraction of the rays, with no larger angular gap between
#: them: in a packed emulsion each droplet touches six neighbours and its outline meets the
#: background only in the gaps between them.
MIN_RAYS = 0.3
MAX_GAP_DEG = 120.0

#: set -> image -> settings. window: (x0, y0, x1, y1) in px, the fully labelled region;
#: radii: the Hough search range (px); min_reach: how far past the outline's contrast peak (px,
#: at least) the profile must fall to the outside level (the condensation droplets' bright rims
#: fade out over ~4 px whatever the droplet's size); kind "rim": bright rims on a dark background.
SETS: dict[str, dict[str, dict]] = {
    "emulsion": {
        "droplets.png": {"window": (380, 20, 640, 748), "radii": (7, 16)},
    },
    "condensation": {
        "condensation.jpg": {"window": (1230, 520, 1780, 960), "radii": (2, 30), "kind": "rim",
                             "min_reach": 4.0},
    },
}
MARGIN = 40  # px labelled around each window
#: Circles rejected by eye on the sheets, by their centre (x, y) px: a fitted circle centred
#: within `EXCLUDE_PX` of one of these is left out. (set, image) -> ((x, y), ...).
EXCLUDED: dict[tuple[str, str], tuple[tuple[float, float], ...]] = {
    # Circles between touching droplets, around a droplet and its neighbour, or on the
    # empty channel beside the wall.
    ("emulsion", "droplets.png"): (
        (498, 49), (497, 97), (565, 143), (603, 140), (531, 168), (549, 425), (450, 461),
        (607, 485), (611, 516), (482, 546), (453, 554), (523, 560), (455, 603), (522, 601),
        (537, 626), (481, 743), (541, 42), (493, 56), (488, 200), (507, 220), (552, 288),
        (507, 333), (525, 401), (478, 440), (509, 462), (492, 751)),
    # Circles around a small droplet and its neighbour's rim, in the dark gaps between
    # droplets, on bright beads where two rims touch, and a second circle on one droplet;
    # beads on the rims of droplets cut by the margin's edge.
    ("condensation", "condensation.jpg"): (
        (1389, 557), (1418, 565), (1419, 574), (1446, 575), (1460, 566), (1620, 667),
        (1613, 674), (1543, 797), (1544, 791), (1574, 810), (1301, 865), (1268, 913),
        (1542, 827), (1545, 830), (1513, 854), (1361, 937), (1372, 951), (1375, 951),
        (1759, 923), (1347, 983), (1450, 980), (1781, 674),
        (1713, 485), (1714, 487), (1716, 489), (1747, 486), (1721, 493), (1733, 495),
        (1740, 492), (1743, 491), (1809, 565), (1810, 568), (1811, 571), (1803, 601),
        (1807, 597), (1810, 596), (1809, 649), (1804, 659), (1806, 654), (1801, 726),
        (1804, 724), (1809, 721), (1797, 743), (1798, 746), (1801, 751), (1807, 755),
        (1811, 757), (1808, 936), (1811, 960), (1806, 978), (1192, 654), (1198, 658),
        (1200, 664), (1201, 670), (1195, 683), (1198, 679), (1200, 676), (1191, 685),
        (1192, 940), (1193, 939), (1195, 937), (1198, 933), (1199, 929), (1381, 551),
        (1224, 916), (1420, 992), (1794, 995)),
}
EXCLUDE_PX = 3.0
#: Seeds added by eye for droplets without a circle: (set, image) -> ((x, y, r), ...).
ADDED: dict[tuple[str, str], tuple[tuple[float, float, float], ...]] = {
    ("emulsion", "droplets.png"): ((570, 173, 12),),
    ("condensation", "condensation.jpg"): (
        (1246.7, 743.3, 23), (1529.6, 841.7, 21), (1501.7, 586.7, 25), (1588.3, 608.3, 21.7), (1686.7, 918.3, 24), (1595, 740, 8),
        (1246.7, 828.3, 7), (1388.3, 831.7, 8), (1381.7, 885, 8), (1495, 869.3, 7.5),
        (1358.3, 940, 6), (1373.3, 953.3, 5.5), (1395, 796.7, 6), (1723.3, 911.7, 6),
        (1768.3, 710, 3), (1646.7, 725, 2), (1276.7, 933.3, 2.5), (1680, 860, 3),
        (1721.7, 800, 3), (1633.3, 886.7, 2), (1741.7, 943.3, 2.5)),
}


def load(path: pathlib.Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def outline_contrast(img: np.ndarray, sigma: float = 25.0) -> np.ndarray:
    """RGB distance from the local background colour (bright-field images)."""
    bg = np.broadcast_to(np.median(img.reshape(-1, 3), axis=0), img.shape)
    for _ in range(3):
        d = np.linalg.norm(img - bg, axis=2)
        mask = ndimage.binary_erosion(d < 18.0, iterations=1).astype(np.float64)
        w = ndimage.gaussian_filter(mask, sigma)
        bg = np.stack([ndimage.gaussian_filter(img[..., c] * mask, sigma) for c in range(3)], -1)
        bg = bg / np.maximum(w, 1e-6)[..., None]
    return np.linalg.norm(img - bg, axis=2)


def rim_contrast(img: np.ndarray) -> np.ndarray:
    """Luminance above its local 10th percentile (bright rims on a dark background)."""
    lum = img.mean(axis=2)
    low = ndimage.percentile_filter(lum, 10, size=41)
    return np.maximum(lum - ndimage.gaussian_filter(low, 10.0), 0.0)


def hough_seeds(contrast: np.ndarray, radii: tuple[int, int]) -> np.ndarray:
    from skimage.feature import canny
    from skimage.transform import hough_circle, hough_circle_peaks

    scale = np.percentile(contrast, 99.5)
    edges = canny(contrast / max(scale, 1e-6), sigma=1.0, low_threshold=0.1,
                  high_threshold=0.25)
    rs = np.arange(radii[0], radii[1] + 1)
    acc = hough_circle(edges, rs)
    _, cx, cy, r = hough_circle_peaks(acc, rs, min_xdistance=max(2, radii[0] // 2),
                                      min_ydistance=max(2, radii[0] // 2), threshold=0.35,
                                      total_num_peaks=5000)
    return np.stack([cx, cy, r], axis=1).astype(np.float64)


def ray_edges(coef: np.ndarray, cx: float, cy: float, r0: float, tight: bool = True,
              min_reach: float = 2.0):
    """Outer-outline points on N_RAYS rays from (cx, cy): (x, y, angle) of accepted rays."""
    ang = np.arange(N_RAYS) * 2 * np.pi / N_RAYS
    t = np.arange(0.0, 2.0 * r0 + 6.0, STEP)
    xs = cx + np.cos(ang)[:, None] * t[None, :]
    ys = cy + np.sin(ang)[:, None] * t[None, :]
    d = ndimage.map_coordinates(coef, [ys, xs], order=3, mode="nearest", prefilter=False)
    d = ndimage.gaussian_filter1d(d, 0.3 / STEP, axis=1)
    # Once r0 is the outline's radius (after the first round), the outline's contrast peak lies
    # inside it; a touching neighbour's outline lies beyond it.
    inner = (t >= 0.5 * r0) & (t <= r0) if tight else (t >= 0.3 * r0) & (t <= 1.5 * r0 + 2.0)
    peaks = np.where(inner[None, :], d, -np.inf).max(axis=1)
    ref = np.median(peaks)
    out = []
    reach = max(min_reach, 0.35 * r0)
    for k in range(N_RAYS):
        p = peaks[k]
        if p < 0.4 * ref:
            continue
        ip = int(np.argmax(np.where(inner, d[k], -np.inf)))
        after = (t > t[ip]) & (t <= t[ip] + reach)
        if not after.any():
            continue
        outside = d[k, after].min()
        if outside > 0.45 * p:  # the profile never falls to background: occluded
            continue
        te = outward_crossing(d[k], t, ip, 0.5 * (p + outside))
        if te is None:
            continue
        if tight and te > 1.1 * r0 + 1.0:  # crossed beyond a touching neighbour's outline
            continue
        out.append((cx + np.cos(ang[k]) * te, cy + np.sin(ang[k]) * te, ang[k]))
    if not out:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    a = np.array(out)
    return a[:, 0], a[:, 1], a[:, 2]


def fit_droplet(coef: np.ndarray, seed, exact_radius: bool = False,
                min_reach: float = 2.0) -> tuple | None:
    """Circle fitted to a droplet's outline from `seed` (x, y, r); None when it fails.

    A Hough seed's radius is rough (often the inner edge of a dark outline), so the first
    round searches further out; a seed placed by eye (`exact_radius`) starts tight.
    """
    cx, cy, r = seed
    fit = None
    for round_ in range(4):  # the seed's radius is rough: the first round may reach further
        tight = exact_radius or round_ > 0
        x, y, ang = ray_edges(coef, cx, cy, r, tight=tight, min_reach=min_reach)
        if len(x) < (MIN_RAYS * N_RAYS if tight else 8):
            return None
        f = robust_circle(x, y)
        if f is None:
            return None
        ncx, ncy, nr, keep, rms = f
        if not (0.6 * r - 1 < nr < 1.8 * r + 3) or np.hypot(ncx - cx, ncy - cy) > 0.4 * max(r, nr) + 1.5:
            return None
        cx, cy, r = ncx, ncy, nr
        fit = (cx, cy, r, rms, int(keep.sum()), max_gap(ang[keep]))
    cx, cy, r, rms, n, gap = fit
    if n < MIN_RAYS * N_RAYS or gap > np.deg2rad(MAX_GAP_DEG) or rms > 0.06 * r + 0.3:
        return None
    return fit


def dedupe(fits: np.ndarray) -> np.ndarray:
    """Best fit of nearly coincident circles; no circle centred inside a much larger one.

    A small circle centred inside a droplet twice its size is a spot on that droplet (the
    dark centre of a condensation droplet, a bead of its rim), not a droplet of its own.
    """
    order = np.argsort(fits[:, 3] / fits[:, 2], kind="stable")
    kept: list[int] = []
    for i in order:
        if all(np.hypot(*(fits[i, :2] - fits[j, :2])) > 0.5 * max(fits[i, 2], fits[j, 2])
               for j in kept):
            kept.append(i)
    out = fits[sorted(kept)]
    d = np.hypot(out[:, None, 0] - out[None, :, 0], out[:, None, 1] - out[None, :, 1])
    nested = ((d < out[None, :, 2]) & (out[None, :, 2] > 2.0 * out[:, None, 2])).any(axis=1)
    out = out[~nested]
    return out[np.lexsort((out[:, 0], np.round(out[:, 1] / 20.0)))]


def label_image(path: pathlib.Path, settings: dict, added) -> np.ndarray:
    """Fitted circles (cx, cy, r, rms, n, gap) of droplets centred in the window + margin."""
    img = load(path)
    h, w, _ = img.shape
    x0, y0, x1, y1 = settings["window"]
    bx0, by0 = max(0, x0 - 2 * MARGIN), max(0, y0 - 2 * MARGIN)
    bx1, by1 = min(w, x1 + 2 * MARGIN), min(h, y1 + 2 * MARGIN)
    crop = img[by0:by1, bx0:bx1]
    contrast = (rim_contrast if settings.get("kind") == "rim" else outline_contrast)(crop)
    coef = ndimage.spline_filter(contrast, order=3)
    seeds = hough_seeds(contrast, settings["radii"])
    extra = np.array([(x - bx0, y - by0, r) for x, y, r in added], np.float64).reshape(-1, 3)
    reach = settings.get("min_reach", 2.0)
    fits = [f for s in seeds if (f := fit_droplet(coef, s, min_reach=reach)) is not None]
    fits += [f for s in extra
             if (f := fit_droplet(coef, s, exact_radius=True, min_reach=reach)) is not None]
    fits = np.array(fits, np.float64).reshape(-1, 6)
    fits[:, 0] += bx0
    fits[:, 1] += by0
    inside = ((fits[:, 0] >= x0 - MARGIN) & (fits[:, 0] < x1 + MARGIN)
              & (fits[:, 1] >= y0 - MARGIN) & (fits[:, 1] < y1 + MARGIN))
    return dedupe(fits[inside]) if inside.any() else fits[:0]


def sheets(img: np.ndarray, fits: np.ndarray, drop: set, window, out_dir: pathlib.Path, stem: str,
           zoom: int = 3, tile: tuple[int, int] = (400, 200), overlap: int = 50) -> None:
    """The window (plus margin) enlarged `zoom`x in tiles, every circle drawn and numbered."""
    out_dir.mkdir(parents=True, exist_ok=True)
    x0, y0, x1, y1 = window
    x0, y0 = max(0, x0 - MARGIN), max(0, y0 - MARGIN)
    x1, y1 = min(img.shape[1], x1 + MARGIN), min(img.shape[0], y1 + MARGIN)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    tw, th = tile
    for ty in range(y0, max(y0 + 1, y1 - overlap), th - overlap):
        for tx in range(x0, max(x0 + 1, x1 - overlap), tw - overlap):
            box = (tx, ty, min(tx + tw, x1), min(ty + th, y1))
            crop = pil.crop(box).resize(((box[2] - tx) * zoom, (box[3] - ty) * zoom),
                                        Image.BICUBIC)
            dr = ImageDraw.Draw(crop)
            wx0, wy0, wx1, wy1 = window
            dr.rectangle(((wx0 - tx) * zoom, (wy0 - ty) * zoom, (wx1 - tx) * zoom,
                          (wy1 - ty) * zoom), outline=(255, 255, 0))
            for i, (cx, cy, r) in enumerate(fits[:, :3]):
                px, py, pr = (cx - tx + 0.5) * zoom, (cy - ty + 0.5) * zoom, r * zoom
                if -pr < px < crop.width + pr and -pr < py < crop.height + pr:
                    colour = (255, 0, 0) if i in drop else (0, 255, 0)
                    dr.ellipse((px - pr, py - pr, px + pr, py + pr), outline=colour)
                    dr.text((px - 6, py - 6), str(i), fill=(255, 0, 0))
                    dr.point((px, py), fill=(255, 0, 255))
            crop.save(out_dir / f"{stem}_{ty:04d}_{tx:04d}.png")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "real_truth"))
    ap.add_argument("--sheets", default=None, help="directory for the eye-check sheets")
    ap.add_argument("--only", default=None, help="one image's file name")
    args = ap.parse_args(argv)
    for set_name, images in SETS.items():
        for name, settings in images.items():
            if args.only and name != args.only:
                continue
            path = SHARED / set_name / name
            fits = label_image(path, settings, ADDED.get((set_name, name), ()))
            ids = np.arange(len(fits))
            bad = np.array(EXCLUDED.get((set_name, name), ()), np.float64).reshape(-1, 2)
            near = np.hypot(fits[:, None, 0] - bad[None, :, 0], fits[:, None, 1] - bad[None, :, 1])
            drop = set(np.nonzero((near <= EXCLUDE_PX).any(axis=1))[0].tolist())
            if args.sheets:
                sheets(load(path), fits, drop, settings["window"], pathlib.Path(args.sheets) / set_name,
                       pathlib.Path(name).stem)
            keep = np.array([i not in drop for i in ids], bool)
            out = pathlib.Path(args.out) / set_name
            out.mkdir(parents=True, exist_ok=True)
            stem = pathlib.Path(name).stem
            with open(out / f"{stem}.csv", "w", newline="") as f:
                wr = csv.writer(f)
                wr.writerow(["x", "y", "radius", "presence", "fit_rms_px", "edge_points", "id"])
                for i in ids[keep]:
                    cx, cy, r, rms, n, _ = fits[i]
                    wr.writerow([f"{cx:.4f}", f"{cy:.4f}", f"{r:.4f}", 1, f"{rms:.4f}", int(n),
                                 int(i)])
            x0, y0, x1, y1 = settings["window"]
            (out / f"{stem}.region.json").write_text(json.dumps(
                {"x0": x0, "y0": y0, "x1": x1, "y1": y1}) + "\n")
            x, y = fits[keep, 0], fits[keep, 1]
            n_in = int(np.sum((x >= x0) & (x < x1) & (y >= y0) & (y < y1)))
            r = fits[keep, 2]
            print(f"{set_name}/{name}: {len(fits)} fitted, {len(drop)} excluded, {int(keep.sum())} "
                  f"kept, {n_in} in the window, r {r.min() if r.size else 0:.1f}-"
                  f"{r.max() if r.size else 0:.1f} px")


if __name__ == "__main__":
    main()
