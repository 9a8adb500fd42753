"""Checkpoints: one orbax-managed directory of numbered steps, each with a pytree and the
resolved config as JSON.

A training run saves its whole state (parameters, optimiser state, step) under the item
`state`; a shipped model (`checkpoints/default/`) saves only the parameters under `params`:
the encoder's flax variables, plus a `decoder` collection (optics and pixel noise) when the
model was adapted to real images. `load_model` reads either, so a training workdir can be
used for prediction directly.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from amortize.errors import BadArgument, BadInput

#: Where a training workdir keeps its checkpoints.
CHECKPOINT_SUBDIR = "checkpoints"

# orbax logs every save and restore at INFO/WARNING; the CLI reports what matters itself.
logging.getLogger("absl").setLevel(logging.ERROR)


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
    if target is None:
        target = _saved_on_default_device(pathlib.Path(mgr.directory) / str(step) / item)
    out = mgr.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target),
                                         "config": ocp.args.JsonRestore()})
    )
    return out[item], out["config"]


def _saved_on_default_device(item_dir: pathlib.Path) -> Any:
    """The abstract tree of a saved item, every array on this process's default device.

    Orbax records each array's device ("cpu:0") and, given no target, restores onto that
    device, failing with "Topology mismatch" when it is not here: a model saved on a CPU
    would not load on a GPU machine (seen on an H200), nor one saved there on a CPU.
    """
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(item_dir).item_metadata.tree
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
    """(params, resolved config, step) of the latest checkpoint under `path`.

    Raises:
        BadInput: no checkpoint there, or one that cannot be read (corrupt, partial).
    """
    directory = find_checkpoints(path)
    try:
        mgr = manager(directory, read_only=True)
        step = mgr.latest_step()
    except Exception as err:  # orbax raises many types for a directory it cannot parse
        raise BadInput(path, f"not a readable checkpoint directory ({_short(err)})") from None
    if step is None:
        raise BadInput(path, "no checkpoint found in this directory")
    items = {p.name for p in (directory / str(step)).iterdir()} if (directory / str(step)).is_dir() else set()
    item = "params" if "params" in items else "state"
    if "config" not in items or item not in items:
        raise BadInput(directory / str(step), "incomplete checkpoint (missing params or config)")
    try:
        tree, config = restore(mgr, step, item)
    except Exception as err:
        raise BadInput(directory / str(step), f"corrupt checkpoint ({_short(err)})") from None
    finally:
        mgr.close()
    params = tree if item == "params" else model_of_state(tree)
    return params, config, int(step)


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
