"""The program store: programs traced once are loaded, not traced, by a later process."""

import hashlib
import json
import os
import pathlib
import pickle
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortize import program_store
from amortize.program_store import StoredProgram, set_store, stored_jit

TRACES = []


def scaled_sum(x, y, factor, offset=0.0):
    TRACES.append(factor)  # runs only when traced
    return {"sum": (x + y["b"]) * factor + offset, "n": x.shape[0]}


@pytest.fixture
def store(tmp_path):
    before = program_store.store()
    set_store(tmp_path / "programs")
    TRACES.clear()
    yield tmp_path / "programs"
    set_store(before)


def args():
    return jnp.arange(3.0), {"b": np.ones(3, np.float32)}


def test_a_later_process_loads_the_program_instead_of_tracing_it(store):
    first = stored_jit(scaled_sum, static_argnames="factor")
    want = jax.jit(scaled_sum, static_argnames="factor")(*args(), factor=2.0)
    got = first(*args(), factor=2.0)
    np.testing.assert_array_equal(got["sum"], want["sum"])
    assert got["n"] == 3 and len(list(store.glob("*.program"))) == 1
    TRACES.clear()
    # A fresh object stands for a fresh process: nothing in memory, the file on disk.
    again = stored_jit(scaled_sum, static_argnames="factor")(*args(), factor=2.0)
    assert TRACES == []
    np.testing.assert_array_equal(again["sum"], want["sum"])
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(want)


def test_static_arguments_by_position_or_name_and_their_values_name_programs(store):
    program = stored_jit(scaled_sum, static_argnames="factor")
    x, y = args()
    np.testing.assert_array_equal(program(x, y, 3.0)["sum"], (x + 1) * 3)
    np.testing.assert_array_equal(program(x, y, factor=3.0)["sum"], (x + 1) * 3)
    np.testing.assert_array_equal(program(x, y, factor=4.0, offset=1.0)["sum"], (x + 1) * 4 + 1)
    # Static by position and by name (two programs, as with jax.jit), and per value.
    assert sorted(TRACES) == [3.0, 3.0, 4.0] and program.program_count() == 3
    with pytest.raises(ValueError, match="hash"):  # as jax.jit: a static array is an error
        program(x, y, factor=jnp.ones(2))


def test_weak_and_strong_arguments_share_a_program(store):
    program = stored_jit(scaled_sum, static_argnames="factor")
    x, y = args()
    program(x, y, factor=2.0, offset=jnp.float32(1.0))
    program(x, y, factor=2.0, offset=1.0)  # a Python float: weakly typed
    program(x, y, factor=2.0, offset=jnp.asarray(1.0))
    assert TRACES == [2.0] and program.program_count() == 1


def test_the_key_names_what_a_closure_captures(store):
    def make(power):
        return stored_jit(lambda x: x**power, key=("power", power))

    np.testing.assert_array_equal(make(2)(jnp.arange(3.0)), [0, 1, 4])
    np.testing.assert_array_equal(make(3)(jnp.arange(3.0)), [0, 1, 8])
    assert len(list(store.glob("*.program"))) == 2


def test_a_damaged_file_is_traced_again_and_replaced(store):
    stored_jit(scaled_sum, static_argnames="factor")(*args(), factor=2.0)
    (path,) = store.glob("*.program")
    path.write_bytes(b"not a program")
    TRACES.clear()
    got = stored_jit(scaled_sum, static_argnames="factor")(*args(), factor=2.0)
    np.testing.assert_array_equal(got["sum"], (np.arange(3.0) + 1) * 2)
    assert TRACES == [2.0] and path.read_bytes() != b"not a program"


def test_what_cannot_be_named_across_processes_is_only_jitted(store):
    class Opaque:  # its repr shows an address
        def __init__(self, v):
            self.v = v

        def __hash__(self):
            return 0

        def __eq__(self, other):
            return self.v == other.v

    program = StoredProgram(lambda x, o: x * o.v, static_argnums=1)
    np.testing.assert_array_equal(program(jnp.arange(3.0), Opaque(2.0)), [0, 2, 4])
    assert not store.exists() or not list(store.glob("*.program"))


