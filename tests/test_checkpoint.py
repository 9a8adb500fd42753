import numpy as np
import pytest

from amortize.checkpoint import load_model, save_model
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
