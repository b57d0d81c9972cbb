"""What every dense backend shares: the tile dataclasses, the dtypes, and the math.

The tiles are named by the dense problem's dimensions -- ``block_m`` along M (rows of
x), ``block_n`` along N (outputs), ``block_k`` along K (inputs) -- in every kernel, so
one name means one axis whichever kernel reads it. Each kernel has its own tiles
(``DenseBlockSizes.default(..., kernel=...)``): the forward reduces over K, ``dx`` over
N and ``dW`` over M, so a good reduction step for one is an output-tile side of the
others.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from fusedvjp.kernels import _common

ACTIVATIONS = (None, "tanh")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# The three kernels of one forward + backward, as the tuning table and `default()` name them.
KERNELS = ("fwd", "dx", "dw")

# Contracting dimension numbers: dz [bm, bn] . w [bk, bn] over N -> [bm, bk];
# x [bm, bk] . dz [bm, bn] over M -> [bk, bn].
CONTRACT_LAST = (((1,), (1,)), ((), ()))
CONTRACT_FIRST = (((0,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class DenseBlockSizes:
    """The tiles of one dense kernel.

    Attributes:
      block_m: rows of x per tile (the reduction step of the dW kernel).
      block_n: output features per tile (the reduction step of the dx kernel).
      block_k: input features per tile (the reduction step of the forward kernel).
      num_warps: Triton only: warps per program, a power of two.
      num_stages: Triton only: software-pipelining depth of the reduction loop.

    Backend rules (checked when a kernel is built, since one value may serve either
    backend): Triton needs powers of two >= 16 that fit shared memory; Mosaic TPU
    needs ``block_m`` a multiple of 8 and ``block_n``, ``block_k`` multiples of 128,
    each unless it equals the whole dimension, and none larger than its dimension.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _common.validate_block_fields(self, ("block_m", "block_n", "block_k", "num_warps", "num_stages"))

    @classmethod
    def default(cls, m: int, n: int, k: int, dtype, backend: str, kernel: str = "fwd") -> DenseBlockSizes:
        """Tiles of ``kernel`` ("fwd", "dx" or "dw") for an [M, K] @ [K, N] problem in
        ``dtype`` on ``backend``.

        A measured entry of the tuning table (``kernels/tuning.json``, key
        ``dense_<kernel>``, see ``_common.tuned_block_sizes``) wins; otherwise the
        backend's heuristic, whose evidence is stated beside it.
        """
        if kernel not in KERNELS:
            raise ValueError(f"unknown dense kernel {kernel!r}; expected one of {KERNELS}")
        tuned = _common.tuned_block_sizes(cls, f"dense_{kernel}", (m, n, k), dtype, backend)
        if tuned is not None:
            return tuned
        dtype = jnp.dtype(dtype)
        if backend == "triton":
            from fusedvjp.kernels.dense import triton

            return triton.default_block_sizes(m, n, k, dtype, kernel)
        if backend == "mosaic_tpu":
            from fusedvjp.kernels.dense import mosaic_tpu

            return mosaic_tpu.default_block_sizes(m, n, k, dtype, kernel)
        raise ValueError(
            f"no dense block-size default for backend {backend!r}; expected 'triton' or 'mosaic_tpu' "
            "(the Mosaic GPU kernels have their own tiles, mosaic_gpu.DenseMosaicGpuBlockSizes)"
        )


@dataclasses.dataclass(frozen=True)
class DenseBackwardBlockSizes:
    """The tiles of the two backward kernels: ``dx = dz W^T`` and ``dW = x^T dz``."""

    dx: DenseBlockSizes
    dw: DenseBlockSizes

    def __post_init__(self):
        for name in ("dx", "dw"):
            if not isinstance(getattr(self, name), DenseBlockSizes):
                raise TypeError(f"DenseBackwardBlockSizes.{name} must be a DenseBlockSizes, got {getattr(self, name)!r}")


def _refuse_foreign(block_sizes, backend: str) -> None:
    # Tiles of another backend (the Mosaic GPU ones): with backend=None every backend is
    # offered the caller's tiles, and the one they belong to takes the case.
    if block_sizes is not None and not isinstance(block_sizes, (DenseBlockSizes, DenseBackwardBlockSizes)):
        raise NotImplementedError(f"the {backend} dense kernels take DenseBlockSizes, not {type(block_sizes).__name__}")


def forward_block_sizes(block_sizes, m: int, n: int, k: int, dtype, backend: str) -> DenseBlockSizes:
    """``dense_fwd``'s ``block_sizes`` for a Triton or TPU kernel, the default filled in."""
    _refuse_foreign(block_sizes, backend)
    return block_sizes or DenseBlockSizes.default(m, n, k, dtype, backend, "fwd")


def backward_block_sizes(block_sizes, m: int, n: int, k: int, dtype, backend: str) -> DenseBackwardBlockSizes:
    """``dense_bwd``'s ``block_sizes`` (None, one DenseBlockSizes for both kernels, or a
    DenseBackwardBlockSizes) as per-kernel tiles, defaults filled in."""
    _refuse_foreign(block_sizes, backend)
    if isinstance(block_sizes, DenseBackwardBlockSizes):
        return block_sizes
    if isinstance(block_sizes, DenseBlockSizes):
        return DenseBackwardBlockSizes(block_sizes, block_sizes)
    return DenseBackwardBlockSizes(*(DenseBlockSizes.default(m, n, k, dtype, backend, kernel) for kernel in ("dx", "dw")))


# --- shared math --------------------------------------------------------------------------


def dot_precision(dtype) -> lax.Precision:
    # IEEE f32 for f32 operands; see the package docstring for each lowering.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def activate(z: jax.Array, activation: str | None) -> jax.Array:
    return jnp.tanh(z) if activation == "tanh" else z


def dz(g: jax.Array, a: jax.Array | None) -> jax.Array:
    """dz = g * tanh'(z) = g * (1 - a^2) in f32; dz = g without activation (a is None)."""
    g = g.astype(jnp.float32)
    if a is None:
        return g
    a = a.astype(jnp.float32)
    return g * (1.0 - a * a)
