"""Checkpoints: one orbax-managed directory of numbered steps, each with a pytree and the
resolved config as JSON.

A training run saves its whole state (parameters, optimiser state, step) under the item
`state`; a shipped model (`checkpoints/default/`) saves only the parameters under `params`:
the encoder's flax variables, plus a `decoder` collection (optics and pixel noise) when the
model was adapted to real images. `load_model` reads either, so a training workdir can be
used for prediction directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import pathlib
import re
import warnings
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp

from amortize.errors import AmortizeError, BadArgument, BadInput

#: Where a training workdir keeps its checkpoints.
CHECKPOINT_SUBDIR = "checkpoints"

#: A step that cannot be read is renamed `<step>.damaged`: orbax lists only directories
#: named by a bare step number, so it no longer sees it, and nothing of the user's is deleted.
DAMAGED_SUFFIX = ".damaged"

_T = TypeVar("_T")


class CheckpointWarning(UserWarning):
    """The newest checkpoint step could not be read and an earlier one is used instead
    (one line, naming the damaged step and the step used)."""


# orbax logs every save and restore at INFO/WARNING; the CLI reports what matters itself.
logging.getLogger("absl").setLevel(logging.ERROR)


def _step_metadata_unreadable(record: logging.LogRecord) -> bool:
    """orbax's ERROR for a step's unreadable `_CHECKPOINT_METADATA` (its commit time and
    metrics), after which it reads the step without it: nothing for the user to act on."""
    return str(record.msg).startswith(("Failed to json parse Metadata file", "Failed to read Metadata file"))


logging.getLogger("absl").addFilter(lambda record: not _step_metadata_unreadable(record))


def manager(directory: str | pathlib.Path, max_to_keep: int = 2, read_only: bool = False):
    """An orbax CheckpointManager over `directory` (absolute path, created unless read-only)."""
    directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only
    )
    return ocp.CheckpointManager(directory, options=options)


def save(mgr, step: int, item: str, tree: Any, config: dict, wait: bool = False) -> None:
    """Save `tree` as `item` plus the resolved `config` at `step` (async unless `wait`)."""
    args = {item: ocp.args.StandardSave(tree), "config": ocp.args.JsonSave(config)}
    mgr.save(step, args=ocp.args.Composite(**args), force=True)
    if wait:
        mgr.wait_until_finished()


def restore(mgr, step: int, item: str, target: Any | None = None) -> tuple[Any, dict]:
    """(tree, config) saved at `step`. With `target`, arrays take its structure and dtypes;
    without, the saved shapes and dtypes, placed on this process's default device."""
    with _orbax_loops_drained():
        if target is None:
            target = _saved_on_default_device(pathlib.Path(mgr.directory) / str(step) / item)
        out = mgr.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target),
                                             "config": ocp.args.JsonRestore()})
        )
    return out[item], out["config"]


@contextlib.contextmanager
def _orbax_loops_drained():
    """Within: every asyncio event loop finishes its pending tasks before it closes.

    Orbax runs each read in a fresh event loop and closes it as soon as the read returns
    (`orbax.checkpoint._src.asyncio_utils._run_sync_via_new_loop`). When one array of a
    damaged checkpoint fails, the reads of the others are still in flight, in tensorstore's
    threads and as tasks of that loop. Closed under them, each one's end printed a traceback
    (tensorstore handing its result to the closed loop: "Event loop is closed"; a task
    destroyed mid-read: "Exception ignored in: <coroutine ...>"; one never started:
    "coroutine ... was never awaited"): from 1 to thousands of lines, before or after the
    one-line error, and even at interpreter exit. Letting those reads end before the loop
    closes removes the cause; a read that is still stuck after a minute is cancelled.
    Orbax offers no hook for its loop, so this goes through asyncio's loop factory (the
    event loop policy), for the duration of our own reads only.
    """
    set_policy = getattr(asyncio, "set_event_loop_policy", None)
    if set_policy is None:  # Python without loop policies
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # policies: deprecated in 3.14
        previous = asyncio.get_event_loop_policy()
        set_policy(_draining_policy_type()(previous))
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            set_policy(previous)


