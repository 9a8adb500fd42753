import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from amortize.checkpoint import CheckpointWarning, load_model, save_model
from amortize.errors import BadInput


def test_round_trip(tmp_path):
    params = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    save_model(tmp_path / "m", params, {"a": 1, "nested": {"b": [1, 2]}}, step=5)
    loaded, config, step = load_model(tmp_path / "m")
    np.testing.assert_array_equal(loaded["params"]["w"], params["params"]["w"])
    assert config == {"a": 1, "nested": {"b": [1, 2]}}
    assert step == 5


def test_a_model_saved_on_another_device_loads_on_this_one(tmp_path):
    """Orbax records each array's device; a model saved on a GPU machine (or the shipped one,
    saved on a CPU, read on a GPU machine) must load onto whatever device is here."""
    import jax
    import jax.numpy as jnp

    # jax arrays, as training saves: orbax records their device (numpy arrays have none).
    params = {"params": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}, "step": jnp.int32(3)}
    save_model(tmp_path / "m", params, {"a": 1}, step=5)
    sharding = tmp_path / "m" / "5" / "params" / "_sharding"
    here = jax.devices()[0]
    elsewhere = "cuda:0" if here.platform == "cpu" else "cpu:0"
    sharding.write_text(sharding.read_text().replace(f"{here.platform}:0", elsewhere))
    assert elsewhere in sharding.read_text()
    loaded, _, _ = load_model(tmp_path / "m")
    np.testing.assert_array_equal(loaded["params"]["w"], params["params"]["w"])
    assert loaded["step"].dtype == np.int32 and int(loaded["step"]) == 3
    assert loaded["params"]["w"].devices() == {here}


