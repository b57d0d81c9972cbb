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


def finish_column_sums(dscale_partial, dbias_partial, dtype):
    """The last step of the column reductions: partial sums [cdiv(N, block_rows), ..., D] f32 -> [D].

    Done inside each backend's branch: the branches of platform_dispatch must return the
    same shapes, and the backends' default block_rows (so their partials) differ.
    """
    d = dscale_partial.shape[-1]
    return tuple(jnp.sum(p.reshape(-1, d), axis=0).astype(dtype) for p in (dscale_partial, dbias_partial))


def cost_estimate(x, *, backward: bool) -> pl.CostEstimate:
    n, d = x.shape
    s = x.dtype.itemsize
    if backward:  # read x, g; write dx; per-row stats in, partial sums out
        return pl.CostEstimate(flops=13 * n * d, transcendentals=0, bytes_accessed=3 * n * d * s + 8 * n + 3 * d * 4)
    return pl.CostEstimate(flops=7 * n * d, transcendentals=n, bytes_accessed=2 * n * d * s + 8 * n + 2 * d * s)