@functools.cache
def _draining_policy_type() -> type:
    """A policy wrapping another, whose new loops run their pending tasks to the end before
    closing. Defined on first use: Python 3.14 deprecates `AbstractEventLoopPolicy`."""

    class DrainingPolicy(asyncio.AbstractEventLoopPolicy):
        def __init__(self, base):
            self._base = base

        def get_event_loop(self):
            return self._base.get_event_loop()

        def set_event_loop(self, loop):
            self._base.set_event_loop(loop)

        def new_event_loop(self):
            loop = self._base.new_event_loop()
            close = loop.close

            def drain_then_close():
                if not loop.is_closed() and not loop.is_running():
                    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                    if pending:
                        loop.run_until_complete(_settle(pending, timeout=_DRAIN_TIMEOUT_S))
                close()

            loop.close = drain_then_close
            return loop

        def get_child_watcher(self):  # Python < 3.14 on Unix
            return self._base.get_child_watcher()

        def set_child_watcher(self, watcher):
            self._base.set_child_watcher(watcher)

    return DrainingPolicy


#: How long a damaged checkpoint's other reads may take to end before they are cancelled.
_DRAIN_TIMEOUT_S = 60.0


async def _settle(tasks: list, timeout: float) -> None:
    _, stuck = await asyncio.wait(tasks, timeout=timeout)
    for task in stuck:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)  # retrieves their errors


def _saved_on_default_device(item_dir: pathlib.Path) -> Any:
    """The abstract tree of a saved item, every array on this process's default device.

    Orbax records each array's device ("cpu:0") and, given no target, restores onto that
    device, failing with "Topology mismatch" when it is not here: a model saved on a CPU
    would not load on a GPU machine (seen on an H200), nor one saved there on a CPU.
    """
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(item_dir).item_metadata
    if metadata is None:  # orbax logs why and returns None
        raise ValueError("its array metadata cannot be read")
    saved = metadata.tree
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here), saved)


def find_checkpoints(path: str | pathlib.Path) -> pathlib.Path:
    """The orbax directory inside `path`: the path itself, or a workdir's `checkpoints/`."""
    path = pathlib.Path(path)
    if not path.exists():
        raise BadInput(path, "checkpoint not found (no such directory)")
    if not path.is_dir():
        raise BadInput(path, "checkpoint must be a directory, not a file")
    nested = path / CHECKPOINT_SUBDIR
    return nested if nested.is_dir() else path


def load_model(path: str | pathlib.Path) -> tuple[dict, dict, int]:
    """(params, resolved config, step) of the newest intact checkpoint under `path`.

    A newer step that cannot be read is skipped with one `CheckpointWarning` and left in
    place: reading a model changes nothing on disk (a failure may be passing, such as a
    device out of memory; training, which must save that step again, sets it aside).

    Raises:
        BadInput: no checkpoint there, or none that can be read (corrupt, partial).
    """
    directory = find_checkpoints(path)
    try:
        mgr = manager(directory, read_only=True)
    except Exception as err:  # orbax raises many types for a directory it cannot parse
        raise BadInput(path, f"not a readable checkpoint directory ({_short(err)})") from None
    try:
        found = latest_intact(mgr, lambda step: _read_model(mgr, directory, step), set_aside=False)
    finally:
        mgr.close()
    if found is None:
        raise BadInput(path, "no checkpoint found in this directory")
    step, (params, config) = found
    return params, config, int(step)


def _read_model(mgr, directory: pathlib.Path, step: int) -> tuple[dict, dict]:
    """(params, config) of one step, of a model (`params`) or a training state (`state`)."""
    step_dir = directory / str(step)
    items = {p.name for p in step_dir.iterdir()} if step_dir.is_dir() else set()
    item = "params" if "params" in items else "state"
    if "config" not in items or item not in items:
        raise BadInput(step_dir, "incomplete checkpoint (missing params or config)")
    try:
        tree, config = restore(mgr, step, item)
    except Exception as err:
        raise BadInput(step_dir, f"corrupt checkpoint ({_cause(err)})") from None
    return (tree if item == "params" else model_of_state(tree)), config


