"""What both layer_norm backends share: the tile dataclass, the dtypes, the cost estimate
and the last step of the backward's column sums."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from fusedvjp.kernels import _common

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class LayerNormBlockSizes:
    """Tile of the ``[N, D]`` input one program works on.

    Attributes:
      block_rows: rows per program (both backends); also the number of rows each
        ``dscale``/``dbias`` partial sum covers.
      block_cols: Triton only: columns per step of the in-kernel loop over ``D``.
        Mosaic TPU blocks hold whole rows and ignore it.
      num_warps: Triton only, a power of two.
      num_stages: Triton only: software pipelining of the column loops.

    Backend rules (checked when a kernel is built, by :meth:`check`): Triton needs
    ``block_rows`` and ``block_cols`` powers of two; Mosaic TPU needs ``block_rows`` a
    multiple of 8 no larger than ``N``, or ``N`` itself.
    """

    block_rows: int
    block_cols: int
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        _common.validate_block_fields(self, ("block_rows", "block_cols", "num_warps", "num_stages"))

    @classmethod
    def default(cls, rows: int, cols: int, dtype, backend: str) -> LayerNormBlockSizes:
        """Default tile for ``[rows, cols]`` input of ``dtype`` on ``backend``.

        Not measured on a GPU or TPU: each choice follows the lowering rules and the
        register / VMEM budgets stated beside it. A measured entry of the tuning table
        (``kernels/tuning.json``, see ``_common.tuned_block_sizes``) wins.
        """
        tuned = _common.tuned_block_sizes(cls, "layer_norm", (rows, cols), dtype, backend)
        if tuned is not None:
            return tuned
        del dtype  # the math is f32 whatever the input dtype; tiles are sized for f32
        return _backend_module(backend).default_block_sizes(rows, cols)

    def check(self, rows: int, cols: int, backend: str) -> None:
        """Raises ValueError if this tile breaks ``backend``'s lowering rules for ``[rows, cols]``."""
        _backend_module(backend).check_block_sizes(self, rows, cols)


def _backend_module(backend: str):
    return _common.backend_module("fusedvjp.kernels.layer_norm", backend)


def present_arrays(*arrays):
    """The arrays a pallas_call gets: absent (None) parameters and residuals left out."""
    return [a for a in arrays if a is not None]


def unpack_refs(refs, present):
    """A kernel's refs in signature order, None where ``present`` is False (an absent
    parameter or cotangent: the pallas_call got no array for it, see present_arrays)."""
    it = iter(refs)
    out = [next(it) if p else None for p in present]
    if next(it, None) is not None:
        raise ValueError(f"{len(refs)} refs for {sum(present)} present arrays")
    return out


def finish_column_sums(partials, has_scale: bool, has_bias: bool, dtype):
    """The last step of the column reductions: the present partial sums
    [cdiv(N, block_rows), ..., D] f32 (dscale's first) -> (dscale, dbias) [D] each, None
    where that parameter is absent.

    Done inside each backend's branch: the branches of platform_dispatch must return the
    same shapes, and the backends' default block_rows (so their partials) differ.
    """
    sums = iter(jnp.sum(p.reshape(-1, p.shape[-1]), axis=0).astype(dtype) for p in partials)
    return next(sums) if has_scale else None, next(sums) if has_bias else None


def cost_estimate(x, *, has_scale: bool, has_bias: bool, backward: bool) -> pl.CostEstimate:
    n, d = x.shape
    s = x.dtype.itemsize
    params = has_scale + has_bias
    if backward:  # read x, g (and scale); write dx; per-row stats in, partial sums out
        return pl.CostEstimate(flops=(10 + 3 * has_scale) * n * d, transcendentals=0,
                               bytes_accessed=3 * n * d * s + 8 * n + has_scale * d * s + params * d * 4)
    return pl.CostEstimate(flops=(5 + params) * n * d, transcendentals=n,
                           bytes_accessed=2 * n * d * s + 8 * n + params * d * s)
