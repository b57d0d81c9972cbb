"""Pallas kernels for layer_norm: forward and backward. See ops/layer_norm.py for the math.

Per row ``x`` of ``[N, D]``: ``y = (x - mean) * rstd * scale + bias`` with
``rstd = 1 / sqrt(var + eps)``; the forward also writes the f32 ``mean`` and ``rstd``
per row, the residuals of the backward:

    xhat = (x - mean) * rstd          dxhat = g * scale
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dscale = sum_rows(g * xhat)       dbias = sum_rows(g)

``scale`` and ``bias`` are each optional (``None``: absent, ``dscale``/``dbias`` not
computed). Absence is known when the kernel is traced, so each combination is its own
kernel that neither loads a parameter nor computes a column sum it does not need
(``dxhat = g`` without ``scale``) -- no multiply by a vector of ones.

Grid: one axis over blocks of ``block_rows`` rows, on both backends.

* Triton: the program walks the row's ``D`` columns in ``block_cols`` steps (two
  in-kernel loops: statistics, then output), so any ``D`` fits in registers. The
  forward's statistics use Chan's pairwise update of (mean, sum of squared deviations)
  per column block -- as stable as the two-pass formula, with one read of ``x`` for the
  statistics instead of two. With ``D <= block_cols`` the row is loaded once.
* Mosaic TPU: a block holds whole rows (``[block_rows, D]``, always a legal TPU block
  since the last dim is the whole array's); a row of ``D = 8192`` f32 is 32 KiB of VMEM,
  and ``block_rows`` is sized to a VMEM budget. Rows too long for the budget even at 8
  rows raise ``NotImplementedError`` (the op then falls back to jnp).

``dscale``/``dbias`` are column sums over all ``N`` rows. Each backward program sums its
own block of rows in f32 and writes one row of partial sums, ``[cdiv(N, block_rows), D]``
f32 per parameter; a jnp sum over that small array finishes the reduction. The
alternatives: per-row partials would be ``[N, D]`` (as large as ``dx``); a second kernel
that walks the columns (JAX's GPU example does) reads ``x`` and ``g`` a second time,
2 N D elements; atomics are not expressible portably in Pallas. The partials cost
``2 * 2 * 4 * D * N / block_rows`` bytes (write + read, two parameters) against the
``3 N D`` elements ``x``, ``g``, ``dx`` must move anyway -- under 10% at
``block_rows = 32`` in bf16, which is why ``block_rows`` defaults to 32 rather than 1.

One file per backend: ``triton.py`` and ``mosaic_tpu.py``, each with its kernels,
launchers and tile rules; ``common.py`` holds the tile dataclass (``LayerNormBlockSizes``)
and what both share.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedvjp.kernels import _common
from fusedvjp.kernels.layer_norm import mosaic_tpu, triton
from fusedvjp.kernels.layer_norm.common import DTYPES, LayerNormBlockSizes

__all__ = ["DTYPES", "LayerNormBlockSizes", "layer_norm_bwd", "layer_norm_fwd"]

_OP_NAME = "layer_norm"
# Backend name -> its module (fwd and bwd with one signature each).
_BACKENDS = {"triton": triton, "mosaic_tpu": mosaic_tpu}


def _check_args(x, **params) -> None:
    if x.ndim != 2:
        raise ValueError(f"layer_norm kernels take x [N, D], got shape {x.shape}")
    n, d = x.shape
    for name, p in params.items():
        if p is not None and (p.shape != (d,) or p.dtype != x.dtype):
            raise ValueError(f"layer_norm kernels take {name} [D]=({d},) in x's dtype {x.dtype}; got {p.shape} {p.dtype}")
    if jnp.dtype(x.dtype) not in DTYPES:
        raise NotImplementedError(f"x dtype {x.dtype} (the kernels take float32 or bfloat16)")
    if n == 0 or d == 0:
        raise NotImplementedError(f"empty input {x.shape}")


def layer_norm_fwd(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    eps: float,
    backend: str | None = None,
    block_sizes: LayerNormBlockSizes | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Layer norm over the last axis, and the per-row statistics the backward needs.

    Args:
      x: [N, D] float32 or bfloat16.
      scale, bias: [D] in x's dtype, or None (absent: not read).
      eps: added to the f32 variance; at least 8.2e-26 (``_common.check_variance_eps``).
      backend: "triton", "mosaic_tpu", or None to pick per lowering platform (CPU
        interprets; see ``_common.platform_dispatch``).
      block_sizes: None for each backend's default, or a tile that must suit ``backend``
        (every backend when ``backend`` is None).

    Returns:
      ``(y, (mean, rstd))``: y [N, D] in x's dtype; mean, rstd [N] float32.

    Raises:
      ValueError: bad shapes, dtypes, eps or block sizes.
      NotImplementedError: a dtype other than float32/bfloat16, an empty input, or (TPU)
        rows too long for VMEM.

    Equivalent to: ``mean = x.mean(-1); rstd = rsqrt(x.var(-1) + eps);
    y = (x - mean[:, None]) * rstd[:, None] * scale + bias`` in f32 (a factor or term
    left out when None), y cast to x.dtype.
    """
    _check_args(x, scale=scale, bias=bias)
    _common.check_variance_eps("eps", eps, jnp.float32)  # the kernels add it to an f32 variance
    n, d = x.shape
    _common.check_block_sizes(block_sizes, LayerNormBlockSizes, backend, n, d)
    static = dict(eps=float(eps), block_sizes=block_sizes)
    impls = {name: functools.partial(module.fwd, **static) for name, module in _BACKENDS.items()}
    return _common.platform_dispatch(impls, x, scale, bias, backend=backend, op_name=_OP_NAME)


