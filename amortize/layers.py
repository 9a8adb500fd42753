"""Network layers shared by the encoder and the optics MLP.

`LayerNorm` is flax's `nn.LayerNorm` (the same parameters, names and epsilon) with a
closed-form derivative. The optics MLP's backward pass is most of the renderer's, and the
derivative XLA takes of the written-out statistics is slower: on the slide's 2x sample grid
(514k pixels, 2 816 slots) the renderer's gradient took 0.34 s with flax's and 0.20 s with
this. It is also a much smaller program: flax's statistics are a few dozen small operations
per call, and the encoder calls it in each of its 15 blocks, in every program that encodes
(the tiny training step: 2799 -> 2409 traced operations; see BENCHMARKS.md).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

#: flax's LayerNorm epsilon, which the shipped models' parameters were trained with.
LAYER_NORM_EPS = 1e-6


@jax.custom_vjp
def _normalise(h: jnp.ndarray) -> jnp.ndarray:
    """(h - mean) / sqrt(var + eps) over the last axis: layer norm before its scale and bias."""
    return _normalise_forward(h)[0]


def _normalise_forward(h):
    centred = h - h.mean(-1, keepdims=True)
    inv_sd = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + LAYER_NORM_EPS)
    out = centred * inv_sd
    return out, (out, inv_sd)


def _normalise_backward(saved, g):
    out, inv_sd = saved
    return (inv_sd * (g - g.mean(-1, keepdims=True) - out * (g * out).mean(-1, keepdims=True)),)


_normalise.defvjp(_normalise_forward, _normalise_backward)


class LayerNorm(nn.Module):
    """Layer norm over the last axis with a learned scale and bias (flax's names)."""

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (h.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (h.shape[-1],))
        return _normalise(h) * scale + bias
