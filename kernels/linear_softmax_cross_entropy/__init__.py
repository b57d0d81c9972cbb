"""Fused linear + softmax cross-entropy: the two kernels of one vocabulary chunk.

The op (``ops/linear_softmax_cross_entropy.py``) never forms the [N, V] logits in HBM:
it walks the vocabulary in chunks ``w [D, Vc]`` and calls, per chunk,

* :func:`row_stats`: ``z = x @ w (+ b)`` (soft-capped ``z = cap tanh(z / cap)`` if
  asked), reduced tile by tile, while still in registers / VMEM, to per-row
  ``m = max_j z_j``, ``log_s = log sum_j exp(z_j - m)``, ``label_logit = z[label]`` and
  ``sum_j z_j``; the op merges chunks with the logsumexp identity.
* :func:`dlogits`: the same matmul with ``dz = d loss / d z`` in its epilogue, from the
  global ``(m, log_s)`` and per-row cotangents: ``dz_j = (g_p p_j - g_y [j == label] -
  g_u) (1 - (z_j / cap)^2)``, ``p_j = exp((z_j - m) - log_s)``. The op then forms
  ``dx = dz w^T`` and ``dW = x^T dz`` with XLA dots.

Why (m, log_s) and not one f32 lse: the docstring of ``kernels/softmax_cross_entropy``.

Precision: the matmul accumulates in f32 (bf16 operands at the default precision, f32
operands at ``HIGHEST``, i.e. IEEE f32, as ``kernels/dense``); tanh, exp, the statistics
and dz are f32; dz is cast to x's dtype once at the store.

One file per backend: ``triton.py`` (any CUDA/ROCm GPU), ``mosaic_tpu.py``; ``common.py``
holds the tile dataclass and the math they share.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fusedvjp.kernels import _common
from fusedvjp.kernels.linear_softmax_cross_entropy import mosaic_tpu, triton
from fusedvjp.kernels.linear_softmax_cross_entropy.common import DTYPES, KERNELS, LinearCrossEntropyBlockSizes

__all__ = ["KERNELS", "LinearCrossEntropyBlockSizes", "dlogits", "row_stats"]

_OP_NAME = "linear_softmax_cross_entropy"
# Backend name -> its module (row_stats and dlogits with one signature each).
_BACKENDS = {"triton": triton, "mosaic_tpu": mosaic_tpu}


def _check_operands(x, w, b, labels) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"{_OP_NAME} expects x [C, D] and w [D, Vc]; got x {x.shape}, w {w.shape}")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"{_OP_NAME} expects b [Vc] = [{w.shape[1]}] or None; got b {b.shape}")
    dtypes = {jnp.dtype(t.dtype) for t in (x, w, b) if t is not None}
    if len(dtypes) != 1:
        raise ValueError(f"{_OP_NAME} expects x, w, b of one dtype; got {sorted(d.name for d in dtypes)}")
    if not dtypes <= set(DTYPES):
        raise NotImplementedError(f"{_OP_NAME} kernels take float32 or bfloat16, not {dtypes.pop().name}")
    if 0 in x.shape + w.shape:
        raise NotImplementedError(f"{_OP_NAME} kernels need non-empty operands; got x {x.shape}, w {w.shape}")
    if labels.shape != (x.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{_OP_NAME} expects integer labels [C] = [{x.shape[0]}]; got {labels.dtype} {labels.shape}")


def _check_cap(logit_soft_cap) -> float | None:
    # None or a finite float > 0: validated once, by the public op
    # (ops.linear_softmax_cross_entropy); a precondition here.
    assert logit_soft_cap is None or (math.isfinite(logit_soft_cap) and logit_soft_cap > 0), logit_soft_cap
    return None if logit_soft_cap is None else float(logit_soft_cap)


def _local_labels(labels: jax.Array, v: int) -> jax.Array:
    # A label outside [0, Vc) belongs to another chunk: -1 matches no column, not even
    # one of the tail tile's columns past Vc. Checked before any narrowing to int32.
    return _common.class_indices(labels, v)


def _impls(kernel: str, **static):
    return {name: functools.partial(getattr(module, kernel), **static) for name, module in _BACKENDS.items()}


def row_stats(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    labels: jax.Array,
    *,
    logit_soft_cap: float | None,
    with_logit_sum: bool,
    backend: str | None = None,
    block_sizes: LinearCrossEntropyBlockSizes | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-row softmax statistics of one vocabulary chunk's logits, without writing them.

    Args:
      x: [C, D] float32 or bfloat16.
      w: [D, Vc], x's dtype.
      b: [Vc], x's dtype, or None (a kernel variant without a bias).
      labels: integer [C]; a label outside [0, Vc) (another chunk's) matches no column.
      logit_soft_cap: None, or ``cap > 0``: the logits are ``cap tanh(z / cap)``. Static.
      with_logit_sum: whether to sum the logits (label smoothing needs it); else zeros.
        Static.
      backend: "triton", "mosaic_tpu", or None to pick per lowering platform (CPU
        interprets; see ``_common.platform_dispatch``).
      block_sizes: the kernel's tiles; None picks ``LinearCrossEntropyBlockSizes.default``
        per backend (kernel "stats"). With ``backend=None`` they must suit every backend.

    Returns:
      (m, log_s, label_logit, logit_sum), [C] float32 each: ``m + log_s`` is the row's
      logsumexp over the chunk (``m`` is 0 on a row whose logits are all -inf).

    Raises:
      ValueError: bad shapes, mixed dtypes, options or block sizes.
      NotImplementedError: a dtype other than float32/bfloat16, or an empty dimension.

    Equivalent to::

      z = jnp.dot(x, w, precision=HIGHEST, preferred_element_type=f32) + b
      z = cap * jnp.tanh(z / cap) if cap else z
      m = z.max(-1); log_s = jnp.log(jnp.exp(z - m[:, None]).sum(-1))
      label_logit = jnp.where((0 <= labels) & (labels < Vc), z[arange(C), labels], 0)
      logit_sum = z.sum(-1) if with_logit_sum else jnp.zeros(C)
    """
    _check_operands(x, w, b, labels)
    cap = _check_cap(logit_soft_cap)
    if not isinstance(with_logit_sum, bool):
        raise ValueError(f"with_logit_sum={with_logit_sum!r:.80} must be a Python bool")
    (c, d), v = x.shape, w.shape[1]
    _common.check_block_sizes(block_sizes, LinearCrossEntropyBlockSizes, backend, c, v, d)
    impls = _impls("row_stats", cap=cap, with_logit_sum=with_logit_sum, block_sizes=block_sizes)
    arrays = (x, w) + (() if b is None else (b,)) + (_local_labels(labels, v),)
    return _common.platform_dispatch(impls, *arrays, backend=backend, op_name=_OP_NAME)


