"""RMS norm kernels for GPUs through the Pallas Triton lowering.

The refs are whole arrays; each program loads its [block_rows, block_cols] tiles
through pl.ds windows with masked loads and stores (layer_norm's loaders), so nothing
past the array is read or written, and masked entries are 0 before every sum.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.layer_norm.common import finish_column_sums, present_arrays, unpack_refs
from fusedvjp.kernels.layer_norm.triton import TILE_ELEMS, col_start, iota, load_tile, load_vector
from fusedvjp.kernels.rms_norm.common import RmsNormBlockSizes, cost_estimate


def default_block_sizes(rows: int, cols: int) -> RmsNormBlockSizes:
    # layer_norm's tiles (kernels/layer_norm/triton.py: 32 x 128, 0 spills on an H100 in
    # its static report); these kernels hold fewer temporaries (no mean). Not measured
    # on a GPU.
    block_cols = min(_common.next_power_of_two(cols), 128)
    block_rows = min(_common.next_power_of_two(rows), max(1, TILE_ELEMS // block_cols))
    return RmsNormBlockSizes(block_rows=block_rows, block_cols=block_cols, num_warps=8, num_stages=2)


def check_block_sizes(bs: RmsNormBlockSizes, rows: int, cols: int) -> None:
    del rows, cols
    for field in ("block_rows", "block_cols"):
        value = getattr(bs, field)
        if not _common.is_power_of_two(value):
            raise ValueError(f"triton: RmsNormBlockSizes.{field}={value} must be a power of two")


def _fwd_kernel(*refs, eps, has_scale, block_rows, block_cols):
    """Grid (cdiv(N, block_rows),); each program loops over cdiv(D, block_cols) column blocks.

    Tiles: x, y [block_rows, block_cols]; scale [block_cols] (only if present); rstd [block_rows].
    """
    x_ref, scale_ref, y_ref, rstd_ref = unpack_refs(refs, (True, has_scale, True, True))
    n, d = x_ref.shape
    row0 = pl.program_id(0) * block_rows
    row_ok = row0 + iota(block_rows) < n
    tile = functools.partial(load_tile, row0=row0, row_ok=row_ok, block_rows=block_rows, block_cols=block_cols)
    num_col_blocks = pl.cdiv(d, block_cols)

    def store_y(x, col0, rstd):
        cols = col0 + iota(block_cols)
        y = x * rstd[:, None]
        if scale_ref is not None:
            y = y * load_vector(scale_ref, col0, block_cols=block_cols)[None, :]
        window = y_ref.at[pl.ds(row0, block_rows), pl.ds(col0, block_cols)]
        plgpu.store(window, y.astype(y_ref.dtype), mask=row_ok[:, None] & (cols < d)[None, :])

    # The sum of squares needs no shift (unlike a variance, nothing cancels): one pass.
    if num_col_blocks == 1:  # the whole row in one tile: load it once
        x, _ = tile(x_ref, col_start(0, block_cols))
        sum_sq = jnp.sum(x * x, axis=1)
    else:

        def sum_body(j, acc):
            x, _ = tile(x_ref, col_start(j, block_cols))
            return acc + jnp.sum(x * x, axis=1)

        sum_sq = lax.fori_loop(0, num_col_blocks, sum_body, jnp.zeros((block_rows,), jnp.float32))
    rstd = lax.rsqrt(sum_sq / d + eps)
    plgpu.store(rstd_ref.at[pl.ds(row0, block_rows)], rstd, mask=row_ok)

    if num_col_blocks == 1:
        store_y(x, col_start(0, block_cols), rstd)
    else:

        @pl.loop(0, num_col_blocks)
        def _(j):
            col0 = col_start(j, block_cols)
            store_y(tile(x_ref, col0)[0], col0, rstd)


def _bwd_kernel(*refs, has_scale, block_rows, block_cols):
    """Grid (cdiv(N, block_rows),); two loops over cdiv(D, block_cols) column blocks.

    Tiles: x, g, dx [block_rows, block_cols]; scale [block_cols]; rstd [block_rows];
    dscale: this program's row [1, block_cols] of the [cdiv(N, block_rows), D] partials
    (scale and dscale only with a scale).
    """
    x_ref, scale_ref, rstd_ref, g_ref, dx_ref, dscale_ref = unpack_refs(
        refs, (True, has_scale, True, True, True, has_scale))
    n, d = x_ref.shape
    i = pl.program_id(0)
    row0 = i * block_rows
    row_ok = row0 + iota(block_rows) < n
    tile = functools.partial(load_tile, row0=row0, row_ok=row_ok, block_rows=block_rows, block_cols=block_cols)
    num_col_blocks = pl.cdiv(d, block_cols)
    # Rows past N load rstd 0: their xhat is 0 and their g tile is 0.
    rstd = plgpu.load(rstd_ref.at[pl.ds(row0, block_rows)], mask=row_ok, other=0.0)[:, None]

    def load_block(col0):
        """(xhat, dxhat, g, valid) of one column block, f32, 0 outside the array."""
        x, valid = tile(x_ref, col0)
        g, _ = tile(g_ref, col0)
        dxhat = g if scale_ref is None else g * load_vector(scale_ref, col0, block_cols=block_cols)[None, :]
        return x * rstd, dxhat, g, valid

    def reduce_block(col0, block, sum_dxhat_xhat):
        """Per-row sum for dx; this row block's column sums for dscale."""
        xhat, dxhat, g, _ = block
        if dscale_ref is not None:
            cols = col0 + iota(block_cols)
            plgpu.store(dscale_ref.at[pl.ds(i, 1), pl.ds(col0, block_cols)],
                        jnp.sum(g * xhat, axis=0, keepdims=True), mask=(cols < d)[None, :])
        return sum_dxhat_xhat + jnp.sum(dxhat * xhat, axis=1)

    def store_dx(col0, xhat, dxhat, valid, c1):
        # dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
        dx = rstd * (dxhat - xhat * c1[:, None])
        plgpu.store(dx_ref.at[pl.ds(row0, block_rows), pl.ds(col0, block_cols)], dx.astype(dx_ref.dtype),
                    mask=valid)

    zeros = jnp.zeros((block_rows,), jnp.float32)
    if num_col_blocks == 1:  # the whole row in one tile: load x and g once
        block = load_block(col_start(0, block_cols))
        c1 = reduce_block(col_start(0, block_cols), block, zeros) / d
        xhat, dxhat, _, valid = block
        store_dx(col_start(0, block_cols), xhat, dxhat, valid, c1)
    else:

        def reduce_body(j, acc):
            col0 = col_start(j, block_cols)
            return reduce_block(col0, load_block(col0), acc)

        c1 = lax.fori_loop(0, num_col_blocks, reduce_body, zeros) / d

        @pl.loop(0, num_col_blocks)
        def _(j):
            col0 = col_start(j, block_cols)
            xhat, dxhat, _, valid = load_block(col0)
            store_dx(col0, xhat, dxhat, valid, c1)


