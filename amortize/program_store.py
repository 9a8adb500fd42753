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

A stored file is data, never code: anyone who can write to the store must not be able to
run code as the user who reads it. A file holds a header, the output tree's structure as
JSON and the program in JAX's own serialisation (`jax.export`); nothing is unpickled. It is
used only if it belongs to the user, its header's SHA-256 matches its content, and every
node type in its tree is a container type already imported from a package whose code is
traced (`TRACED_PACKAGES` and amortize): otherwise it is traced again and replaced.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
import pathlib
import json
import struct
import sys
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

#: Packages whose code is traced into our programs; their versions are part of the key.
TRACED_PACKAGES = ("jax", "jaxlib", "numpyro", "flax", "optax")
#: First bytes of a stored program file (the format's version is part of it).
MAGIC = b"amortize-program-v2\n"
#: Packages whose pytree node types may appear in a stored program's output tree.
TREE_PACKAGES = ("amortize", "jax", "jaxlib", "numpyro", "flax", "optax")
_BUILTIN_NODES = {"builtins:tuple": tuple, "builtins:list": list, "builtins:dict": dict,
                  "builtins:NoneType": type(None)}

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
        loaded = read_program(path)
        if loaded is not None:
            exported, out_tree = loaded
            return jax.jit(exported.call), out_tree
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
        data = encode_program(blob, out_trees[0])
        if data is not None:  # None: an output type that cannot be named as data; use it, keep nothing
            _write_atomically(path, data)
        return jax.jit(exported.call), out_trees[0]


def tree_to_data(treedef) -> Any:
    """A pytree structure as JSON-ready data: "*" for a leaf, else the node's type (as
    "module:qualname"), its auxiliary data and its children.

    Raises:
        ValueError: a node type or auxiliary value that cannot be named as data.
    """
    node = treedef.node_data()
    if node is None:
        return "*"
    kind, aux = node
    name = f"{kind.__module__}:{kind.__qualname__}"
    if "<locals>" in name:
        raise ValueError(f"{name} cannot be named in another process")
    return {"type": name, "aux": _aux_to_data(aux), "children": [tree_to_data(c) for c in treedef.children()]}


def tree_from_data(data: Any):
    """The pytree structure `tree_to_data` described.

    Raises:
        ValueError: the data is malformed or names a type that may not be used (see the
            module notes).
    """
    if data == "*":
        return jax.tree_util.tree_structure(0)
    if not isinstance(data, dict) or set(data) != {"type", "aux", "children"} or not isinstance(
            data["children"], list):
        raise ValueError("malformed tree node")
    children = [tree_from_data(child) for child in data["children"]]
    from jax._src.tree_util import default_registry  # not re-exported by jax.tree_util

    return jax.tree_util.PyTreeDef.from_node_data_and_children(
        default_registry, (_node_type(data["type"]), _aux_from_data(data["aux"])), children)


def _node_type(name: Any) -> type:
    """The container type named "module:qualname", looked up among modules already imported
    (nothing is imported here) of the packages in `TREE_PACKAGES`."""
    if not isinstance(name, str):
        raise ValueError("malformed node type")
    if name in _BUILTIN_NODES:
        return _BUILTIN_NODES[name]
    module_name, _, qualname = name.partition(":")
    if module_name.split(".")[0] not in TREE_PACKAGES or module_name not in sys.modules:
        raise ValueError(f"node type {name} is not allowed")
    value: Any = sys.modules[module_name]
    for part in qualname.split("."):
        if part.startswith("__") or not part.isidentifier():
            raise ValueError(f"node type {name} is not allowed")
        value = getattr(value, part, None)
    if not isinstance(value, type):
        raise ValueError(f"node type {name} is not a type")
    return value


def _aux_to_data(aux: Any) -> Any:
    """Auxiliary data (dict keys, static fields) as JSON, keeping tuples apart from lists."""
    if aux is None or isinstance(aux, (bool, str)):
        return aux
    if isinstance(aux, (int, float)) and type(aux) in (int, float):
        return {"int" if isinstance(aux, int) else "float": aux}
    if type(aux) in (tuple, list):
        return {type(aux).__name__: [_aux_to_data(a) for a in aux]}
    raise ValueError(f"auxiliary data of type {type(aux).__name__} cannot be stored")


def _aux_from_data(data: Any) -> Any:
    if data is None or isinstance(data, (bool, str)):
        return data
    if isinstance(data, dict) and len(data) == 1:
        ((kind, value),) = data.items()
        if kind == "int" and type(value) is int:
            return value
        if kind == "float" and type(value) in (int, float):
            return float(value)
        if kind in ("tuple", "list") and isinstance(value, list):
            items = [_aux_from_data(v) for v in value]
            return tuple(items) if kind == "tuple" else items
    raise ValueError("malformed auxiliary data")


def encode_program(blob: bytes, out_tree) -> bytes | None:
    """A stored program file: `MAGIC`, the SHA-256 of the rest, the length of the tree's JSON,
    the JSON, then the program serialised by `jax.export`. None when the output tree cannot
    be described as data."""
    try:
        tree = json.dumps({"out_tree": tree_to_data(out_tree), "text": str(out_tree)}).encode()
    except ValueError:
        return None
    body = struct.pack("<Q", len(tree)) + tree + bytes(blob)
    return MAGIC + hashlib.sha256(body).digest() + body


def decode_program(data: bytes):
    """(exported program, output tree) of a file `encode_program` wrote.

    Raises:
        ValueError: a file of another format, damaged, or naming a type it may not use.
    """
    if not data.startswith(MAGIC):
        raise ValueError("not a stored program")
    digest, body = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if len(body) < 8 or hashlib.sha256(body).digest() != digest:
        raise ValueError("checksum mismatch")
    (n,) = struct.unpack("<Q", body[:8])
    meta = json.loads(body[8:8 + n])
    out_tree = tree_from_data(meta["out_tree"])
    if str(out_tree) != meta["text"]:
        raise ValueError("output tree does not match its description")
    return jax.export.deserialize(bytearray(body[8 + n:])), out_tree


def read_program(path: pathlib.Path):
    """(exported program, output tree) stored at `path`, or None when there is none that may
    be used: missing, owned by another user, damaged or of another format (traced again)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_uid != os.getuid():
                return None  # someone else's file: never trust it
            data = f.read()
        return decode_program(data)
    except Exception:  # noqa: BLE001 - missing or unusable: trace it (and replace it)
        return None


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