def layer_norm_bwd(
    x: jax.Array,
    scale: jax.Array | None,
    mean: jax.Array,
    rstd: jax.Array,
    g: jax.Array,
    *,
    has_bias: bool,
    backend: str | None = None,
    block_sizes: LayerNormBlockSizes | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cotangents of :func:`layer_norm_fwd`'s ``y`` with respect to x, scale and bias.

    Args:
      x, scale, backend, block_sizes: as passed to the forward.
      mean, rstd: [N] float32, the forward's residuals.
      g: [N, D] cotangent of y, in x's dtype.
      has_bias: whether the forward had a bias (then ``dbias`` is computed).

    Returns:
      ``(dx [N, D], dscale [D], dbias [D])``, all in x's dtype (f32 math, one rounding);
      ``dscale`` is None when ``scale`` is, ``dbias`` when ``has_bias`` is False.

    Raises:
      ValueError / NotImplementedError: as in :func:`layer_norm_fwd`.

    Equivalent to: ``xhat = (x - mean[:, None]) * rstd[:, None]; dxhat = g * scale;
    dx = rstd[:, None] * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True));
    dscale = (g * xhat).sum(0); dbias = g.sum(0)`` (``dxhat = g`` without scale).
    """
    _check_args(x, scale=scale)
    n, d = x.shape
    if g.shape != x.shape or g.dtype != x.dtype:
        raise ValueError(f"g must be [N, D]={x.shape} in {x.dtype}, got {g.shape} {g.dtype}")
    for name, a in (("mean", mean), ("rstd", rstd)):
        if a.shape != (n,) or a.dtype != jnp.float32:
            raise ValueError(f"{name} must be [N]=({n},) float32, got {a.shape} {a.dtype}")
    _common.check_block_sizes(block_sizes, LayerNormBlockSizes, backend, n, d)
    static = dict(has_bias=bool(has_bias), block_sizes=block_sizes)
    impls = {name: functools.partial(module.bwd, **static) for name, module in _BACKENDS.items()}
    return _common.platform_dispatch(impls, x, scale, mean, rstd, g, backend=backend, op_name=_OP_NAME)
