"""Fitting the decoder's optics to the encoder's point estimates on a real corpus.

The wake ELBO learns the optics under the guide's sampling noise: every step renders
compositions, radii and positions drawn from the encoder's posterior, whose composition
scales are broad (the simulation-trained encoder's composition R^2 is about 0.9). The optics
that maximise the expected likelihood under that noise are a blurred average of the looks it
mixes (faded dye colours, a weak caustic), while a reconstruction renders the posterior
*means*. On ../shared/data/droplets refitting only the optics of a wake-sleep model to its
own mean answers took the full-resolution reconstruction RMSE from 0.037 to 0.030, and the
simulation-trained model's from 0.062 (built-in optics) to 0.037 (BENCHMARKS.md).

So adaptation can end with this step (`[adapt] decoder_fit_steps`), an M-step at the
encoder's point estimates: the encoder
is frozen, its `Predictor` answer (the same inference `predict` uses) is computed once on a
fixed set of corpus crops, and the optics are fitted by full-batch Adam on the squared error
of the rendering over each crop's interior (droplets centred past the edge are missed by the
encoder, so the border is left out as in the wake ELBO).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amortize.config import RenderConfig
from amortize.droplets import Background, Droplets
from amortize.reconstruct import droplets_from_table, slot_count
from amortize.render import render
from amortize.wake import interior_mask


class FitTargets(NamedTuple):
    """What the optics are fitted to: crops, the encoder's droplets and backgrounds.

    Attributes:
        images: (B, H, W, C) crops in [0, 1].
        droplets: Droplets with leading axes (B, N), absent slots padded in.
        background: Background with a leading axis B.
        inside: (H, W, 1) 1 where a pixel counts, 0 in the border.
    """

    images: np.ndarray
    droplets: Droplets
    background: Background
    inside: np.ndarray

    @property
    def n_droplets(self) -> int:
        return int(np.sum(np.asarray(self.droplets.presence) > 0))


def fit_targets(predictor, crops: np.ndarray, border: int) -> FitTargets:
    """The predictor's answer (droplets and fitted background) on each of `crops` (B, H, W, C)."""
    crops = np.asarray(crops, np.float32)
    tables = [predictor.predict(crop) for crop in crops]
    backgrounds = [predictor.background(crop) for crop in crops]
    return targets_from_tables(crops, tables, backgrounds, predictor.n_types, border)


def targets_from_tables(crops: np.ndarray, tables: list[dict], backgrounds: list[Background],
                        n_types: int, border: int) -> FitTargets:
    """Targets from one droplet table and one background per crop."""
    crops = np.asarray(crops, np.float32)
    size = max(slot_count(len(t["x"])) for t in tables)
    each = [droplets_from_table(t, n_types, size) for t in tables]
    droplets = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *each)
    background = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *backgrounds)
    inside = interior_mask(crops.shape[1:3], border).astype(np.float32)[..., None]
    return FitTargets(crops, droplets, background, inside)


def squared_error(optics: dict, targets: FitTargets, config: RenderConfig) -> jnp.ndarray:
    """Mean squared error per interior channel value of the rendered crops."""
    h, w = targets.images.shape[1:3]
    rendered = jax.vmap(lambda d, bg: render(d, optics, bg, (h, w), config))(
        targets.droplets, targets.background)
    err = (rendered - targets.images) ** 2 * targets.inside
    return jnp.sum(err) / (jnp.sum(targets.inside) * targets.images.shape[0] * targets.images.shape[-1])


@functools.partial(jax.jit, static_argnames="config")
def _crop_rmse(optics: dict, targets: FitTargets, config: RenderConfig) -> jnp.ndarray:
    h, w = targets.images.shape[1:3]
    rendered = jax.vmap(lambda d, bg: render(d, optics, bg, (h, w), config))(
        targets.droplets, targets.background)
    err = jnp.sum((rendered - targets.images) ** 2 * targets.inside, axis=(1, 2, 3))
    return jnp.sqrt(err / (jnp.sum(targets.inside) * targets.images.shape[-1]))


def crop_rmse(optics: dict, targets: FitTargets, config: RenderConfig) -> jnp.ndarray:
    """(B,) RMSE over each crop's interior of its rendering with `optics`."""
    return _crop_rmse(optics, jax.tree_util.tree_map(jnp.asarray, targets), config)


def make_fit_step(targets: FitTargets, config: RenderConfig, learning_rate: float):
    """(optimizer, jitted step (optics, opt_state) -> (optics, opt_state, rmse))."""
    tx = optax.adam(learning_rate)
    # Passed as an argument, not closed over: the crops would otherwise be compiled in.
    targets = jax.tree_util.tree_map(jnp.asarray, targets)

    @jax.jit
    def fit_step(optics, opt_state, targets):
        loss, grads = jax.value_and_grad(squared_error)(optics, targets, config)
        updates, opt_state = tx.update(grads, opt_state, optics)
        return optax.apply_updates(optics, updates), opt_state, jnp.sqrt(loss)

    return tx, lambda optics, opt_state: fit_step(optics, opt_state, targets)
