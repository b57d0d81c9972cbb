"""Fused dense layer ``a = act(x @ w + b)`` with a hand-written backward pass.

The VJP, for ``z = x W + b`` and ``a = act(z)`` (``a = z`` without activation):

    dz = g * act'(z)           # tanh: 1 - a**2; gelu: from z (common.dz)
    dx = dz W^T                # [M, N] @ [N, K]
    dW = x^T dz                # [K, M] @ [M, N] = sum over rows of outer products x_r dz_r
    db = sum_rows(dz)          # [N]

One residual besides the inputs: the forward output ``a`` for tanh (tanh' is a function
of ``a``, so nothing extra is written), the pre-activation ``z`` for ``"gelu"`` and
``"gelu_exact"`` (gelu' is not a function of gelu(z); the forward then writes ``z`` as
a second output, see ``common.saves_preactivation``). Per backend, ``dz`` is either
written once by a pass that also sums ``db`` (then ``dx`` and ``dW`` are plain matmuls
of it) or recomputed in f32 in the prologue of both backward matmuls from the ``g``
and residual tiles they load; each backend module says which it does and why.

One file per backend: ``triton.py`` (any CUDA/ROCm GPU), ``mosaic_gpu.py`` (Hopper,
bf16: TMA and wgmma), ``mosaic_tpu.py``; ``common.py`` holds the tiles and the math
they share. Each kernel has its own tiles (``DenseBlockSizes``), named by the problem's
axes: ``block_m`` along M (rows of x), ``block_n`` along N (outputs) and ``block_k``
along K (inputs), whichever is the kernel's reduction axis.

Precision: the matmuls accumulate in f32 (``preferred_element_type``); bias, activation
and ``dz`` are f32; outputs are cast once at the store. For f32 operands every dot asks for
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
    saves_preactivation,
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
    return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Fused ``act(x @ w + b)``, and with ``return_residual`` the residual of :func:`dense_bwd`.

    Args:
      x: [M, K] float32 or bfloat16.
      w: [K, N], x's dtype.
      b: [N], x's dtype, or None: then no bias is read (a kernel variant without one).
      activation: one of ``ACTIVATIONS``: None, "tanh", "gelu" (tanh approximation,
        ``jax.nn.gelu(approximate=True)``) or "gelu_exact" (erf).
      backend: "triton", "mosaic_tpu", or None to pick per lowering platform (CPU
        interprets; see ``_common.platform_dispatch``).
      block_sizes: the forward kernel's tiles; None picks ``DenseBlockSizes.default``
        per backend. With ``backend=None`` the sizes must be legal for every backend,
        since a branch is traced for each platform.
      return_residual: also return the backward's residual: ``a`` itself for None and
        "tanh", the pre-activation ``z = x @ w + b`` (x's dtype, a second output of the
        same kernel) for "gelu" and "gelu_exact".

    Returns:
      a: [M, N] in x's dtype; ``(a, residual)`` with ``return_residual``.

    Raises:
      ValueError: bad shapes, mixed dtypes, activation or block sizes.
      NotImplementedError: a dtype other than float32/bfloat16, or an empty dimension;
        "gelu_exact" on Triton (no erf lowering).

    Equivalent to: ``act(jnp.dot(x, w, precision=HIGHEST, preferred_element_type=f32) + b).astype(x.dtype)``
    """
    _check_args(x, w, b)
    _check_activation(activation)
    if block_sizes is not None and not isinstance(block_sizes, (DenseBlockSizes, DenseMosaicGpuBlockSizes)):
        raise TypeError(
            f"dense_fwd block_sizes must be a DenseBlockSizes, DenseMosaicGpuBlockSizes or None, got {block_sizes!r}"
        )
    write_z = return_residual and saves_preactivation(activation)
    static = dict(activation=activation, block_sizes=block_sizes, write_z=write_z)
    impls = {name: functools.partial(backend_module.fwd, **static) for name, backend_module in _BACKENDS.items()}
    arrays = (x, w) if b is None else (x, w, b)
    out = _common.platform_dispatch(impls, *arrays, backend=backend, op_name="dense")
    if not return_residual or write_z:
        return out
    return out, out


def dense_bwd(
    x: jax.Array,
    w: jax.Array,
    residual: jax.Array,
    g: jax.Array,
    *,
    has_bias: bool,
    activation: str | None,
    backend: str | None = None,
    block_sizes: DenseBlockSizes | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Gradients of ``a = act(x @ w + b)`` for the cotangent ``g``.

    ``dz = g * act'(z)`` (``common.dz``: ``g * (1 - a**2)`` for tanh, ``g`` without
    activation) is formed in f32, and rounded to the operand dtype before the matmuls;
    ``db`` sums the f32 ``dz``.

    Args:
      x: [M, K] forward input.
      w: [K, N] forward weight.
      residual: [M, N] from :func:`dense_fwd` with ``return_residual``: the output ``a``
        (tanh), the pre-activation ``z`` (gelu, gelu_exact); not read when
        ``activation`` is None.
      g: [M, N] cotangent of ``a``, x's dtype.
      has_bias: whether the forward had a bias (then db is returned).
      activation: the forward's activation.
      backend: as in :func:`dense_fwd`.
      block_sizes: a ``DenseBackwardBlockSizes`` (tiles per kernel), one
        ``DenseBlockSizes`` for both backward kernels, or None (defaults per backend).

    Returns:
      (dx [M, K] in x's dtype, dw [K, N] in w's dtype, db [N] in w's dtype or None).

    Raises:
      ValueError: bad shapes, mixed dtypes, activation or block sizes.
      NotImplementedError: as in :func:`dense_fwd`.

    Equivalent to: ``dz = g * act'(z); (dz @ w.T, x.T @ dz, dz.sum(0) if has_bias else None)``
    """
    _check_args(x, w)
    _check_activation(activation)
    mn = (x.shape[0], w.shape[1])
    r = residual
    if r.shape != mn or g.shape != mn or r.dtype != x.dtype or g.dtype != x.dtype:
        raise ValueError(
            f"dense_bwd expects residual and g [M, N] = {list(mn)} in {x.dtype}; "
            f"got residual {r.shape} {r.dtype}, g {g.shape} {g.dtype}"
        )
    if block_sizes is not None and not isinstance(
        block_sizes, (DenseBlockSizes, DenseBackwardBlockSizes, DenseMosaicGpuBlockSizes)
    ):
        raise TypeError(
            "dense_bwd block_sizes must be a DenseBlockSizes, DenseBackwardBlockSizes, DenseMosaicGpuBlockSizes "
            f"or None, got {block_sizes!r}"
        )
    static = dict(has_bias=has_bias, activation=activation, block_sizes=block_sizes)
    impls = {name: functools.partial(backend_module.bwd, **static) for name, backend_module in _BACKENDS.items()}
    arrays = (x, w, g) if activation is None else (x, w, g, r)
    return _common.platform_dispatch(impls, *arrays, backend=backend, op_name="dense")
