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
import math

import jax
import jax.numpy as jnp
from jax import lax

from fusedvjp.kernels import _common

ACTIVATIONS = (None, "tanh", "gelu", "gelu_exact")
# The activations whose backward needs the pre-activation z, not the output a.
PREACTIVATION_RESIDUAL = ("gelu", "gelu_exact")
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


# gelu (tanh approximation) = 0.5 z (1 + tanh(u)), u = c (z + 0.044715 z^3), c = sqrt(2/pi):
# jax.nn.gelu(approximate=True). gelu_exact = z Phi(z) = 0.5 z (1 + erf(z / sqrt 2)).
GELU_C = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def saves_preactivation(activation: str | None) -> bool:
    """Whether the backward's residual is z = x W + b rather than the output a.

    tanh' = 1 - tanh^2 is a function of the output a, which the forward writes anyway.
    gelu' is not a function of gelu(z): gelu has a minimum near z = -0.75, so two z
    share each value of a in (-0.17, 0) and their slopes differ. Its backward needs z,
    which the forward writes as a second output when residuals are asked for.
    """
    return activation in PREACTIVATION_RESIDUAL


def activate(z: jax.Array, activation: str | None) -> jax.Array:
    """act(z) for an f32 z."""
    if activation == "tanh":
        return jnp.tanh(z)
    if activation == "gelu":
        return 0.5 * z * (1.0 + jnp.tanh(GELU_C * (z + GELU_CUBIC * (z * z * z))))
    if activation == "gelu_exact":
        return 0.5 * z * (1.0 + lax.erf(z * SQRT_HALF))
    return z


def derivative(r: jax.Array, activation: str) -> jax.Array:
    """act'(z) from the forward's residual ``r`` (see saves_preactivation), in r's dtype.

    tanh:       act' = 1 - a^2                                        (r = a)
    gelu:       act' = 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 * 0.044715 z^2),
                t = tanh(c (z + 0.044715 z^3))                        (r = z)
    gelu_exact: act' = Phi(z) + z phi(z), phi(z) = exp(-z^2 / 2) / sqrt(2 pi)   (r = z)
    """
    if activation == "tanh":
        return 1.0 - r * r
    z2 = r * r
    if activation == "gelu":
        t = jnp.tanh(GELU_C * (r + GELU_CUBIC * (z2 * r)))
        return 0.5 * (1.0 + t) + 0.5 * r * (1.0 - t * t) * (GELU_C * (1.0 + 3.0 * GELU_CUBIC * z2))
    if activation == "gelu_exact":
        return 0.5 * (1.0 + lax.erf(r * SQRT_HALF)) + r * (INV_SQRT_2PI * jnp.exp(-0.5 * z2))
    raise ValueError(f"unknown dense activation {activation!r}; expected one of {ACTIVATIONS}")


def dz(g: jax.Array, residual: jax.Array | None, activation: str | None) -> jax.Array:
    """dz = g * act'(z) in f32; dz = g without activation (no residual is read)."""
    g = g.astype(jnp.float32)
    if activation is None:
        return g
    return g * derivative(residual.astype(jnp.float32), activation)
