"""Pallas kernels for rms_norm: forward and backward. The derivation is in ops/rms_norm.py.

Per row ``x`` of ``[N, D]``: ``y = x * rstd * scale`` with
``rstd = 1 / sqrt(mean(x**2) + eps)``; the forward also writes the f32 ``rstd`` per row,
the one residual of the backward:

    xhat = x * rstd          dxhat = g * scale   (g without a scale)
    dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
    dscale = sum_rows(g * xhat)

The design is layer_norm's (kernels/layer_norm) without the mean: a grid over blocks of
``block_rows`` rows; Triton walks each row's ``D`` columns in ``block_cols`` steps (one
loop for the sum of squares, one for the output; the row is loaded once when
``D <= block_cols``), Mosaic TPU holds whole rows in VMEM and refuses rows too long for
its budget. ``dscale`` is summed per row block into ``[cdiv(N, block_rows), D]`` f32
partials that a jnp sum finishes (layer_norm's package docstring has the cost
argument). ``scale=None`` is its own kernel: no parameter is loaded and no ``dscale``
partial is written.

One file per backend: ``triton.py`` and ``mosaic_tpu.py``; ``common.py`` holds the
tiles (``RmsNormBlockSizes``) and what both share.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedvjp.kernels import _common
from fusedvjp.kernels.layer_norm.common import DTYPES
from fusedvjp.kernels.rms_norm import mosaic_tpu, triton
from fusedvjp.kernels.rms_norm.common import RmsNormBlockSizes

__all__ = ["RmsNormBlockSizes", "rms_norm_bwd", "rms_norm_fwd"]

# Backend name -> its module (fwd and bwd with one signature each). Another backend is one
# more module and one more entry here (docs/adding-an-op.md, step 5).
_BACKENDS = {"triton": triton, "mosaic_tpu": mosaic_tpu}


def _check_args(x, scale) -> None:
    if x.ndim != 2:
        raise ValueError(f"rms_norm kernels take x [N, D], got shape {x.shape}")
    n, d = x.shape
    if scale is not None and (scale.shape != (d,) or scale.dtype != x.dtype):
        raise ValueError(f"rms_norm kernels take scale [D]=({d},) in x's dtype {x.dtype}; got {scale.shape} "
                         f"{scale.dtype}")
    if jnp.dtype(x.dtype) not in DTYPES:
        raise NotImplementedError(f"x dtype {x.dtype} (the kernels take float32 or bfloat16)")
    if n == 0 or d == 0:
        raise NotImplementedError(f"empty input {x.shape}")


def rms_norm_fwd(x: jax.Array, scale: jax.Array | None, *, eps: float, backend: str | None = None,
                 block_sizes: RmsNormBlockSizes | None = None) -> tuple[jax.Array, jax.Array]:
    """RMS norm over the last axis, and the per-row ``rstd`` the backward needs.

    Args:
      x: [N, D] float32 or bfloat16.
      scale: [D] in x's dtype, or None (absent: not read).
      eps: added to the f32 mean square; at least 8.2e-26 (``_common.check_variance_eps``).
      backend: "triton", "mosaic_tpu", or None to pick per lowering platform (CPU
        interprets; see ``_common.platform_dispatch``).
      block_sizes: None for each backend's default, or a tile that must suit ``backend``
        (every backend when ``backend`` is None).

    Returns:
      ``(y, rstd)``: y [N, D] in x's dtype; rstd [N] float32.

    Raises:
      ValueError: bad shapes, dtypes, eps or block sizes.
      NotImplementedError: a dtype other than float32/bfloat16, an empty input, or (TPU)
        rows too long for VMEM.

    Equivalent to: ``rstd = rsqrt((x**2).mean(-1) + eps); y = x * rstd[:, None] * scale``
    in f32 (no ``* scale`` when None), y cast to x.dtype.
    """
    _check_args(x, scale)
    _common.check_variance_eps("eps", eps, jnp.float32)  # the kernels add it to an f32 mean square
    _common.check_block_sizes(block_sizes, RmsNormBlockSizes, backend, *x.shape, backends=tuple(_BACKENDS))
    static = dict(eps=float(eps), block_sizes=block_sizes)
    impls = {name: functools.partial(module.fwd, **static) for name, module in _BACKENDS.items()}
    return _common.platform_dispatch(impls, x, scale, backend=backend, op_name="rms_norm")


def rms_norm_bwd(x: jax.Array, scale: jax.Array | None, rstd: jax.Array, g: jax.Array, *,
                 backend: str | None = None,
                 block_sizes: RmsNormBlockSizes | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Cotangents of :func:`rms_norm_fwd`'s ``y`` with respect to x and scale.

    Args:
      x, scale, backend, block_sizes: as passed to the forward.
      rstd: [N] float32, the forward's residual.
      g: [N, D] cotangent of y, in x's dtype.

    Returns:
      ``(dx [N, D], dscale [D])`` in x's dtype (f32 math, one rounding); ``dscale`` is
      None when ``scale`` is.

    Raises:
      ValueError / NotImplementedError: as in :func:`rms_norm_fwd`.

    Equivalent to: ``xhat = x * rstd[:, None]; dxhat = g * scale;
    dx = rstd[:, None] * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdims=True));
    dscale = (g * xhat).sum(0)``.
    """
    _check_args(x, scale)
    n, _ = x.shape
    if g.shape != x.shape or g.dtype != x.dtype:
        raise ValueError(f"g must be [N, D]={x.shape} in {x.dtype}, got {g.shape} {g.dtype}")
    if rstd.shape != (n,) or rstd.dtype != jnp.float32:
        raise ValueError(f"rstd must be [N]=({n},) float32, got {rstd.shape} {rstd.dtype}")
    _common.check_block_sizes(block_sizes, RmsNormBlockSizes, backend, *x.shape, backends=tuple(_BACKENDS))
    impls = {name: functools.partial(module.bwd, block_sizes=block_sizes) for name, module in _BACKENDS.items()}
    return _common.platform_dispatch(impls, x, scale, rstd, g, backend=backend, op_name="rms_norm")
