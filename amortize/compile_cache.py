"""JAX's persistent compilation cache: later runs load compiled programs instead of compiling.

Its own module, importing JAX only when called: the console script turns the cache on before
every verb, and a verb that stops at a bad argument should not pay for importing the library.
"""

from __future__ import annotations

import os
import pathlib
import stat


#: Set to 0 to keep the compilation cache but not the program store.
STORE_ENV = "AMORTIZE_PROGRAM_STORE"


def enable_compilation_cache(path: str | os.PathLike | None = None, warn=None) -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache so that later runs skip the compile, and
    the program store (`amortize.program_store`) so that they skip tracing and lowering.

    The cache lives in $AMORTIZE_CACHE_DIR, else ~/.cache/amortize/jax; the store in its
    `programs/` folder, unless $AMORTIZE_PROGRAM_STORE is 0. Folders it creates are private
    (0700). What is cached is loaded and run, so a cache folder that another user owns or
    may write to is not used: `warn` (default `warnings.warn`) gets one line saying so, and
    the run goes on without a cache. Returns the folder in use, or None.
    """
    path = pathlib.Path(
        path or os.environ.get("AMORTIZE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "amortize" / "jax"
    )
    try:
        make_private_dirs(path)
        make_private_dirs(path / "programs")
        unsafe = unsafe_reason(path) or unsafe_reason(path / "programs")
    except OSError:
        return None  # a read-only home only costs the compile, never the run
    if unsafe:
        (warn or _warn)(f"{unsafe}; running without a compilation cache")
        return None
    import jax

    from amortize.program_store import set_store

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    set_store(None if os.environ.get(STORE_ENV, "") == "0" else path / "programs")
    return path


def make_private_dirs(path: pathlib.Path) -> None:
    """Create `path` and any missing parents with mode 0700 (an existing folder is left as
    it is)."""
    missing = []
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)


def unsafe_reason(path: pathlib.Path) -> str | None:
    """Why a cache folder may not be trusted (owned by another user, or writable by others,
    who may have planted entries in it already), or None. A folder of ours that others may
    only read is made private (0700), so that no entry in it can be changed by them."""
    info = path.stat()
    if info.st_uid != os.getuid():
        return f"{path}: cache folder is owned by another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path}: cache folder is writable by other users (remove it, or set AMORTIZE_CACHE_DIR)"
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return None


def _warn(line: str) -> None:
    import warnings

    warnings.warn(line, stacklevel=3)
