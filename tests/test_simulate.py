import numpy as np
import pytest

from amortize.droplets import table_columns
from amortize.errors import BadArgument
from amortize.simulate import simulate


def test_returns_images_and_tables(tiny_sim):
    sim = simulate(3, (40, 32), seed=0, config=tiny_sim)
    assert sim.images.shape == (3, 32, 40, 3)
    assert sim.overflow == 0
    for table in sim.tables:
        assert list(table) == table_columns(3)
        assert np.all(table["presence"] == 1.0)
        assert np.all((table["x"] >= -0.5) & (table["x"] < 39.5))
        assert np.all((table["y"] >= -0.5) & (table["y"] < 31.5))
        assert np.all((table["radius"] >= 1.5) & (table["radius"] <= 6.0))
    assert sum(len(t["x"]) for t in sim.tables) > 0


# One size and count throughout (plus one single scene): each (count, size) is a program of
# its own, 4-6 s to compile.
def test_same_seed_same_output_and_scene_independent_of_count(tiny_sim):
    a = simulate(3, (40, 32), seed=7, config=tiny_sim)
    b = simulate(3, (40, 32), seed=7, config=tiny_sim)
    np.testing.assert_array_equal(a.images, b.images)
    one = simulate(1, (40, 32), seed=7, config=tiny_sim)
    np.testing.assert_allclose(one.images[0], a.images[0], atol=1.5 / 255)
    np.testing.assert_array_equal(one.tables[0]["x"], a.tables[0]["x"])
    c = simulate(1, (40, 32), seed=8, config=tiny_sim)
    assert not np.array_equal(c.images[0], a.images[0])


def test_images_are_not_blank(tiny_sim):
    sim = simulate(3, (40, 32), seed=1, config=tiny_sim)
    assert sim.images.std(axis=(1, 2, 3)).min() > 0.01


@pytest.mark.parametrize("n, size", [(0, (8, 8)), (-1, (8, 8)), (1, (0, 8)), (1, (8, 20000))])
def test_bad_requests(n, size):
    with pytest.raises(BadArgument):
        simulate(n, size)


def test_cli_simulate_with_a_models_look(tmp_path):
    """`--look MODEL` draws the droplets with the model's decoder: same scenes (same truth),
    another appearance; a folder that is not a model is one line."""
    import json
    import pathlib
    import subprocess
    import sys

    from amortize import io

    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "amortize.cli", "simulate", "--n", "1", "--size", "48", "40", "--seed", "3",
           "--density", "40", "--radius-range", "3", "8", "--quiet"]
    built_in, learned = tmp_path / "a", tmp_path / "b"
    subprocess.run(cmd + ["--out", str(built_in)], check=True, timeout=300)
    subprocess.run(cmd + ["--out", str(learned), "--look", str(root / "checkpoints" / "default")],
                   check=True, timeout=300)
    assert (built_in / "scene_00000.csv").read_text() == (learned / "scene_00000.csv").read_text()
    a, b = (io.read_image(d / "scene_00000.png") for d in (built_in, learned))
    assert np.abs(a - b).max() > 0.05
    assert "decoder of the model" in json.loads((learned / "manifest.json").read_text())["optics"]
    res = subprocess.run(cmd + ["--out", str(tmp_path / "c"), "--look", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1, res.stderr
