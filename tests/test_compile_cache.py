"""The compilation cache's folder: private when made, refused when someone else could write it."""

import os
import stat

import jax
import pytest

from amortize import program_store
from amortize.compile_cache import enable_compilation_cache


@pytest.fixture
def restore_cache_settings():
    before = jax.config.jax_compilation_cache_dir, program_store.store()
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    program_store.set_store(before[1])


def test_folders_it_makes_are_private(tmp_path, restore_cache_settings):
    path = tmp_path / "a" / "b" / "cache"
    assert enable_compilation_cache(path, warn=pytest.fail) == path
    for folder in (tmp_path / "a", tmp_path / "a" / "b", path, path / "programs"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert program_store.store() == path / "programs"


def test_a_folder_others_may_write_is_refused_with_one_line(tmp_path, restore_cache_settings):
    path = tmp_path / "shared"
    path.mkdir()
    path.chmod(0o777)
    program_store.set_store(None)
    lines = []
    assert enable_compilation_cache(path, warn=lines.append) is None
    assert len(lines) == 1 and str(path) in lines[0] and "writable by other users" in lines[0]
    assert program_store.store() is None


@pytest.mark.skipif(os.getuid() != 0, reason="changing a folder's owner needs root")
def test_a_folder_owned_by_another_user_is_refused(tmp_path, restore_cache_settings):
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 12345, 12345)
    program_store.set_store(None)
    lines = []
    assert enable_compilation_cache(path, warn=lines.append) is None
    assert len(lines) == 1 and "owned by another user (uid 12345)" in lines[0]
    assert program_store.store() is None


def test_a_folder_of_ours_that_others_may_read_is_made_private(tmp_path, restore_cache_settings):
    path = tmp_path / "mine"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    assert enable_compilation_cache(path, warn=pytest.fail) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