def test_inside_another_trace_and_with_the_store_off_it_is_jax_jit(store):
    program = stored_jit(scaled_sum, static_argnames="factor")
    inner = jax.jit(lambda x, y: program(x, y, factor=2.0)["sum"])
    np.testing.assert_array_equal(inner(*args()), (np.arange(3.0) + 1) * 2)
    assert not store.exists()
    set_store(None)
    np.testing.assert_array_equal(program(*args(), factor=5.0)["sum"], (np.arange(3.0) + 1) * 5)
    assert not store.exists()


def test_the_code_fingerprint_is_stable_text():
    assert program_store.code_fingerprint() == program_store.code_fingerprint()
    assert len(program_store.code_fingerprint()) == 64


def test_programs_are_exported_for_the_platform_the_call_runs_on():
    """The platform is part of a program's name: the committed arguments' device decides it,
    else the default device (on a GPU machine, `refine --device cpu` stores CPU programs
    beside the GPU's)."""
    cpu = jax.devices("cpu")[0]
    assert program_store._export_platform([np.ones(2)]) == jax.default_backend()
    assert program_store._export_platform([np.ones(2), jax.device_put(jnp.ones(2), cpu)]) == "cpu"
    with jax.default_device(cpu):
        assert program_store._export_platform([np.ones(2)]) == "cpu"


class _Payload:
    """A pickle that, if ever unpickled, leaves a mark on disk."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _stored_file(store):
    stored_jit(scaled_sum, static_argnames="factor")(*args(), factor=2.0)
    (path,) = store.glob("*.program")
    TRACES.clear()
    return path


def _recompute_and_check(store, path):
    got = stored_jit(scaled_sum, static_argnames="factor")(*args(), factor=2.0)
    np.testing.assert_array_equal(got["sum"], (np.arange(3.0) + 1) * 2)
    assert TRACES == [2.0], "the planted file should have been rejected and the program traced"
    assert path.read_bytes().startswith(program_store.MAGIC)


def test_a_pickle_in_the_store_is_never_unpickled(store, tmp_path):
    path = _stored_file(store)
    marker = tmp_path / "payload-ran"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    _recompute_and_check(store, path)
    assert not marker.exists()


def test_a_file_whose_checksum_fails_is_rejected(store):
    path = _stored_file(store)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    _recompute_and_check(store, path)


@pytest.mark.parametrize("node_type", ["os:system", "subprocess:Popen", "amortize.io:__class__",
                                       "builtins:eval", 3])
def test_a_tree_naming_a_type_outside_the_traced_packages_is_rejected(store, node_type):
    path = _stored_file(store)
    body = path.read_bytes()[len(program_store.MAGIC) + 32:]
    (n,) = struct.unpack("<Q", body[:8])
    meta = json.loads(body[8:8 + n])
    meta["out_tree"]["type"] = node_type
    tree = json.dumps(meta).encode()
    new_body = struct.pack("<Q", len(tree)) + tree + body[8 + n:]
    path.write_bytes(program_store.MAGIC + hashlib.sha256(new_body).digest() + new_body)
    with pytest.raises(ValueError):
        program_store.decode_program(path.read_bytes())
    _recompute_and_check(store, path)


@pytest.mark.skipif(os.getuid() != 0, reason="changing a file's owner needs root")
def test_a_file_owned_by_another_user_is_not_used(store):
    path = _stored_file(store)
    os.chown(path, 12345, 12345)
    assert program_store.read_program(path) is None
    _recompute_and_check(store, path)


def test_output_trees_round_trip_as_data():
    import optax

    from amortize.droplets import Background

    tree = jax.tree_util.tree_structure(
        ({"a": 1, "b": [2, None]}, optax.ScaleByAdamState(1, 2, 3), Background(1.0, 2.0), ()))
    assert program_store.tree_from_data(json.loads(json.dumps(program_store.tree_to_data(tree)))) == tree
