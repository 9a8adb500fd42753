"""JAX's persistent compilation cache: later runs load compiled programs instead of compiling.

Its own module, importing JAX only when called: the console script turns the cache on before
every verb, and a verb that stops at a bad argument should not pay for importing the library.
"""

from __future__ import annotations

import os
import pathlib


def enable_compilation_cache(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Turn on JAX's persistent compilation cache so that later runs skip the compile.

    The cache lives in $AMORTIZE_CACHE_DIR, else ~/.cache/amortize/jax.
    """
    import jax

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
    return path
