"""Fused dense layer ``a = act(x @ w + b)`` with a hand-written backward pass.

The VJP, for ``z = x W + b`` and ``a = tanh(z)`` (``a = z`` without activation):

    dz = g * (1 - a**2)        # tanh'(z) = 1 - tanh(z)**2, so `a` alone suffices
    dx = dz W^T                # [M, N] @ [N, K]
    dW = x^T dz                # [K, M] @ [M, N] = sum over rows of outer products x_r dz_r
    db = sum_rows(dz)          # [N]

The forward output ``a`` is the only residual besides the inputs: tanh' is a function
of ``a``, so neither ``z`` nor a mask needs saving. Per backend, ``dz`` is either
written once by a pass that also sums ``db`` (then ``dx`` and ``dW`` are plain matmuls
of it) or recomputed in f32 in the prologue of both backward matmuls from the ``g``
and ``a`` tiles they load; each backend module says which it does and why.

One file per backend: ``triton.py`` (any CUDA/ROCm GPU), ``mosaic_gpu.py`` (Hopper,
bf16: TMA and wgmma), ``mosaic_tpu.py``; ``common.py`` holds the tiles and the math
they share. Each kernel has its own tiles (``DenseBlockSizes``), named by the problem's
axes: ``block_m`` along M (rows of x), ``block_n`` along N (outputs) and ``block_k``
along K (inputs), whichever is the kernel's reduction axis.

Precision: the matmuls accumulate in f32 (``preferred_element_type``); bias, tanh and
``dz`` are f32; outputs are cast once at the store. For f32 operands every dot asks for
``lax.Precision.HIGHEST``: in jax 0.11.2 the Pallas Triton lowering maps a dot's
default precision (``None``/``DEFAULT``) and ``HIGH`` to Triton's ``input_precision=
"tf32"`` and only ``HIGHEST`` to ``"ieee"`` (``DotAlgorithmPreset.F32_F32_F32`` also
gives ``"ieee"``); Mosaic TPU maps ``HIGHEST`` to ``contract_precision<fp32>`` and
leaves the default to the compiler. The reference matmul uses ``HIGHEST`` too, so
kernel and reference are both IEEE f32. bf16 operands use the default precision: their products
are exact in the f32 accumulator (Triton applies ``input_precision`` to f32 operands
only), and ``HIGHEST`` would make Mosaic emulate f32 passes for nothing. In the bf16
backward, ``dz`` is rounded to bf16 once to feed the MXU/tensor cores next to the bf16
``W``/``x`` tiles, as XLA's bf16 autodiff rounds it; ``db`` sums the f32 ``dz``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedvjp.kernels import _common
from fusedvjp.kernels.dense import mosaic_gpu, mosaic_tpu, triton
from fusedvjp.kernels.dense.common import (
    ACTIVATIONS,
    DTYPES,
    DenseBackwardBlockSizes,
    DenseBlockSizes,
)

from fusedvjp.kernels.dense.mosaic_gpu import DenseMosaicGpuBlockSizes

__all__ = ["DenseBackwardBlockSizes", "DenseBlockSizes", "DenseMosaicGpuBlockSizes", "dense_bwd", "dense_fwd"]

# Backend name -> its module (fwd and bwd with one signature each).
# On an H100/H200 the Mosaic GPU kernels come first (_common.BACKENDS order) for bf16
# shapes they serve: warp-specialized, persistent, 128x256 tiles; the reduction loop's
# instruction issue is 0.08 of its wgmma time against Triton's 0.36-0.41 at
# 8192x4096x4096 (static compile report, bench/results/static-h100; no GPU has timed
# either yet). Triton serves f32, other shapes and other GPUs.
_BACKENDS = {"mosaic_gpu": mosaic_gpu, "triton": triton, "mosaic_tpu": mosaic_tpu}


def _check_args(x, w, b=None) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"dense expects x [M, K] and w [K, N]; got x {x.shape}, w {w.shape}")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"dense expects b [N] = [{w.shape[1]}]; got b {b.shape}")
    dtypes = {jnp.dtype(t.dtype) for t in (x, w, b) if t is not None}
    if len(dtypes) != 1:
        raise ValueError(f"dense expects x, w, b of one dtype; got {sorted(d.name for d in dtypes)}")
    if not dtypes <= set(DTYPES):
        raise NotImplementedError(f"dense kernels take float32 or bfloat16, not {dtypes.pop().name}")
    if 0 in x.shape + w.shape:
        raise NotImplementedError(f"dense kernels need non-empty operands; got x {x.shape}, w {w.shape}")


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown dense activation {activation!r}; expected one of {ACTIVATIONS}")


def dense_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    *,
    activation: str | None,
    backend: str | None = None,
    block_sizes: DenseBlockSizes | None = None,
) -> jax.Array:
    """Fused ``act(x @ w + b)``; the result is also the residual of :func:`dense_bwd`.

    Args:
      x: [M, K] float32 or bfloat16.
      w: [K, N], x's dtype.
      b: [N], x's dtype, or None: then no bias is read (a kernel variant without one).
      activation: None or "tanh".
      backend: "triton", "mosaic_tpu", or None to pick per lowering platform (CPU
        interprets; see ``_common.platform_dispatch``).
      block_sizes: the forward kernel's tiles; None picks ``DenseBlockSizes.default``
        per backend. With ``backend=None`` the sizes must be legal for every backend,
        since a branch is traced for each platform.

    Returns:
      a: [M, N] in x's dtype.

    Raises:
      ValueError: bad shapes, mixed dtypes, activation or block sizes.
      NotImplementedError: a dtype other than float32/bfloat16, or an empty dimension.

    Equivalent to: ``act(jnp.dot(x, w, precision=HIGHEST, preferred_element_type=f32) + b).astype(x.dtype)``
    """
    _check_args(x, w, b)
    _check_activation(activation)
    if block_sizes is not None and not isinstance(block_sizes, (DenseBlockSizes, DenseMosaicGpuBlockSizes)):
        raise TypeError(
            f"dense_fwd block_sizes must be a DenseBlockSizes, DenseMosaicGpuBlockSizes or None, got {block_sizes!r}"
        )
    static = dict(activation=activation, block_sizes=block_sizes)
    impls = {name: functools.partial(backend_module.fwd, **static) for name, backend_module in _BACKENDS.items()}
    arrays = (x, w) if b is None else (x, w, b)
    return _common.platform_dispatch(impls, *arrays, backend=backend, op_name="dense")


def dense_bwd(
    x: jax.Array,
    w: jax.Array,
    a: jax.Array,
    g: jax.Array,
    *,
    has_bias: bool,
    activation: str | None,
    backend: str | None = None,
    block_sizes: DenseBlockSizes | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Gradients of ``a = act(x @ w + b)`` for the cotangent ``g``.

    ``dz = g * (1 - a**2)`` (tanh) or ``g`` (no activation) is formed in f32, and
    rounded to the operand dtype before the matmuls; ``db`` sums the f32 ``dz``.

    Args:
      x: [M, K] forward input.
      w: [K, N] forward weight.
      a: [M, N] forward output (the residual); not read when ``activation`` is None.
      g: [M, N] cotangent of ``a``, a's dtype.
      has_bias: whether the forward had a bias (then db is returned).
      activation: the forward's activation, None or "tanh".
      backend: as in :func:`dense_fwd`.
      block_sizes: a ``DenseBackwardBlockSizes`` (tiles per kernel), one
        ``DenseBlockSizes`` for both backward kernels, or None (defaults per backend).

    Returns:
      (dx [M, K] in x's dtype, dw [K, N] in w's dtype, db [N] in w's dtype or None).

    Raises:
      ValueError: bad shapes, mixed dtypes, activation or block sizes.
      NotImplementedError: as in :func:`dense_fwd`.

    Equivalent to: ``dz = g * (1 - a**2); (dz @ w.T, x.T @ dz, dz.sum(0) if has_bias else None)``
    """
    _check_args(x, w)
    _check_activation(activation)
    mn = (x.shape[0], w.shape[1])
    if a.shape != mn or g.shape != mn or a.dtype != x.dtype or g.dtype != a.dtype:
        raise ValueError(
            f"dense_bwd expects a and g [M, N] = {list(mn)} in {x.dtype}; "
            f"got a {a.shape} {a.dtype}, g {g.shape} {g.dtype}"
        )
    if block_sizes is not None and not isinstance(
        block_sizes, (DenseBlockSizes, DenseBackwardBlockSizes, DenseMosaicGpuBlockSizes)
    ):
        raise TypeError(
            "dense_bwd block_sizes must be a DenseBlockSizes, DenseBackwardBlockSizes, DenseMosaicGpuBlockSizes "
            f"or None, got {block_sizes!r}"
        )
    static = dict(has_bias=has_bias, block_sizes=block_sizes)
    impls = {name: functools.partial(backend_module.bwd, **static) for name, backend_module in _BACKENDS.items()}
    arrays = (x, w, g) if activation is None else (x, w, g, a)
    return _common.platform_dispatch(impls, *arrays, backend=backend, op_name="dense")
