"""Detection metrics against ground-truth droplet tables.

Predictions and truths are matched one-to-one by the Hungarian algorithm on centre distance.
A pair counts when the distance is <= max(1.5 px, 0.5 * true radius). True droplets smaller
than `rmin` are "don't care": matching one is neither a hit nor a false alarm, and missing one
is not a miss.

Beside the errors' sizes, the metrics report their direction per true-radius bin
(`RADIUS_BINS`): the mean signed centre offset (prediction - truth) and the median radius
ratio (prediction / truth). A systematic bias, such as circles that ride high on real
droplets of one size, shows there while it hides in an RMSE.

A *partial* truth labels only some of an image's droplets (a hand-checked set on a real
slide). Every unlabelled droplet would then count as a false alarm, so with `partial` an
unmatched prediction is a false alarm only when its centre lies inside a labelled droplet's
disc: a second circle on a labelled droplet, or one displaced off it. Precision then speaks
for the labelled droplets only.

A *region* labels every droplet of one window of an image (`<stem>.region.json` beside the
truth table: {"x0", "y0", "x1", "y1"} in px, x0 <= x < x1 and y0 <= y < y1 of the centre). Only
what is centred in the window is judged: a true droplet outside it is "don't care", and an
unmatched prediction outside it is not a false alarm, so precision is measured in full inside
the window. The truth should also label the droplets just around the window, so that a
prediction near its border can be matched to the droplet it found.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from scipy.optimize import linear_sum_assignment

from amortize import io
from amortize.errors import AmortizeError, BadArgument, BadInput

MIN_TOLERANCE_PX = 1.5
RADIUS_TOLERANCE = 0.5
#: True-radius bins (px) of the bias report: [low, high).
RADIUS_BINS = ((0.0, 3.0), (3.0, 6.0), (6.0, 12.0), (12.0, float("inf")))


@dataclasses.dataclass
class Matches:
    """One image's matching: counts plus the matched pairs' values."""

    tp: int
    fp: int
    fn: int
    position_error: np.ndarray  # (M,) px
    radius_rel_error: np.ndarray  # (M,)
    comp_pred: np.ndarray  # (M, K)
    comp_true: np.ndarray  # (M, K)
    offset: np.ndarray  # (M, 2) px: (x, y) of prediction - truth
    radius_ratio: np.ndarray  # (M,) predicted / true radius
    true_radius: np.ndarray  # (M,) px


def _columns(table: dict, prefix: str) -> np.ndarray:
    keys = sorted((k for k in table if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))
    n = len(table["x"])
    return np.stack([table[k] for k in keys], axis=1) if keys else np.zeros((n, 0), np.float32)


def match_pairs(pred: dict, truth: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching on centre distance of one image's tables.

    Returns:
        (pairs (M, 2) of [prediction, truth] row indices, feasible (P, T): pairs close enough
        to count, dist (P, T) px).
    """
    px, py = np.asarray(pred["x"], float), np.asarray(pred["y"], float)
    tx, ty, tr = (np.asarray(truth[k], float) for k in ("x", "y", "radius"))
    tol = np.maximum(MIN_TOLERANCE_PX, RADIUS_TOLERANCE * tr)
    dist = np.hypot(px[:, None] - tx[None, :], py[:, None] - ty[None, :])
    ok = dist <= tol[None, :]
    pairs = np.zeros((0, 2), int)
    if ok.any():
        # Infeasible pairs cost more than any feasible assignment can save.
        rows, cols = linear_sum_assignment(np.where(ok, dist, 1e6))
        keep = ok[rows, cols]
        pairs = np.stack([rows[keep], cols[keep]], axis=1)
    return pairs, ok, dist


def inside(table: dict, region: tuple[float, float, float, float] | None) -> np.ndarray:
    """Whether each row's centre lies in `region` (x0, y0, x1, y1); all rows when None."""
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    if region is None:
        return np.ones(len(x), bool)
    x0, y0, x1, y1 = region
    return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


def match_tables(pred: dict, truth: dict, rmin: float = 0.0, partial: bool = False,
                 region: tuple[float, float, float, float] | None = None) -> Matches:
    """Match one image's predicted table to its ground truth (`partial`, `region`: see the
    module)."""
    tr = np.asarray(truth["radius"], float)
    care = (tr >= rmin) & inside(truth, region)
    pairs, ok, dist = match_pairs(pred, truth)
    matched_p = np.zeros(len(pred["x"]), bool)
    matched_p[pairs[:, 0]] = True
    counted = pairs[care[pairs[:, 1]]]
    # An unmatched prediction sitting on a don't-care droplet is not a false alarm either.
    near_ignored = (ok & ~care[None, :]).any(axis=1)
    false_alarm = ~matched_p & ~near_ignored & inside(pred, region)
    if partial:  # only predictions centred on a labelled droplet can be judged
        false_alarm &= (dist <= tr[None, :]).any(axis=1)
    fp = int(np.sum(false_alarm))
    tp = len(counted)
    fn = int(care.sum()) - tp
    p, t = counted[:, 0], counted[:, 1]
    comp_p, comp_t = _columns(pred, "comp_"), _columns(truth, "comp_")
    k = min(comp_p.shape[1], comp_t.shape[1])
    pr = np.asarray(pred["radius"], float)[p]
    offset = np.stack([np.asarray(pred["x"], float)[p] - np.asarray(truth["x"], float)[t],
                       np.asarray(pred["y"], float)[p] - np.asarray(truth["y"], float)[t]], axis=1)
    return Matches(
        tp=tp, fp=fp, fn=fn,
        position_error=dist[p, t],
        radius_rel_error=np.abs(pr - tr[t]) / tr[t],
        comp_pred=comp_p[p, :k], comp_true=comp_t[t, :k],
        offset=offset.reshape(-1, 2), radius_ratio=pr / tr[t], true_radius=tr[t],
    )