def dlogits(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    labels: jax.Array,
    m: jax.Array,
    log_s: jax.Array,
    g_p: jax.Array,
    g_y: jax.Array,
    g_u: jax.Array,
    *,
    logit_soft_cap: float | None,
    backend: str | None = None,
    block_sizes: LinearCrossEntropyBlockSizes | None = None,
) -> jax.Array:
    """Gradient with respect to the pre-cap logits ``x @ w + b`` of one vocabulary chunk.

    For a loss that depends on the chunk's logits through ``g_p``-weighted logsumexp,
    ``g_y``-weighted label logit and ``g_u``-weighted logit sum per row.

    Args:
      x, w, b, labels, logit_soft_cap, backend: as in :func:`row_stats`.
      m, log_s: [C] float32, the logsumexp of the row over the *whole* vocabulary in
        two parts (``row_stats`` merged over chunks): ``p_j = exp((z_j - m) - log_s)``.
      g_p, g_y, g_u: [C] float32, the per-row coefficients of ``p``, the label's
        indicator and 1 (e.g. ``g_p = g (1 + 2 z_loss lse)``, ``g_y = g (1 - a)``,
        ``g_u = g a / V`` for a cross-entropy with smoothing ``a`` and z-loss).
      block_sizes: as in :func:`row_stats` (kernel "dlogits").

    Returns:
      dz [C, Vc] in x's dtype.

    Raises:
      ValueError, NotImplementedError: as in :func:`row_stats`.

    Equivalent to::

      l = jnp.dot(x, w, precision=HIGHEST, preferred_element_type=f32) + b
      z = cap * jnp.tanh(l / cap) if cap else l
      p = jnp.exp((z - m[:, None]) - log_s[:, None])
      d = g_p[:, None] * p - g_y[:, None] * (arange(Vc) == labels[:, None]) - g_u[:, None]
      dz = (d * (1 - (z / cap) ** 2) if cap else d).astype(x.dtype)
    """
    _check_operands(x, w, b, labels)
    cap = _check_cap(logit_soft_cap)
    (c, d), v = x.shape, w.shape[1]
    per_row = {"m": m, "log_s": log_s, "g_p": g_p, "g_y": g_y, "g_u": g_u}
    for name, a in per_row.items():
        if a.shape != (c,):
            raise ValueError(f"{_OP_NAME}: {name} must be [C] = [{c}], got shape {a.shape}")
    _common.check_block_sizes(block_sizes, LinearCrossEntropyBlockSizes, backend, c, v, d)
    impls = _impls("dlogits", cap=cap, block_sizes=block_sizes)
    arrays = (
        (x, w)
        + (() if b is None else (b,))
        + (_local_labels(labels, v),)
        + tuple(a.astype(jnp.float32) for a in per_row.values())
    )
    return _common.platform_dispatch(impls, *arrays, backend=backend, op_name=_OP_NAME)
