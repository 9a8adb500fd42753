"""Traced programs kept on disk, so that a later process skips tracing and lowering them.

JAX's persistent compilation cache (`amortize.compile_cache`) spares a later process the
XLA compile, but not the Python tracing and the lowering to StableHLO that come before it.
For refinement those are most of a warm run's fixed cost: on the 507 x 380 stand-in frame
(`BENCHMARKS.md`) about 7 s of tracing and 4 s of lowering in a 35-45 s run, the SVI run
alone 2.1 s and 1.0 s. `stored_jit` is `jax.jit` whose programs are also exported
(`jax.export`) into the program store the first time they are traced; a later process loads
the exported StableHLO (milliseconds) and only wraps it (a fraction of a second), and the
compilation cache then supplies the compiled program.

A stored program is found again by a key that must name everything the program depends on:
- the code: a fingerprint of amortize's source files and of the versions of JAX, jaxlib,
  numpyro, flax and optax, and the JAX settings that change a trace (64-bit mode, matmul
  precision, promotion rules);
- the function's name, and `key`: the configuration its closure captures (say, an SVI
  set-up's scene, render and likelihood settings), as text;
- the static arguments (as text) and the dynamic arguments' tree, shapes and dtypes.
- the platform the call runs on (the CPU, or the default backend: a GPU).
A repr that shows an object's address (" at 0x") cannot name a program across processes,
so such a call is jitted as usual and nothing is stored. So is a call on a GPU that is not
the default backend, or across several platforms.

The store is on while the compilation cache is (`enable_compilation_cache` turns both on,
`AMORTIZE_PROGRAM_STORE=0` keeps it off) and lives in its `programs/` folder; a file that
cannot be read or written only costs a trace. The fingerprint reads the source files, so a
script that patches amortize's functions at run time must keep the store off.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
import pathlib
import pickle
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

#: Packages whose code is traced into our programs; their versions are part of the key.
TRACED_PACKAGES = ("jax", "jaxlib", "numpyro", "flax", "optax")

_store: pathlib.Path | None = None
_fingerprint: str | None = None


def set_store(path: str | os.PathLike | None) -> None:
    """Keep exported programs under `path` (None: keep none, every `stored_jit` is `jax.jit`)."""
    global _store
    _store = None if path is None else pathlib.Path(path)


def store() -> pathlib.Path | None:
    return _store


def code_fingerprint() -> str:
    """Hash of amortize's source files and the traced packages' versions."""
    global _fingerprint
    if _fingerprint is None:
        digest = hashlib.sha256()
        root = pathlib.Path(__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        for name in TRACED_PACKAGES:
            try:
                digest.update(f"{name}={importlib.metadata.version(name)}\0".encode())
            except importlib.metadata.PackageNotFoundError:
                digest.update(f"{name}=?\0".encode())
        _fingerprint = digest.hexdigest()
    return _fingerprint


def _tracing_settings() -> str:
    """JAX settings that change what a function traces to."""
    return repr([jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
                 jax.config.jax_numpy_rank_promotion, jax.config.jax_numpy_dtype_promotion])


def _strong(leaf):
    """`leaf` as an array of a fixed (not weak) dtype, so that a Python scalar and a weakly
    typed array name the same program as the array they stand for."""
    if isinstance(leaf, jax.Array):
        return jnp.asarray(leaf, leaf.dtype) if leaf.weak_type else leaf
    if isinstance(leaf, (np.ndarray, np.generic)):
        return leaf
    value = np.asarray(leaf)
    return value.astype(jax.dtypes.canonicalize_dtype(value.dtype))


def _aval(leaf) -> tuple:
    return np.shape(leaf), str(jax.dtypes.canonicalize_dtype(leaf.dtype))


def _export_platform(leaves) -> str | None:
    """The platform to export a call with these arguments for: that of the device its
    committed arrays are on, or of the default device; None when that is not one platform,
    or is a GPU that is not the default backend (its export name is not known here)."""
    platforms = None
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and leaf.committed:
            platforms = {d.platform for d in leaf.sharding.device_set}
            break
    if platforms is None:
        default = jax.config.jax_default_device
        platforms = {jax.default_backend() if default is None
                     else default if isinstance(default, str) else default.platform}
    if len(platforms) != 1:
        return None
    (platform,) = platforms
    if platform == "cpu":
        return "cpu"
    # `Device.platform` says "gpu" where `jax.export` wants "cuda" or "rocm"; exporting for
    # the default backend (platforms=None) names it correctly.
    return platform if platform == jax.default_backend() else None


class StoredProgram:
    """`jax.jit(fn, static_argnums, static_argnames)` whose programs are kept in the store.

    `fn` must be a pure function of its arguments, the configuration named by `key`, and
    amortize's code: a stored program is found again by exactly those (see the module notes).
    Keyword arguments that are not static are dynamic, like positional ones.
    """

    def __init__(self, fn: Callable, *, key: Any = None, static_argnums=(), static_argnames=()):
        self.fn = fn
        static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        # As in `jax.jit`, a static argument is static whether passed by position or by name.
        self.static_positions, self.static_names = set(static_argnums), set(static_argnames)
        try:
            names = [p.name for p in inspect.signature(fn).parameters.values()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            names = []
        self.static_positions |= {i for i, name in enumerate(names) if name in self.static_names}
        self.static_names |= {names[i] for i in static_argnums if i < len(names)}
        self.plain = jax.jit(fn, static_argnums=tuple(sorted(self.static_positions)),
                             static_argnames=tuple(sorted(self.static_names)))
        # The line tells apart lambdas of one function (their qualnames are the same).
        code = getattr(fn, "__code__", None)
        self.name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}:" \
                    f"{code.co_firstlineno if code else '?'}"
        self.key = repr(key)
        self.nameable = " at 0x" not in self.key  # an address names nothing in another process
        self.programs: dict = {}  # (platform, statics, tree, avals) -> (jitted exported call, output tree)

    def program_count(self) -> int:
        """Programs this process has traced or loaded through the store (with the store
        off, `jax.jit`'s `_cache_size`, which counts every jit of the same function)."""
        return len(self.programs) if _store is not None else self.plain._cache_size()

    def __call__(self, *args, **kwargs):
        if _store is None:
            return self.plain(*args, **kwargs)
        statics = tuple((i, a) for i, a in enumerate(args) if i in self.static_positions) + tuple(
            (k, kwargs[k]) for k in sorted(kwargs) if k in self.static_names)
        dynamic_args = [a for i, a in enumerate(args) if i not in self.static_positions]
        dynamic_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_names}
        leaves, tree = jax.tree_util.tree_flatten((dynamic_args, dynamic_kwargs))
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return self.plain(*args, **kwargs)  # called inside another trace
        leaves = [_strong(leaf) for leaf in leaves]
        statics_text = repr(statics)
        platform = _export_platform(leaves)
        if not self.nameable or " at 0x" in statics_text or platform is None:
            return self.plain(*args, **kwargs)
        avals = tuple(_aval(leaf) for leaf in leaves)
        memo = (platform, statics_text, tree, avals)
        program = self.programs.get(memo)
        if program is None:
            program = self._load_or_export(platform, statics, statics_text, tree, avals, len(args))
            self.programs[memo] = program
        if program is False:  # could not be exported: jitted as usual
            return self.plain(*args, **kwargs)
        run, out_tree = program
        return jax.tree_util.tree_unflatten(out_tree, run(*leaves))

    def _path(self, platform: str, statics_text: str, tree, avals) -> pathlib.Path:
        text = "\n".join([code_fingerprint(), _tracing_settings(), platform, self.name, self.key, statics_text,
                          str(tree), repr(avals)])
        return _store / f"{hashlib.sha256(text.encode()).hexdigest()}.program"

    def _load_or_export(self, platform, statics, statics_text, tree, avals, n_args):
        path = self._path(platform, statics_text, tree, avals)
        try:
            blob, out_tree = pickle.loads(path.read_bytes())
            return jax.jit(jax.export.deserialize(bytearray(blob)).call), out_tree
        except Exception:  # noqa: BLE001 - not stored yet, or a damaged file: trace it (and replace it)
            pass
        out_trees = []
        static_args = dict(statics)

        def flat(*leaves):
            dynamic_args, dynamic_kwargs = jax.tree_util.tree_unflatten(tree, leaves)
            positional, rest = [], iter(dynamic_args)
            for i in range(n_args):
                positional.append(static_args[i] if i in self.static_positions else next(rest))
            named = {k: v for k, v in static_args.items() if isinstance(k, str)}
            out_leaves, out_tree = jax.tree_util.tree_flatten(self.fn(*positional, **dynamic_kwargs, **named))
            out_trees.append(out_tree)
            return out_leaves

        try:
            exported = jax.export.export(jax.jit(flat), platforms=["cpu"] if platform == "cpu" else None)(
                *[jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals])
            blob = bytes(exported.serialize())
        except Exception:  # noqa: BLE001 - e.g. a custom call JAX will not export: jit as usual
            return False
        try:
            data = pickle.dumps((blob, out_trees[0]))
        except Exception:  # noqa: BLE001 - an output type pickle cannot name: use it, keep nothing
            data = None
        if data is not None:
            _write_atomically(path, data)
        return jax.jit(exported.call), out_trees[0]


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only store only costs the trace next time


def stored_jit(fn: Callable | None = None, *, key: Any = None, static_argnums=(), static_argnames=()):
    """`StoredProgram(fn, ...)`; usable as a decorator with or without arguments."""
    if fn is None:
        return lambda f: StoredProgram(f, key=key, static_argnums=static_argnums, static_argnames=static_argnames)
    return StoredProgram(fn, key=key, static_argnums=static_argnums, static_argnames=static_argnames)
