"""The benchmark's opponents: each op as its users write it, compiled by XLA.

Every speedup the benchmark prints is a ratio to a baseline, and a baseline is only
honest if it is the code a user would otherwise run. The ops' own references
(``impl="xla"``, ``ops.*_reference``) are written for exactness and for partitioning over
the vocabulary -- the label's logit as a masked row sum, the variance from centred
values -- which is right for an oracle and costs passes over the large array (measured
for an H100, ``tests_aot/test_baseline_passes.py``): those stay the oracles of the tests.
The baseline of each op here is its users' formulation:

========================  ==============================================================
op                        users' code (the ``user`` row)
========================  ==============================================================
xent                      ``optax.softmax_cross_entropy_with_integer_labels(logits, y)``
xent_prob                 ``optax.softmax_cross_entropy(logits, labels)``
layer_norm                ``flax.nnx.LayerNorm`` (its math in jnp when Flax is absent:
                          f32 statistics, ``var = E[x^2] - E[x]^2``)
rms_norm                  ``flax.nnx.RMSNorm`` (its math in jnp when Flax is absent:
                          f32 ``E[x^2]``, ``y = x * rsqrt(E[x^2] + eps) * scale``)
dense_tanh / dense        ``jnp.tanh(x @ w + b)`` / ``x @ w + b``
dense_gelu                ``jax.nn.gelu(x @ w + b)`` (``approximate=True``, its default)
linear xent               ``optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y)``
mnist_train_step          one SGD step of ``jnp.tanh(x @ w1 + b1) @ w2 + b2`` under
                          ``optax.softmax_cross_entropy_with_integer_labels(...).mean()``
========================  ==============================================================

An option optax lacks (z-loss, label smoothing for integer labels, ``where`` per row, the
logit soft cap, a reduction) is added to optax's formulation in plain jnp, as a user
would. Precision is the one the dtype gets in user code: inputs are passed as they come
(no f32 upcast of bf16 logits: optax on bf16 sums its exponentials in f32, and an upcast
written by hand adds a pass -- measured, 5 reads + 2 writes against optax's 3 + 1);
matmuls are bf16 x bf16 with f32 accumulation for bf16 and IEEE f32 (``precision=
"highest"``) for f32, as on every path (``tests/test_fair_baseline.py``).

The benchmark times both this ``user`` row and the ``xla`` row (the reference) and
divides by the faster of the two (``bench/report.py``). optax is a dev dependency: without
it the ``user`` row of an op that needs it is an error row naming the missing package.

A new op registers its baseline with :func:`register` (a :class:`Baseline` whose ``fn``
takes the registry's positional arrays and keyword options, as ``OpSpec.fn`` does,
without ``impl``); an op with none gets no ``user`` row and is judged against ``xla``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One op's users' formulation.

    Attributes:
      op: the registry name.
      code: what users write, for the tables (``optax.softmax_cross_entropy(logits, labels)``).
      fn: ``fn(*arrays, **options)`` with the registry's positional arrays (``OpSpec.fn``
        without ``impl``); returns what the op returns.
    """

    op: str
    code: str
    fn: Callable[..., Any]


BASELINES: dict[str, Baseline] = {}


def register(baseline: Baseline) -> Baseline:
    if baseline.op in BASELINES:
        raise ValueError(f"op {baseline.op!r} already has a baseline")
    BASELINES[baseline.op] = baseline
    return baseline


def get(op: str) -> Baseline | None:
    """The users' formulation of ``op``, or None where the op has none (judged against xla)."""
    return BASELINES.get(op)