def cross_validated_r2(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0):
    """R^2 of predicting y (M, K) from x (M, K') by a linear fit with intercept, k-fold CV.

    Pooled over outputs: 1 - sum of squared out-of-fold errors / total sum of squares.
    None when there are too few pairs or no composition columns.
    """
    m = len(y)
    if m < 2 * folds or y.shape[1] == 0 or x.shape[1] == 0:
        return None
    order = np.random.default_rng(seed).permutation(m)
    pred = np.zeros_like(y, dtype=float)
    design = np.concatenate([x, np.ones((m, 1))], axis=1)
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        coef, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
        pred[fold] = design[fold] @ coef
    sst = np.sum((y - y.mean(axis=0)) ** 2)
    return float(1.0 - np.sum((y - pred) ** 2) / sst) if sst > 0 else None


def summarise(matches: list[Matches]) -> dict:
    """Pooled metrics over images."""
    tp = sum(m.tp for m in matches)
    fp = sum(m.fp for m in matches)
    fn = sum(m.fn for m in matches)
    pos = np.concatenate([m.position_error for m in matches]) if matches else np.zeros(0)
    rad = np.concatenate([m.radius_rel_error for m in matches]) if matches else np.zeros(0)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    r2 = None
    if matches:
        r2 = cross_validated_r2(np.concatenate([m.comp_pred for m in matches]),
                                np.concatenate([m.comp_true for m in matches]))
    return {
        "images": len(matches),
        "tp": tp, "fp": fp, "fn": fn,
        "precision": precision, "recall": recall, "f1": f1,
        "position_rmse_px": float(np.sqrt(np.mean(pos**2))) if len(pos) else None,
        "median_radius_rel_error": float(np.median(rad)) if len(rad) else None,
        "composition_r2": r2,
        "bias_by_radius": bias_by_radius(matches),
    }


def bin_name(low: float, high: float) -> str:
    """"r<3", "3<=r<6", "r>=12": a bin of `RADIUS_BINS` as a key."""
    if low == 0:
        return f"r<{high:g}"
    return f"r>={low:g}" if high == float("inf") else f"{low:g}<=r<{high:g}"


def bias_by_radius(matches: list[Matches]) -> dict:
    """Per true-radius bin: the matched pairs' count, mean signed centre offset (dx, dy, px;
    prediction - truth) and median radius ratio (prediction / truth); None where a bin is
    empty."""
    if matches:
        offset = np.concatenate([m.offset for m in matches])
        ratio = np.concatenate([m.radius_ratio for m in matches])
        radius = np.concatenate([m.true_radius for m in matches])
    else:
        offset, ratio, radius = np.zeros((0, 2)), np.zeros(0), np.zeros(0)
    report = {}
    for low, high in RADIUS_BINS:
        inside = (radius >= low) & (radius < high)
        n = int(inside.sum())
        report[bin_name(low, high)] = {
            "n": n,
            "mean_dx_px": float(offset[inside, 0].mean()) if n else None,
            "mean_dy_px": float(offset[inside, 1].mean()) if n else None,
            "median_radius_ratio": float(np.median(ratio[inside])) if n else None,
        }
    return report


def read_region(path: pathlib.Path) -> tuple[float, float, float, float]:
    """The labelled window (x0, y0, x1, y1) px of a `<stem>.region.json` file."""
    try:
        spec = json.loads(path.read_text())
        region = tuple(float(spec[k]) for k in ("x0", "y0", "x1", "y1"))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise BadInput(path, f"not a region file with numbers x0, y0, x1, y1 ({err})") from None
    if not (np.all(np.isfinite(region)) and region[0] < region[2] and region[1] < region[3]):
        raise BadInput(path, f"the region needs x0 < x1 and y0 < y1, got {region}")
    return region


def evaluate_dirs(pred_dir, truth_dir, rmin: float = 0.0,
                  partial: bool = False) -> tuple[dict, list[AmortizeError]]:
    """Evaluate every `<stem>.csv` of `truth_dir` against `pred_dir/<stem>.csv` (`partial`:
    the truth labels only some droplets; a `<stem>.region.json` beside a truth table: it
    labels every droplet of that window; see the module).

    Returns:
        (metrics dict, errors for images that could not be evaluated).
    """
    pred_dir, truth_dir = pathlib.Path(pred_dir), pathlib.Path(truth_dir)
    for d, flag in ((pred_dir, "--pred"), (truth_dir, "--truth")):
        if not d.is_dir():
            raise BadArgument(d, f"{flag} is not a directory")
    if rmin < 0:
        raise BadArgument("--rmin", f"must be >= 0, got {rmin}")
    truths = sorted(truth_dir.glob("*.csv"))
    if not truths:
        raise BadInput(truth_dir, "no ground-truth .csv files")
    matches, errors, regions = [], [], 0
    for truth_path in truths:
        try:
            region_path = truth_path.with_suffix(".region.json")
            region = read_region(region_path) if region_path.exists() else None
            pred = io.read_table(pred_dir / truth_path.name)
            truth = io.read_table(truth_path)
            for table, path in ((pred, pred_dir / truth_path.name), (truth, truth_path)):
                missing = {"x", "y", "radius"} - set(table)
                if missing:
                    raise BadInput(path, f"missing column(s) {', '.join(sorted(missing))}")
            matches.append(match_tables(pred, truth, rmin, partial, region))
            regions += region is not None
        except AmortizeError as err:
            errors.append(err)
    metrics = summarise(matches)
    metrics["rmin"] = rmin
    metrics["partial_truth"] = partial
    metrics["labelled_regions"] = regions
    return metrics, errors

