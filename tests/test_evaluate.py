import json
import subprocess
import sys

import numpy as np
import pytest

from amortize import io
from amortize.errors import BadArgument
from amortize.evaluate import cross_validated_r2, evaluate_dirs, match_tables, summarise


def table(x, y, r, comp=None):
    t = {"x": np.asarray(x, float), "y": np.asarray(y, float), "radius": np.asarray(r, float),
         "presence": np.ones(len(x))}
    if comp is not None:
        for k, col in enumerate(np.asarray(comp, float).T):
            t[f"comp_{k}"] = col
    return t


def test_perfect_and_shifted_predictions():
    truth = table([10, 30], [10, 30], [4, 4])
    m = match_tables(truth, truth)
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)
    pred = table([10.3, 30], [10, 30.4], [4.4, 4])
    s = summarise([match_tables(pred, truth)])
    assert s["f1"] == 1.0
    assert s["position_rmse_px"] == pytest.approx(np.sqrt((0.09 + 0.16) / 2))
    assert s["median_radius_rel_error"] == pytest.approx(0.05)


def test_misses_false_alarms_and_tolerance():
    truth = table([10, 30, 50], [10, 10, 10], [2, 10, 4])
    # 2 px from a radius-2 droplet is beyond max(1.5, 1.0); 4 px from radius 10 is within 5.
    pred = table([12, 34, 80], [10, 10, 10], [2, 10, 3])
    m = match_tables(pred, truth)
    assert (m.tp, m.fp, m.fn) == (1, 2, 2)
    s = summarise([m])
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 3)


def test_hungarian_beats_greedy():
    # Greedy nearest would give pred 0 to truth 1 and leave truth 0 unmatched.
    truth = table([0.0, 1.4], [0, 0], [3, 3])
    pred = table([1.0, 2.6], [0, 0], [3, 3])
    m = match_tables(pred, truth)
    assert m.tp == 2 and m.fp == 0 and m.fn == 0


def test_dont_care_small_droplets():
    truth = table([10, 30], [10, 10], [1.0, 4.0])
    found = match_tables(table([10, 30], [10, 10], [1, 4]), truth, rmin=2.0)
    assert (found.tp, found.fp, found.fn) == (1, 0, 0)
    missed = match_tables(table([30], [10], [4]), truth, rmin=2.0)
    assert (missed.tp, missed.fp, missed.fn) == (1, 0, 0)


def test_cross_validated_r2():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(200, 3))
    assert cross_validated_r2(x, 2 * x + 1) == pytest.approx(1.0)
    assert cross_validated_r2(x, rng.uniform(size=(200, 3))) < 0.1
    assert cross_validated_r2(x[:3], x[:3]) is None