def latest_intact(mgr, read: Callable[[int], _T], set_aside: bool = True,
                  set_aside_or_fail: bool = False) -> tuple[int, _T] | None:
    """(step, read(step)) of the newest step of `mgr` that `read` can read; None if it has
    no steps.

    A newer step that `read` fails on (truncated or zeroed data, a broken config) is
    reported in one `CheckpointWarning` naming it and the step used, and renamed
    `<step>.damaged`, where orbax no longer lists it (nothing is deleted); `mgr` is then
    reloaded, so that a resumed run can save that step again. Where the directory is
    read-only it is left in place, unless `set_aside_or_fail` (training, which must be able
    to write there anyway). Without `set_aside`, it is only skipped and reported.

    Raises:
        BadInput: no step can be read (one line, naming the newest and why).
    """
    directory = pathlib.Path(mgr.directory)
    damaged: list[tuple[int, str]] = []
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            result = read(step)
        except Exception as err:
            reason = err.reason if isinstance(err, AmortizeError) else f"corrupt checkpoint ({_cause(err)})"
            damaged.append((step, reason))
            continue
        if damaged:
            _set_aside(mgr, directory, damaged, step, set_aside, set_aside_or_fail)
        return step, result
    if not damaged:
        return None
    (newest, reason), others = damaged[0], [s for s, _ in damaged[1:]]
    also = f"; no step is intact (also unreadable: {', '.join(map(str, others))})" if others else ""
    raise BadInput(directory / str(newest), reason + also)


def _set_aside(mgr, directory: pathlib.Path, damaged: list[tuple[int, str]], used: int,
               rename: bool, required: bool) -> None:
    """Rename the damaged steps aside (if `rename`), reload `mgr` and warn once."""
    kept = []
    for step, reason in damaged if rename else ():
        source = directory / str(step)
        target = directory / f"{step}{DAMAGED_SUFFIX}"
        n = 1
        while target.exists():
            n += 1
            target = directory / f"{step}{DAMAGED_SUFFIX}{n}"
        try:
            source.rename(target)
        except OSError as err:
            if required:
                raise BadInput(source, f"{reason}; cannot set it aside to resume from step "
                                       f"{used} ({err.strerror or err})") from None
            continue
        kept.append(target.name)
    if kept:
        mgr.reload()
    (newest, reason), others = damaged[0], [str(s) for s, _ in damaged[1:]]
    line = f"{directory / str(newest)}: {reason}"
    if others:
        line += f"; step{'s' if len(others) > 1 else ''} {', '.join(others)} too"
    line += f"; using step {used}"
    if kept:
        line += f" (the damaged step{'s are' if len(kept) > 1 else ' is'} kept as {', '.join(kept)})"
    elif not rename:
        line += " (the damaged step is left in place)"
    warnings.warn(line, CheckpointWarning, stacklevel=3)


def model_of_state(state: dict) -> dict:
    """What predict needs of a training state: the encoder variables, plus the learned
    decoder (an extra `decoder` collection) when the run learned one (wake-sleep), and the
    composition read-out once it has been fitted."""
    params = dict(state["params"])
    if "decoder" in state:
        params["decoder"] = state["decoder"]
    if "readout" in state and int(state["readout"]["fitted"]):
        params["readout"] = state["readout"]
    return params


def save_model(path: str | pathlib.Path, params: Any, config: dict, step: int) -> None:
    """Write an inference-only checkpoint (parameters and config) to `path`."""
    mgr = manager(path, max_to_keep=1)
    try:
        save(mgr, step, "params", params, config, wait=True)
    finally:
        mgr.close()


def export_model(workdir: str | pathlib.Path, out: str | pathlib.Path, force: bool = False) -> int:
    """Write the latest parameters of a training run as an inference-only model at `out`.

    The optimiser state is left behind (it triples the size). Returns the exported step.
    """
    import shutil

    out = pathlib.Path(out)
    params, config, step = load_model(workdir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BadArgument(out, "exists and is not empty (use --force to replace it)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, params, config, step)
    # Keep what else lives there (the model card) and swap only the checkpoint steps in.
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_dir() and old.name.isdigit():
            shutil.rmtree(old)
    for new in tmp.iterdir():
        target = out / new.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(str(new), target)
    shutil.rmtree(tmp)
    return step


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _cause(err: BaseException) -> str:
    """`_short` of the innermost cause: orbax wraps tensorstore's precise error ("OUT_OF_RANGE:
    Error reading ...") in one that dumps the whole TensorStore spec. The file's path, which
    the line already names, is left out."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r' (at|of) local file "[^"]*"', "", str(err)).strip()
    return _short(Exception(text)) if text else type(err).__name__