def test_missing(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_model(tmp_path / "nope")


def test_empty_directory(tmp_path):
    with pytest.raises(BadInput, match="no checkpoint"):
        load_model(tmp_path)


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_text("x")
    with pytest.raises(BadInput, match="directory"):
        load_model(f)


def test_corrupt(tmp_path):
    params = {"params": {"w": np.ones((4,), np.float32)}}
    save_model(tmp_path / "m", params, {"a": 1}, step=1)
    for f in (tmp_path / "m" / "1" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(BadInput, match="corrupt"):
        load_model(tmp_path / "m")


def test_incomplete(tmp_path):
    params = {"params": {"w": np.ones((4,), np.float32)}}
    save_model(tmp_path / "m", params, {"a": 1}, step=1)
    import shutil

    shutil.rmtree(tmp_path / "m" / "1" / "config")
    with pytest.raises(BadInput, match="incomplete"):
        load_model(tmp_path / "m")


def test_export_keeps_model_card_and_refuses_overwrite(tmp_path):
    from amortize.checkpoint import export_model, manager, save
    from amortize.errors import BadArgument

    params = {"params": {"w": np.ones((3,), np.float32)}}
    mgr = manager(tmp_path / "run" / "checkpoints")
    state = {"params": params, "opt_state": {"mu": np.zeros((3,), np.float32)}, "step": np.int32(9)}
    save(mgr, 9, "state", state, {"c": 1}, wait=True)
    mgr.close()
    out = tmp_path / "model"
    out.mkdir()
    (out / "MODEL_CARD.md").write_text("card")
    with pytest.raises(BadArgument, match="--force"):
        export_model(tmp_path / "run", out)
    assert export_model(tmp_path / "run", out, force=True) == 9
    loaded, config, step = load_model(out)
    np.testing.assert_array_equal(loaded["params"]["w"], 1.0)
    assert (out / "MODEL_CARD.md").read_text() == "card" and step == 9


# ---------------------------------------------------------------------------------------
# A damaged newest step: fall back to the one before, with one warning line (issue 34)

TINY_RECIPE = pathlib.Path(__file__).resolve().parents[1] / "train" / "tiny.toml"


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A workdir of train/tiny.toml holding steps 2 and 4 as `train` saves them (the state
    under `state`, the resolved recipe under `config`), their parameters the initial ones
    plus the step, so that each step's are told apart. Saved, not trained: resuming it
    trains the last two steps."""
    import json

    import jax
    import jax.numpy as jnp

    from amortize.checkpoint import CHECKPOINT_SUBDIR, manager, save
    from amortize.config import to_dict
    from amortize.train import init_state, load_recipe

    run = load_recipe(TINY_RECIPE)
    work = tmp_path_factory.mktemp("two_steps") / "work"
    work.mkdir()
    resolved = to_dict(run)
    (work / "config.json").write_text(json.dumps(resolved))
    state = init_state(run)
    mgr = manager(work / CHECKPOINT_SUBDIR)
    try:
        for step in (2, 4):
            params = jax.tree_util.tree_map(lambda a: a + step, state["params"])
            save(mgr, step, "state", {**state, "step": jnp.int32(step), "params": params}, resolved, wait=True)
    finally:
        mgr.close()
    return work


def _copy(two_steps, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(two_steps, work)
    return work, work / "checkpoints"


def _data_files(step_dir):
    """The ocdbt data files of a step's state, biggest first."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    return sorted(files, key=lambda f: f.stat().st_size, reverse=True)


def damage(step_dir, how):
    """Damage a saved step as a full disk, a bad copy or an interrupted write leaves it."""
    if how == "truncated":  # the array data, so that its reads fail while others are in flight
        big = _data_files(step_dir)[0]
        os.truncate(big, big.stat().st_size // 2)
    elif how == "truncated_all":
        for f in _data_files(step_dir):
            os.truncate(f, f.stat().st_size // 3)
    elif how == "zeroed":
        for f in _data_files(step_dir):
            f.write_bytes(bytes(f.stat().st_size))
    elif how == "broken_config":
        (step_dir / "config" / "metadata").write_text("{not json")
    elif how == "missing_config":
        shutil.rmtree(step_dir / "config")
    elif how == "missing_step_metadata":
        (step_dir / "_CHECKPOINT_METADATA").unlink()
    elif how == "broken_step_metadata":
        (step_dir / "_CHECKPOINT_METADATA").write_text("{not json")
    else:
        raise ValueError(how)


def _first_leaf(params):
    import jax

    return float(np.ravel(jax.tree_util.tree_leaves(params)[0])[0])


@pytest.mark.parametrize("how", ["truncated", "truncated_all", "zeroed", "broken_config", "missing_config"])
def test_a_damaged_newest_step_falls_back_with_one_warning(two_steps, tmp_path, monkeypatch, caplog, how):
    import gc
    import time

    work, ckpt = _copy(two_steps, tmp_path)
    intact = _first_leaf(load_model(work)[0])
    damage(ckpt / "4", how)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, config, step = load_model(work)
        # Orbax's other reads of the damaged step end after it has failed: nothing of
        # theirs may be reported, then or later ("Event loop is closed", a coroutine never
        # awaited).
        time.sleep(0.5)
        gc.collect()
    assert step == 2 and _first_leaf(params) == pytest.approx(intact - 2)
    assert config["train"]["steps"] == 4
    assert [type(w.message) for w in caught] == [CheckpointWarning], [str(w.message) for w in caught]
    line = str(caught[0].message)
    assert "\n" not in line and line.startswith(f"{ckpt / '4'}: ") and "using step 2" in line
    assert not unraisable, [str(u.exc_value)[:200] for u in unraisable]
    assert not [r for r in caplog.records if r.name == "asyncio"]  # "Task exception was never retrieved"
    # Reading a model changes nothing on disk: the damaged step is left in place, and
    # reported again by the next load.
    assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]
    assert line.endswith("(the damaged step is left in place)")
    with pytest.warns(CheckpointWarning, match="using step 2"):
        assert load_model(work)[2] == 2


@pytest.mark.parametrize("how", ["missing_step_metadata", "broken_step_metadata"])
def test_a_step_without_readable_step_metadata_still_loads(two_steps, tmp_path, caplog, how):
    # _CHECKPOINT_METADATA holds the commit time and metrics only: the step is intact.
    import logging

    work, ckpt = _copy(two_steps, tmp_path)
    damage(ckpt / "4", how)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(work)[2] == 4
    # Nor does orbax's ERROR about it reach stderr, ahead of whatever the CLI says.
    assert not [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]


def test_a_damaged_step_that_cannot_be_renamed_is_skipped(two_steps, tmp_path, monkeypatch):
    # Setting aside where the folder refuses it (read-only): the step is skipped all the same.
    from amortize.checkpoint import _read_model, latest_intact, manager

    work, ckpt = _copy(two_steps, tmp_path)
    damage(ckpt / "4", "truncated")

    def refuse(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "rename", refuse)
    mgr = manager(ckpt, read_only=True)
    try:
        with pytest.warns(CheckpointWarning, match="using step 2$"):
            step, _ = latest_intact(mgr, lambda s: _read_model(mgr, ckpt, s), set_aside=True)
    finally:
        mgr.close()
    assert step == 2 and sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]


def test_reads_in_flight_when_one_fails_end_before_their_loop_closes():
    # What orbax does on a damaged checkpoint: it gathers the reads of all arrays in a fresh
    # event loop and closes it as soon as one read fails. Reads still in flight then ended
    # on a closed loop, each with a traceback ("Event loop is closed", "Task was destroyed
    # but it is pending!", "Task exception was never retrieved").
    import asyncio

    from amortize.checkpoint import _orbax_loops_drained

    ended = []

    async def read(delay, fails):
        await asyncio.sleep(delay)
        if fails:
            raise OSError("truncated")
        ended.append(delay)

    async def restore():
        await asyncio.gather(read(0, True), read(0.05, False), read(0.1, False))

    policy = asyncio.get_event_loop_policy()
    with _orbax_loops_drained():
        loop = asyncio.new_event_loop()
        with pytest.raises(OSError):
            loop.run_until_complete(restore())
        loop.close()
    assert loop.is_closed() and ended == [0.05, 0.1]
    assert asyncio.get_event_loop_policy() is policy


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "amortize.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_predict_falls_back_with_one_warning_line(two_steps, tmp_path):
    from amortize import io

    work, ckpt = _copy(two_steps, tmp_path)
    damage(ckpt / "4", "truncated")
    image = tmp_path / "img.png"
    io.write_png(image, np.full((40, 40, 3), 0.5))
    res = _cli("predict", "--checkpoint", str(work), str(image), "--out", str(tmp_path / "o"), "--quiet")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr[:3000]
    assert lines[0].startswith(f"amortize predict: warning: {ckpt / '4'}: corrupt checkpoint (")
    assert "using step 2" in lines[0]
    assert (tmp_path / "o" / "img.csv").exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]


def test_train_resumes_from_the_step_before_a_damaged_one(two_steps, tmp_path):
    work, ckpt = _copy(two_steps, tmp_path)
    damage(ckpt / "4", "truncated")
    res = _cli("train", "--config", str(TINY_RECIPE), "--workdir", str(work), "--quiet", "--no-log")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr[:3000]
    assert lines[0].startswith(f"amortize train: warning: {ckpt / '4'}: cannot resume from this checkpoint (")
    assert "using step 2" in lines[0]
    # Steps 3 and 4 trained again from step 2; the damaged step is kept aside.
    assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4", "4.damaged"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(work)[2] == 4


def test_no_intact_step_is_one_error_line(two_steps, tmp_path):
    from amortize.train import load_recipe, train
    from amortize.writers import NullWriter

    work, ckpt = _copy(two_steps, tmp_path)
    damage(ckpt / "4", "truncated")
    damage(ckpt / "2", "zeroed")
    res = _cli("predict", "--checkpoint", str(work), "x.png", "--out", str(tmp_path / "o"), "--quiet")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr[:3000]
    assert lines[0].startswith(f"amortize predict: error: {ckpt / '4'}: corrupt checkpoint (")
    assert "no step is intact" in lines[0]
    # Nothing is renamed: a run there must not silently start again from scratch.
    assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]
    with pytest.raises(BadInput, match="no step is intact"):
        train(load_recipe(TINY_RECIPE), work, writer=NullWriter(), progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]
