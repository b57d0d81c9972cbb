"""What both rms_norm backends share: the tile dataclass and the cost estimate. The
plumbing for an absent scale (``present_arrays``, ``unpack_refs``,
``finish_column_sums``) is layer_norm's (kernels/layer_norm/common.py)."""

from __future__ import annotations

import dataclasses

from jax.experimental import pallas as pl

from fusedvjp.kernels import _common


@dataclasses.dataclass(frozen=True)
class RmsNormBlockSizes:
    """Tile of the ``[N, D]`` input one program works on (layer_norm's rules).

    Attributes:
      block_rows: rows per program (both backends); also the number of rows each
        ``dscale`` partial sum covers.
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
    def default(cls, rows: int, cols: int, dtype, backend: str) -> RmsNormBlockSizes:
        """Tiles for an ``[rows, cols]`` input in ``dtype`` on ``backend``: a measured entry
        of the tuning table (``kernels/tuning.json``, see ``_common.tuned_block_sizes``)
        if there is one, else the backend module's ``default_block_sizes``."""
        tuned = _common.tuned_block_sizes(cls, "rms_norm", (rows, cols), dtype, backend)
        if tuned is not None:
            return tuned
        del dtype  # the math is f32 whatever the input dtype; tiles are sized for f32
        return _backend_module(backend).default_block_sizes(rows, cols)

    def check(self, rows: int, cols: int, backend: str) -> None:
        """Raises ValueError, naming the values, if this tile breaks ``backend``'s rules."""
        _backend_module(backend).check_block_sizes(self, rows, cols)


def _backend_module(backend: str):
    return _common.backend_module("fusedvjp.kernels.rms_norm", backend)


def cost_estimate(x, *, has_scale: bool, backward: bool) -> pl.CostEstimate:
    n, d = x.shape
    s = x.dtype.itemsize
    if backward:  # read x, g (and scale); write dx; rstd in, dscale partials out
        return pl.CostEstimate(flops=(7 + 3 * has_scale) * n * d, transcendentals=0,
                               bytes_accessed=3 * n * d * s + 4 * n + has_scale * d * (s + 4))
    return pl.CostEstimate(flops=(3 + has_scale) * n * d, transcendentals=n,
                           bytes_accessed=2 * n * d * s + 4 * n + has_scale * d * s)
