"""Subprocess smoke tests of the console script."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from amortize import io

TINY = ["--density", "30", "--radius-range", "1.5", "5"]


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "amortize.cli", *args], capture_output=True,
                          text=True, timeout=300, **kw)


def test_simulate_round_trip(tmp_path):
    out = tmp_path / "sim"
    res = run("simulate", "--out", str(out), "--n", "2", "--size", "40", "24", "--seed", "3",
              "--quiet", *TINY)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["size"] == [40, 24]
    assert manifest["config"]["scene"]["density"] == 30.0
    assert "jax" in manifest["versions"]
    for stem in manifest["stems"]:
        img = io.read_image(out / f"{stem}.png")
        assert img.shape == (24, 40, 3)
        table = io.read_table(out / f"{stem}.csv")
        assert list(table) == ["x", "y", "radius", "presence", "comp_0", "comp_1", "comp_2"]
    # Same seed again (with --force): identical files.
    first = (out / "scene_00000.png").read_bytes()
    res = run("simulate", "--out", str(out), "--n", "2", "--size", "40", "24", "--seed", "3",
              "--quiet", "--force", *TINY)
    assert res.returncode == 0, res.stderr
    assert (out / "scene_00000.png").read_bytes() == first


def test_simulate_with_a_hard_core_never_overlaps(tmp_path):
    out = tmp_path / "sim"
    res = run("simulate", "--out", str(out), "--n", "1", "--size", "64", "48", "--quiet",
              "--min-separation", "1", *TINY)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["config"]["scene"]["min_separation"] == 1
    t = io.read_table(out / "scene_00000.csv")
    assert len(t["x"]) > 5
    gap = np.hypot(t["x"][:, None] - t["x"], t["y"][:, None] - t["y"]) - (t["radius"][:, None] + t["radius"])
    np.fill_diagonal(gap, np.inf)
    assert gap.min() >= -1e-3


@pytest.mark.parametrize(
    "args, words",
    [
        (["--n", "0", "--size", "16", "16"], "--n"),
        (["--n", "2", "--size", "0", "16"], "--size"),
        (["--n", "2", "--size", "16", "16385"], "exceeds"),
        (["--n", "2", "--size", "16", "16", "--radius-range", "5", "2"], "--radius-range"),
        (["--n", "2", "--size", "16", "16", "--density", "-1"], "density"),
        (["--n", "two", "--size", "16", "16"], "invalid int"),
        (["--n", "2", "--size", "16", "16", "--min-separation", "2"], "min_separation"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_no_files(tmp_path, args, words):
    out = tmp_path / "never"
    res = run("simulate", "--out", str(out), *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert not out.exists()


def test_non_empty_or_unwritable_output_dir(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    res = run("simulate", "--out", str(full), "--n", "1", "--size", "16", "16")
    assert res.returncode == 2 and "not empty" in res.stderr and str(full) in res.stderr
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run("simulate", "--out", str(blocker / "sub"), "--n", "1", "--size", "16", "16")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


def test_bench_render_quick_prints_json_lines():
    res = run("bench", "render", "--quick")
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.strip().splitlines()]
    names = {r["name"] for r in records}
    assert {"render_forward", "render_value_and_grad", "simulate_write"} <= names
    assert {r.get("geometry") for r in records if r["name"] == "render_forward"} == {"free", "anchored"}
    assert all(np.isfinite(r["median_ms"]) and r["median_ms"] > 0 for r in records)


def test_config_file_sets_the_prior_and_bad_toml_is_one_line(tmp_path, capsys):
    from amortize.cli import main

    recipe = tmp_path / "sim.toml"
    recipe.write_text(
        "[simulation.scene]\ndensity = 25.0\nradius_min = 1.5\nradius_max = 4.0\n"
        "[simulation.render]\ntile = 4\nlevels = 3\n"
    )
    out = tmp_path / "out"
    assert main(["simulate", "--out", str(out), "--n", "1", "--size", "24", "24",
                 "--config", str(recipe), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["scene"]["density"] == 25.0
    assert manifest["config"]["render"]["tile"] == 4

    bad = tmp_path / "bad.toml"
    bad.write_text("[simulation.scene]\ndensty = 3\n")
    assert main(["simulate", "--out", str(tmp_path / "x"), "--n", "1", "--size", "24", "24",
                 "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "densty" in err[0]
    assert not (tmp_path / "x").exists()


RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "train"


def test_train_then_predict_with_the_workdir(tmp_path):
    work = tmp_path / "run"
    res = run("train", "--config", str(RECIPES / "tiny.toml"), "--workdir", str(work), "--quiet")
    assert res.returncode == 0, res.stderr
    assert (work / "config.json").exists() and (work / "checkpoints" / "4").is_dir()
    assert any((work / "logs").iterdir())  # tensorboard events
    # (A finished run started again: tests/test_train.py.)

    image = tmp_path / "img.png"
    io.write_png(image, np.random.default_rng(0).uniform(size=(40, 56, 3)))
    out = tmp_path / "pred"
    res = run("predict", str(image), "--out", str(out), "--checkpoint", str(work), "--quiet")
    assert res.returncode == 0, res.stderr
    table = io.read_table(out / "img.csv")
    assert list(table)[:4] == ["x", "y", "radius", "presence"] and "radius_std" in table
    summary = json.loads((out / "img.json").read_text())
    assert summary["count"] == len(table["x"]) and summary["image_size"] == [56, 40]
    assert summary["scale"] in (1.0, 0.5, 0.25) and "scale_search" in summary  # --scale auto


def test_predict_bad_inputs_one_line_each_and_exit_1(tmp_path, tiny_model_dir):
    good = tmp_path / "good.png"
    io.write_png(good, np.random.default_rng(0).uniform(size=(40, 40, 3)))
    (tmp_path / "zero.jpg").write_bytes(b"")
    res = run("predict", str(good), str(tmp_path / "zero.jpg"), str(tmp_path / "missing.tif"),
              "--out", str(tmp_path / "out"), "--checkpoint", str(tiny_model_dir), "--quiet")
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 2 and "zero.jpg" in errors[0] and "missing.tif" in errors[1]
    assert "Traceback" not in res.stderr
    assert (tmp_path / "out" / "good.csv").exists()


def test_predict_a_huge_image_is_one_line_and_the_rest_still_run(tmp_path, tiny_model_dir):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("1", (20000, 20000)).save(folder / "huge.png")  # 400 MP, a few kB on disk
    io.write_png(folder / "good.png", np.random.default_rng(0).uniform(size=(40, 40, 3)))
    stack = [Image.new("L", (48, 40), 128), Image.new("L", (48, 40), 20)]
    stack[0].save(folder / "stack.tif", save_all=True, append_images=stack[1:])
    out = tmp_path / "out"
    res = run("predict", str(folder), "--out", str(out), "--checkpoint", str(tiny_model_dir), "--quiet")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, res.stderr
    assert "huge.png" in lines[0] and "20000x20000" in lines[0] and "--max-pixels" in lines[0]
    assert "stack.tif" in lines[1] and "2 pages; only page 0 analysed" in lines[1]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}.{kind}" for stem in ("good", "stack") for kind in ("csv", "json", "overlay.png"))


@pytest.mark.parametrize("make", ["missing", "empty", "corrupt"])
def test_predict_bad_checkpoint_is_one_line(tmp_path, make):
    ckpt = tmp_path / "ckpt"
    if make != "missing":
        ckpt.mkdir()
    if make == "corrupt":
        (ckpt / "3").mkdir()
        (ckpt / "3" / "params").write_text("junk")
        (ckpt / "3" / "config").write_text("junk")
    image = tmp_path / "a.png"
    io.write_png(image, np.full((40, 40, 3), 0.5))
    res = run("predict", str(image), "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert str(ckpt) in res.stderr


@pytest.mark.parametrize("option, value", [("--threshold", "2"), ("--scale", "big"), ("--scale", "0")])
def test_predict_bad_threshold_or_scale_exit_2(tmp_path, option, value):
    res = run("predict", "x.png", "--out", str(tmp_path / "o"), option, value)
    assert res.returncode == 2 and option in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_refine_round_trip_bad_inputs_and_no_overwrite(tmp_path, tiny_model_dir, tiny_sim):
    from amortize.simulate import simulate

    good = tmp_path / "good.png"
    io.write_png(good, simulate(1, (48, 48), seed=4, config=tiny_sim).images[0])
    (tmp_path / "zero.png").write_bytes(b"")
    out = tmp_path / "refined"
    # Not the defaults: the --force run below repeats these flags, so its programs come from
    # the session's compilation cache; and the image's size and these flags are those of the
    # fine-tuned run in tests/test_refine.py (frozen optics), so one compiled SVI run serves both.
    args = ["--out", str(out), "--checkpoint", str(tiny_model_dir), "--steps", "10", "--device", "cpu",
            "--no-freeze-optics", "--fit-stop", "always"]
    res = run("refine", str(good), str(tmp_path / "zero.png"), *args, "--quiet")
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "zero.png" in errors[0] and "Traceback" not in res.stderr
    for suffix in ("csv", "recon.png", "residual.png", "loss.png", "json"):
        assert (out / f"good.{suffix}").exists(), suffix
    table = io.read_table(out / "good.csv")
    assert list(table) == ["x", "y", "radius", "presence", "comp_0", "comp_1", "comp_2",
                           "x_std", "y_std", "radius_std"]
    meta = json.loads((out / "good.json").read_text())
    assert meta["steps"] == 10 and meta["device"].startswith("cpu") and meta["config"]["fit_stop"] == "always"
    assert {"recon_rmse_before", "recon_rmse_after", "wall_s", "converged"} <= set(meta)
    assert io.read_image(out / "good.recon.png").shape == (48, 48, 3)
    # The programs the run traced are in the program store (the session's cache)...
    store = pathlib.Path(os.environ["AMORTIZE_CACHE_DIR"]) / "programs"
    stored = {p.name: p.stat().st_mtime_ns for p in store.glob("*.program")}
    assert stored
    # Complete outputs of the same settings are skipped; of other settings, kept unless --force.
    before = (out / "good.csv").read_bytes()
    res = run("refine", str(good), *args)
    assert res.returncode == 0 and "1 skipped" in res.stdout and not res.stderr, res.stderr
    res = run("refine", str(good), *["9" if a == "10" else a for a in args], "--quiet")  # --steps 9
    assert res.returncode == 1 and "other settings" in res.stderr and "--force" in res.stderr, res.stderr
    assert (out / "good.csv").read_bytes() == before
    (out / "good.csv").write_text("stale")
    res = run("refine", str(good), *args, "--quiet", "--force")
    assert res.returncode == 0, res.stderr
    assert (out / "good.csv").read_bytes() == before  # overwritten, and the run is deterministic
    meta = json.loads((out / "good.json").read_text())
    assert len(meta["fit_rmse_per_check"]) == 2
    # ... and the same run in a new process loaded them: it traced and stored nothing new.
    assert {p.name: p.stat().st_mtime_ns for p in store.glob("*.program")} == stored


def test_refine_lr_sets_the_step_size_at_every_scale():
    from amortize.cli import build_parser, refine_config
    from amortize.config import RefineConfig

    config = refine_config(build_parser().parse_args(["refine", "x.png", "--out", "o", "--lr", "0.05"]))
    assert config.learning_rate == config.enlarged_learning_rate == 0.05
    defaults = refine_config(build_parser().parse_args(["refine", "x.png", "--out", "o"]))
    assert defaults == RefineConfig(fit_stop=defaults.fit_stop)
    assert (defaults.learning_rate, defaults.enlarged_learning_rate) == (0.02, 0.03)


def test_refine_bad_device_and_steps_exit_2(tmp_path):
    res = run("refine", "x.png", "--out", str(tmp_path / "o"), "--device", "tpu")
    assert res.returncode == 2 and "--device" in res.stderr and "Traceback" not in res.stderr
    res = run("refine", "x.png", "--out", str(tmp_path / "o"), "--steps", "0")
    assert res.returncode == 2 and "steps" in res.stderr
    res = run("refine", "x.png", "--out", str(tmp_path / "o"), "--fit-stop", "sometimes")
    assert res.returncode == 2 and "--fit-stop" in res.stderr
    assert not (tmp_path / "o").exists()


def test_fit_stop_choices_are_refinements():
    from amortize.cli import build_parser
    from amortize.config import FIT_STOPS, RefineConfig

    refine_parser = build_parser()._subparsers._group_actions[0].choices["refine"]
    (fit_stop,) = [a for a in refine_parser._actions if a.dest == "fit_stop"]
    assert tuple(fit_stop.choices) == FIT_STOPS and fit_stop.default == RefineConfig().fit_stop


def _bench(capsys, *args) -> list[dict]:
    """`amortize bench ...` in this process (the subprocess path is `bench render`'s test):
    its programs then share the session's compilation cache with the other tests."""
    from amortize.cli import main

    assert main(["bench", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_bench_predict_quick(tiny_model_dir, capsys):
    records = _bench(capsys, "predict", "--quick", "--checkpoint", str(tiny_model_dir))
    assert [r["name"] for r in records] == ["predict_warm", "predict_cli_cold_cache", "predict_cli_warm_cache"]


def test_bench_train_quick(capsys):
    records = _bench(capsys, "train", "--quick")
    assert [r["name"] for r in records] == ["train_step", "wake_step"]
    assert records[0]["scenes_per_second"] > 0 and records[1]["crops_per_second"] > 0


def test_bench_refine_quick(tiny_model_dir, capsys):
    records = _bench(capsys, "refine", "--quick", "--checkpoint", str(tiny_model_dir))
    assert [r["name"] for r in records] == ["refine_time_to_quality", "refine_time_to_quality_vs_notebook"]
    assert records[0]["encoder_steps_to_target"] >= 1
    assert records[1]["encoder_steps_to_target"] >= 1 and records[1]["notebook_best_rmse"] > 0
    assert records[1]["notebook_best_at_step"] >= 1
    assert records[1]["encoder_steps_to_notebook_best"] is None or records[1]["encoder_steps_to_notebook_best"] >= 1


def test_train_with_data_adapts_a_frozen_encoder_and_predict_writes_reconstructions(tmp_path, tiny_model_dir,
                                                                                   tiny_sim):
    import jax

    from amortize.checkpoint import load_model, save_model
    from amortize.optics import default_optics_params
    from amortize.readout import ReadoutConfig, init_readout
    from amortize.simulate import simulate

    data = tmp_path / "corpus"
    data.mkdir()
    # tests/test_adapt.py's corpus: the same simulation program.
    for i, image in enumerate(simulate(3, (96, 80), seed=5, config=tiny_sim).images):
        io.write_png(data / f"img{i}.png", image)
    (data / "broken.png").write_bytes(b"")
    # The --init model has a fitted composition read-out, which a frozen encoder keeps.
    params, config, step = load_model(tiny_model_dir)
    init = tmp_path / "init"
    save_model(init, {**params, "readout": {**init_readout(ReadoutConfig(), 3, 3), "fitted": np.ones((), np.int32)}},
               config, step)
    work = tmp_path / "adapt"
    # The tiny recipe with a frozen encoder and no sleep phase (tests/test_adapt.py runs the
    # whole cycle in-process): 2 wake steps, then 2 of the final optics fit.
    text = (RECIPES / "adapt_tiny.toml").read_text()
    assert "sleep_steps = 2" in text
    recipe = tmp_path / "adapt.toml"
    recipe.write_text(text.replace("sleep_steps = 2", "sleep_steps = 0\nencoder_learning_rate = 0.0"))
    res = run("train", "--config", str(recipe), "--data", str(data),
              "--workdir", str(work), "--init", str(init), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "broken.png: skipped, empty file" in res.stderr
    adapted, _, step = load_model(work)
    assert step == 4 and "decoder" in adapted and "readout" in adapted
    # The encoder is the --init one, bit for bit; the wake steps taught the decoder.
    same = jax.tree_util.tree_map(np.array_equal, adapted["params"], params["params"])
    assert all(jax.tree_util.tree_leaves(same))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), adapted["decoder"]["optics"],
                                   default_optics_params(3, 3))
    assert max(jax.tree_util.tree_leaves(moved)) > 0

    out = tmp_path / "pred"
    res = run("predict", str(data / "img0.png"), "--out", str(out), "--checkpoint", str(work),
              "--reconstruction", "--quiet")
    assert res.returncode == 0, res.stderr
    assert (out / "img0.recon.png").exists() and (out / "img0.residual.png").exists()
    summary = json.loads((out / "img0.json").read_text())
    assert 0 <= summary["recon_rmse"] < 1


def test_train_with_data_refuses_an_amortize_adapt_only_option_in_one_line(tmp_path, tiny_model_dir):
    data = tmp_path / "corpus"
    data.mkdir()
    io.write_png(data / "img0.png", np.random.default_rng(0).uniform(size=(96, 80, 3)))
    recipe = tmp_path / "adapt.toml"
    recipe.write_text((RECIPES / "adapt_tiny.toml").read_text().replace("[adapt]\n", "[adapt]\nanchor_look_fraction = 1.0\n"))
    res = run("train", "--config", str(recipe), "--data", str(data), "--workdir", str(tmp_path / "w"),
              "--init", str(tiny_model_dir), "--quiet")
    assert res.returncode != 0 and not (tmp_path / "w").exists()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "adapt.toml" in lines[0] and "anchor_look_fraction" in lines[0], res.stderr


@pytest.mark.parametrize("extra, words, code", [
    (["--data", "EMPTY"], "no PNG, JPEG or TIFF", 1),
    (["--init", "checkpoints/default"], "--init: only applies with --data", 2),
])
def test_train_bad_corpus_or_init_is_one_line(tmp_path, extra, words, code):
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if a == "EMPTY" else a for a in extra]
    res = run("train", "--config", str(RECIPES / "adapt_tiny.toml"), *extra,
              "--workdir", str(tmp_path / "w"), "--quiet")
    assert res.returncode == code, res.stderr
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bench_refine_defaults_to_the_model_that_draws_simulated_scenes(monkeypatch):
    # Its scene is simulated: the shipped default's decoder draws the real slide instead.
    from amortize import bench
    from amortize.predict import SIMULATED_CHECKPOINT, Predictor

    loaded = []

    def load(path=None):
        loaded.append(path)
        raise RuntimeError("stop here")

    monkeypatch.setattr(Predictor, "load", staticmethod(load))
    with pytest.raises(RuntimeError, match="stop here"):
        bench.run_refine_bench(quick=True)
    assert loaded == [SIMULATED_CHECKPOINT]
    assert SIMULATED_CHECKPOINT.is_dir()


def test_help_does_not_import_the_library():
    code = ("import sys; from amortize import cli; cli.build_parser(); "
            "import amortize; amortize.__version__; print(sorted(m for m in ('jax', 'numpyro', 'flax') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr



_CHECK_ONLY = """
import sys
from amortize.cli import main
codes = [main(line.split()) for line in sys.argv[1:]]
print(codes, sorted(m for m in ('jax', 'numpy', 'numpyro') if m in sys.modules))
"""


def test_bad_arguments_are_reported_before_the_library_is_imported(tmp_path):
    bad = ["simulate --out o --n 0 --size 16 16", "simulate --out o --n 1 --size 16 16 --radius-range 5 2",
           "predict x.png --out o --threshold 2", "predict x.png --out o --scale 0",
           "refine x.png --out o --steps 0", "refine x.png --out o --lr -1 --scale big",
           "train --config c.toml --workdir w --init m"]
    res = subprocess.run([sys.executable, "-c", _CHECK_ONLY, *bad], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert res.stdout.strip() == f"{[2] * len(bad)} []", res.stdout + res.stderr
    errors = res.stderr.strip().splitlines()
    words = ["--n:", "--radius-range:", "--threshold:", "--scale:", "steps:", "lr:", "--init:"]
    assert len(errors) == len(bad) and all(f": error: {w}" in e for e, w in zip(errors, words)), errors
    assert list(tmp_path.iterdir()) == []  # nothing written

def test_the_package_exports_its_public_names_on_first_use():
    import amortize

    for name in amortize.__all__:
        assert getattr(amortize, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        amortize.no_such_name  # noqa: B018


def test_predict_killed_at_random_moments_leaves_every_image_complete_or_absent(tmp_path, tiny_model_dir):
    """kill -9 a folder run five times, at random moments while it writes; after each, every
    image has all its outputs or none (a kill between two renames, microseconds apart, could
    leave one incomplete: a later run redoes it), and a rerun without --force finishes."""
    import signal
    import time

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(11)
    for i in range(20):
        io.write_png(src / f"im{i:02d}.png", rng.uniform(size=(40, 40 + 8 * (i % 3), 3)))
    cmd = [sys.executable, "-m", "amortize.cli", "predict", str(src), "--checkpoint", str(tiny_model_dir),
           "--quiet"]
    kinds = ("csv", "overlay.png", "json")

    def names(out):
        return {p.name for p in out.iterdir()} if out.exists() else set()

    def run_until_it_writes(out, *extra):
        """Start a run; return it and the seconds from start to its first new file."""
        before, start = names(out), time.perf_counter()
        proc = subprocess.Popen(cmd + ["--out", str(out), *extra], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and names(out) == before:
            time.sleep(0.005)
        return proc, time.perf_counter() - start

    def complete(out):
        """Images whose outputs are all there; the others must have none, unless the kill
        came mid-commit: then the commit journal is there, and a rerun redoes the image."""
        found = names(out)
        done = 0
        for i in range(20):
            present = [f"im{i:02d}.{k}" in found for k in kinds]
            committing = f".im{i:02d}.amortize-commit" in found
            assert all(present) or not any(present) or committing, (i, sorted(found))
            done += all(present) and not committing
        return done

    whole = tmp_path / "whole"
    assert subprocess.run(cmd + ["--out", str(whole)], capture_output=True, timeout=300).returncode == 0
    # How long writing the 20 images takes once every program is compiled: a warm rerun.
    def stamp(path):  # a commit removes the earlier JSON before it renames the new one in
        return path.stat().st_mtime_ns if path.exists() else None

    last = stamp(whole / "im19.json")
    proc, _ = run_until_it_writes(whole, "--force")
    start = time.perf_counter()
    while proc.poll() is None and stamp(whole / "im19.json") in (last, None):
        time.sleep(0.002)
    writing = time.perf_counter() - start
    assert proc.wait(timeout=300) == 0
    out, counts = tmp_path / "out", []
    moments = rng.uniform(0.0, writing, 5)
    for moment in moments:
        proc, _ = run_until_it_writes(out)
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        counts.append(complete(out))
    assert any(0 < n < 20 for n in counts), counts  # some kill came mid-folder
    res = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert complete(out) == 20
    assert names(out) == {f"im{i:02d}.{k}" for i in range(20) for k in kinds}  # no *.tmp left
    for i in range(20):  # the same answers as the uninterrupted run
        assert (out / f"im{i:02d}.csv").read_bytes() == (tmp_path / "whole" / f"im{i:02d}.csv").read_bytes()