def fwd(x, scale, *, eps, block_sizes, interpret):
    n, d = x.shape
    has_scale = scale is not None
    bs = block_sizes or RmsNormBlockSizes.default(n, d, x.dtype, "triton")
    kernel = functools.partial(_fwd_kernel, eps=eps, has_scale=has_scale, block_rows=bs.block_rows,
                               block_cols=bs.block_cols)
    y, rstd = pl.pallas_call(
        kernel,
        out_shape=[_common.out_struct((n, d), x.dtype), _common.out_struct((n,), jnp.float32)],
        grid=(pl.cdiv(n, bs.block_rows),),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=cost_estimate(x, has_scale=has_scale, backward=False),
        interpret=interpret,
        name="fusedvjp_rms_norm_fwd",
    )(*present_arrays(x, scale))
    return y, rstd


def bwd(x, scale, rstd, g, *, block_sizes, interpret):
    n, d = x.shape
    has_scale = scale is not None
    bs = block_sizes or RmsNormBlockSizes.default(n, d, x.dtype, "triton")
    kernel = functools.partial(_bwd_kernel, has_scale=has_scale, block_rows=bs.block_rows, block_cols=bs.block_cols)
    partial_sums = _common.out_struct((pl.cdiv(n, bs.block_rows), d), jnp.float32)
    dx, *partials = pl.pallas_call(
        kernel,
        out_shape=[_common.out_struct((n, d), x.dtype), *[partial_sums] * has_scale],
        grid=(pl.cdiv(n, bs.block_rows),),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=cost_estimate(x, has_scale=has_scale, backward=True),
        interpret=interpret,
        name="fusedvjp_rms_norm_bwd",
    )(*present_arrays(x, scale, rstd, g))
    return dx, finish_column_sums(partials, has_scale, False, x.dtype)[0]