def test_evaluate_dirs_reports_bad_files_and_goes_on(tmp_path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    t = table([5, 15], [5, 5], [3, 3], comp=[[0.2, 0.8], [0.9, 0.1]])
    io.write_table(truth / "a.csv", t)
    io.write_table(pred / "a.csv", t)
    io.write_table(truth / "b.csv", t)  # no prediction for b
    metrics, errors = evaluate_dirs(pred, truth)
    assert metrics["images"] == 1 and metrics["f1"] == 1.0
    assert len(errors) == 1 and "b.csv" in str(errors[0])
    with pytest.raises(BadArgument):
        evaluate_dirs(pred / "nope", truth)


def test_cli_simulated_truth_against_itself(tmp_path):
    sim = tmp_path / "sim"
    cmd = [sys.executable, "-m", "amortize.cli"]
    subprocess.run(cmd + ["simulate", "--out", str(sim), "--n", "2", "--size", "48", "40",
                          "--density", "40", "--radius-range", "1.5", "5", "--quiet"],
                   check=True, timeout=300)
    res = subprocess.run(cmd + ["evaluate", "--pred", str(sim), "--truth", str(sim),
                                "--rmin", "2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["f1"] == 1.0 and metrics["position_rmse_px"] < 1e-3
    assert metrics["composition_r2"] == pytest.approx(1.0, abs=1e-3)
    (sim / "scene_00000.csv").unlink()
    other = tmp_path / "other"
    other.mkdir()
    res = subprocess.run(cmd + ["evaluate", "--pred", str(sim), "--truth", str(other)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1


def test_bias_by_radius_bin_on_a_shifted_table():
    radii = np.array([2.0, 2.5, 4.0, 5.0, 8.0, 10.0, 15.0, 20.0])
    x, y = np.arange(8) * 60.0 + 30, np.full(8, 50.0)  # far apart: each matches its own
    truth = table(x, y, radii)
    # Small droplets predicted 0.5 px low and 2 % large; large ones 1.2 px high and 8 % small.
    small = radii < 6
    pred = table(x + np.where(small, 0.1, -0.3), y + np.where(small, 0.5, -1.2),
                 radii * np.where(small, 1.02, 0.92))
    bias = summarise([match_tables(pred, truth)])["bias_by_radius"]
    assert list(bias) == ["r<3", "3<=r<6", "6<=r<12", "r>=12"]
    for name, dx, dy, ratio in (("r<3", 0.1, 0.5, 1.02), ("3<=r<6", 0.1, 0.5, 1.02),
                                ("6<=r<12", -0.3, -1.2, 0.92), ("r>=12", -0.3, -1.2, 0.92)):
        assert bias[name]["n"] == 2
        assert bias[name]["mean_dx_px"] == pytest.approx(dx)
        assert bias[name]["mean_dy_px"] == pytest.approx(dy)
        assert bias[name]["median_radius_ratio"] == pytest.approx(ratio)
    empty = summarise([match_tables(pred, table([], [], []))])["bias_by_radius"]
    assert empty["r<3"] == {"n": 0, "mean_dx_px": None, "mean_dy_px": None, "median_radius_ratio": None}


def test_partial_truth_judges_only_predictions_on_labelled_droplets():
    truth = table([20.0, 60.0], [20.0, 20.0], [8.0, 5.0])  # two labelled of many droplets
    # A hit, a second circle inside the first droplet (6 px off: beyond the 4 px match
    # tolerance, inside its disc), and two circles on unlabelled droplets elsewhere.
    pred = table([20.5, 26.0, 100.0, 140.0], [20.0, 20.0, 60.0, 20.0], [8.0, 3.0, 6.0, 4.0])
    full = match_tables(pred, truth)
    assert (full.tp, full.fp, full.fn) == (1, 3, 1)
    part = match_tables(pred, truth, partial=True)
    assert (part.tp, part.fp, part.fn) == (1, 1, 1)


def test_cli_partial_truth_flag(tmp_path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    io.write_table(truth / "a.csv", table([20.0], [20.0], [8.0]))
    io.write_table(pred / "a.csv", table([20.2, 90.0], [20.1, 90.0], [8.0, 5.0]))
    cmd = [sys.executable, "-m", "amortize.cli", "evaluate", "--pred", str(pred), "--truth", str(truth)]
    runs = [subprocess.run(cmd + extra, capture_output=True, text=True, timeout=120) for extra in ([], ["--partial-truth"])]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    full, part = (json.loads(r.stdout) for r in runs)
    assert full["precision"] == 0.5 and part["precision"] == 1.0 and part["partial_truth"] is True


def test_region_judges_everything_centred_in_the_window_and_nothing_outside():
    # Window x in [0, 50): droplets at x 20 and 48 inside; one at 60 labelled just outside.
    truth = table([20.0, 48.0, 60.0], [20.0, 20.0, 20.0], [6.0, 6.0, 6.0])
    region = (0.0, 0.0, 50.0, 40.0)
    # A hit at 20; a false alarm in empty space inside (x 30, y 35); the droplet at 48 found
    # 2.5 px off, centred across the border (x 50.5: matched, and it counts); the one outside
    # found (not counted); a false alarm outside the window (x 90: not judged).
    pred = table([20.2, 30.0, 50.5, 60.1, 90.0], [20.0, 35.0, 20.0, 20.0, 20.0], [6, 3, 6, 6, 4])
    m = match_tables(pred, truth, region=region)
    assert (m.tp, m.fp, m.fn) == (2, 1, 0)
    missed = match_tables(table([60.0], [20.0], [6.0]), truth, region=region)
    assert (missed.tp, missed.fp, missed.fn) == (0, 0, 2)
    # Without the region every unmatched prediction counts, and the outer droplet too.
    assert (lambda a: (a.tp, a.fp, a.fn))(match_tables(pred, truth)) == (3, 2, 0)


def test_evaluate_dirs_reads_a_region_file_and_rejects_a_bad_one(tmp_path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    for stem in ("a", "b"):
        io.write_table(truth / f"{stem}.csv", table([20.0], [20.0], [6.0]))
        io.write_table(pred / f"{stem}.csv", table([20.1, 90.0], [20.0, 90.0], [6.0, 5.0]))
    (truth / "a.region.json").write_text(json.dumps({"x0": 0, "y0": 0, "x1": 50, "y1": 50}))
    metrics, errors = evaluate_dirs(pred, truth)
    assert errors == [] and metrics["labelled_regions"] == 1
    assert (metrics["tp"], metrics["fp"]) == (2, 1)  # b's stray circle counts, a's does not
    (truth / "b.region.json").write_text(json.dumps({"x0": 50, "y0": 0, "x1": 10, "y1": 50}))
    metrics, errors = evaluate_dirs(pred, truth)
    assert len(errors) == 1 and "b.region.json" in str(errors[0]) and "x0 < x1" in str(errors[0])
    assert metrics["images"] == 1


@pytest.mark.parametrize("stem", ["emulsion/droplets", "condensation/condensation"])
def test_shipped_real_truth_labels_a_full_window(stem):
    import pathlib

    from amortize.evaluate import inside, read_region

    base = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "real_truth" / stem
    region = read_region(base.with_suffix(".region.json"))
    truth = io.read_table(base.with_suffix(".csv"))
    assert inside(truth, region).sum() >= 100
    x0, y0, x1, y1 = region
    x, y, r = (np.asarray(truth[k]) for k in ("x", "y", "radius"))
    assert np.all((x >= x0 - 40) & (x < x1 + 40) & (y >= y0 - 40) & (y < y1 + 40))
    # One circle per droplet: droplets in the channel may overlap in depth (up to 6 px here),
    # but no two circles share a droplet.
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) + np.eye(len(x)) * 1e9
    assert np.all(d >= 0.75 * (r[:, None] + r[None, :]))