def _optax():
    try:
        import optax
    except ImportError as e:
        raise ImportError("the benchmark's user baseline of the cross-entropies is optax's code: "
                          "pip install optax (it is in the dev extra: pip install -e '.[dev]')") from e
    return optax


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` as a user writes it at the project's precision: bf16 operands at default
    precision (f32 accumulation, bf16 result), f32 at ``precision="highest"`` (IEEE; the
    default f32 dot is TF32 on a GPU)."""
    return jnp.matmul(a, b, precision=None if jnp.dtype(a.dtype).itemsize == 2 else "highest")


# --- cross-entropies ------------------------------------------------------------------------


def integer_label_xent(logits, labels, *, where=None, label_smoothing=0.0, z_loss=0.0):
    """optax's integer-label cross-entropy, with the options optax lacks added in jnp.

    Label smoothing as optax's ``smooth_labels`` would give it, folded: ``(1 - a) (lse -
    x_y) + a (lse - mean_j x_j)``; z-loss ``s * lse**2`` with the ``lse`` recomputed by
    ``jax.nn.logsumexp`` (XLA fuses it with optax's); ``where`` zeroes uncounted rows.
    """
    optax = _optax()
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if label_smoothing or z_loss:
        lse = jax.nn.logsumexp(logits, axis=-1)
        if label_smoothing:
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - jnp.mean(logits, axis=-1))
        if z_loss:
            loss = loss + z_loss * lse * lse
    if where is not None:
        loss = jnp.where(where, loss, 0)
    return loss.astype(logits.dtype)


def probability_label_xent(logits, labels, *, where=None):
    """``optax.softmax_cross_entropy``; ``where`` zeroes uncounted rows."""
    loss = _optax().softmax_cross_entropy(logits, labels)
    return (loss if where is None else jnp.where(where, loss, 0)).astype(logits.dtype)


def linear_xent(x, w, b, labels, *, where=None, label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None,
                reduction="none"):
    """optax on ``x @ w + b`` (the [N, V] logits materialized), the cap and reduction in jnp."""
    logits = matmul(x, w)
    if b is not None:
        logits = logits + b
    if logit_soft_cap is not None:
        logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
    loss = integer_label_xent(logits, labels, where=where, label_smoothing=label_smoothing, z_loss=z_loss)
    if reduction == "none":
        return loss
    loss = loss.astype(jnp.float32)
    if reduction == "sum":
        return jnp.sum(loss).astype(x.dtype)
    return jnp.mean(loss, where=where).astype(x.dtype)


# --- layer_norm -------------------------------------------------------------------------------


def layer_norm(x, scale, bias, *, eps=1e-6):
    """``flax.nnx.LayerNorm(D, epsilon=eps)`` with this scale and bias, applied to ``x``;
    without Flax, the same math in jnp (Flax's ``use_fast_variance``: one pass for the
    statistics, ``var = max(0, E[x^2] - E[x]^2)`` in f32; ``y = (x - mean) * (rsqrt(var +
    eps) * scale) + bias``, in f32, cast to x's dtype)."""
    try:
        from flax import nnx
    except ImportError:
        return flax_layer_norm_math(x, scale, bias, eps=eps)
    module = nnx.LayerNorm(x.shape[-1], epsilon=eps, dtype=x.dtype, param_dtype=scale.dtype, rngs=nnx.Rngs(0))
    module.scale.set_value(scale)
    module.bias.set_value(bias)
    return module(x)


def flax_layer_norm_math(x, scale, bias, *, eps=1e-6):
    """Flax's LayerNorm math in jnp (``flax/nnx/nn/normalization.py``: ``_compute_stats``
    with ``use_fast_variance=True``, then ``_normalize``)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    mean2 = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, mean2 - mean * mean)
    y = (x32 - mean) * (jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


# --- rms_norm ---------------------------------------------------------------------------------


def rms_norm(x, scale, *, eps=1e-6):
    """``flax.nnx.RMSNorm(D, epsilon=eps)`` with this scale, applied to ``x``; without Flax,
    the same math in jnp (:func:`flax_rms_norm_math`)."""
    try:
        from flax import nnx
    except ImportError:
        return flax_rms_norm_math(x, scale, eps=eps)
    module = nnx.RMSNorm(x.shape[-1], epsilon=eps, dtype=x.dtype, param_dtype=scale.dtype, rngs=nnx.Rngs(0))
    module.scale.set_value(scale)
    return module(x)


def flax_rms_norm_math(x, scale, *, eps=1e-6):
    """Flax's RMSNorm math in jnp (``flax/nnx/nn/normalization.py``: ``_compute_stats`` with
    ``use_mean=False``, then ``_normalize``): ``E[x^2]`` in f32, ``y = x * (rsqrt(E[x^2] +
    eps) * scale)`` in f32, cast to x's dtype."""
    x32 = x.astype(jnp.float32)
    mean2 = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * (jax.lax.rsqrt(mean2 + eps) * scale.astype(jnp.float32))).astype(x.dtype)


# --- dense ------------------------------------------------------------------------------------


def dense(x, w, b=None, *, activation=None):
    """``x @ w + b``, through ``jnp.tanh`` for ``activation="tanh"`` and ``jax.nn.gelu`` for
    ``"gelu"`` (tanh approximation) and ``"gelu_exact"`` (erf)."""
    z = matmul(x, w)
    if b is not None:
        z = z + b
    if activation == "tanh":
        return jnp.tanh(z)
    if activation in ("gelu", "gelu_exact"):
        return jax.nn.gelu(z, approximate=activation == "gelu")
    return z


# --- the MNIST training step -------------------------------------------------------------------


def mlp_loss(params, x, y):
    """The MNIST MLP's mean loss as users write it (the layers and loss above)."""
    h = dense(x, params["w1"], params["b1"], activation="tanh")
    logits = dense(h, params["w2"], params["b2"])
    return jnp.mean(_optax().softmax_cross_entropy_with_integer_labels(logits, y).astype(jnp.float32))


def sgd_step(params, x, y, lr):
    """One SGD step of :func:`mlp_loss`: ``(new params, loss)``, as ``mlp.sgd_step``."""
    loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
    return jax.tree.map(lambda p, g: (p - lr * g).astype(p.dtype), params, grads), loss


_XENT = "optax.softmax_cross_entropy_with_integer_labels"
register(Baseline("softmax_cross_entropy_with_integer_labels", f"{_XENT}(logits, labels)", integer_label_xent))
register(Baseline("softmax_cross_entropy", "optax.softmax_cross_entropy(logits, labels)", probability_label_xent))
register(Baseline("linear_softmax_cross_entropy_with_integer_labels", f"{_XENT}(x @ w + b, labels)", linear_xent))
# The table names the code this process runs: Flax's module, or its math where Flax is absent.
_LAYER_NORM_CODE = ("flax.nnx.LayerNorm(D, epsilon=eps)(x)" if importlib.util.find_spec("flax") is not None else
                    "Flax's LayerNorm math in jnp (Flax not installed): f32 statistics, var = E[x^2] - E[x]^2")
register(Baseline("layer_norm", _LAYER_NORM_CODE, layer_norm))
_RMS_NORM_CODE = ("flax.nnx.RMSNorm(D, epsilon=eps)(x)" if importlib.util.find_spec("flax") is not None else
                  "Flax's RMSNorm math in jnp (Flax not installed): f32 E[x^2], x * rsqrt(E[x^2] + eps) * scale")
register(Baseline("rms_norm", _RMS_NORM_CODE, rms_norm))
register(Baseline("dense_tanh", "jnp.tanh(x @ w + b)", lambda x, w, b: dense(x, w, b, activation="tanh")))
register(Baseline("dense_gelu", "jax.nn.gelu(x @ w + b)", lambda x, w, b: dense(x, w, b, activation="gelu")))
register(Baseline("dense", "x @ w + b", dense))
