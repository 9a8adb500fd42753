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
