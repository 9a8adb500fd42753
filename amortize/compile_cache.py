"""JAX's persistent compilation cache: later runs load compiled programs instead of compiling.

Its own module, importing JAX only when called: the console script turns the cache on before
every verb, and a verb that stops at a bad argument should not pay for importing the library.
"""

from __future__ import annotations

import os
import pathlib


#: Set to 0 to keep the compilation cache but not the program store.
STORE_ENV = "AMORTIZE_PROGRAM_STORE"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Turn on JAX's persistent compilation cache so that later runs skip the compile, and
    the program store (`amortize.program_store`) so that they skip tracing and lowering.

    The cache lives in $AMORTIZE_CACHE_DIR, else ~/.cache/amortize/jax; the store in its
    `programs/` folder, unless $AMORTIZE_PROGRAM_STORE is 0.
    """
    import jax

    from amortize.program_store import set_store

    path = pathlib.Path(
        path or os.environ.get("AMORTIZE_CACHE_DIR") or pathlib.Path.home() / ".cache" / "amortize" / "jax"
    )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return path  # a read-only home only costs the compile, never the run
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    set_store(None if os.environ.get(STORE_ENV, "") == "0" else path / "programs")
    return path
