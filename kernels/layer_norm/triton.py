"""Layer norm kernels for GPUs through the Pallas Triton lowering.

The refs are whole arrays; each program loads its [block_rows, block_cols] tiles
through pl.ds windows with masked loads and stores, so nothing past the array is read
or written. The loaded values of masked entries are then forced to 0 with jnp.where
before every sum (never multiplied by a mask: garbage * 0 can be NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.layer_norm.common import (
    LayerNormBlockSizes,
    cost_estimate,
    finish_column_sums,
    present_arrays,
    unpack_refs,
)

# Elements of one live [block_rows, block_cols] f32 temporary. 4096 at 8 warps (256
# threads) is 16 registers per thread per temporary; the backward holds about five.
TILE_ELEMS = 4096


def default_block_sizes(rows: int, cols: int) -> LayerNormBlockSizes:
    # 128 columns: each row's load is 256 B (bf16) to 512 B (f32) contiguous.
    # 32 rows per program: the dscale/dbias partials are then 1/32 of [N, D]
    # (see the package docstring). Not measured on a GPU.
    # static: H100 sm_90a, bf16 8192x4096: 32x256 tiles spilled 8 B in the forward
    # (64 regs, occupancy 50%) and held the backward at 148 regs (occupancy 12%);
    # 32x128: 0 spills, fwd 48 regs (62%), bwd 80 regs (38%); f32 fwd 48, bwd 93.
    block_cols = min(_common.next_power_of_two(cols), 128)
    block_rows = min(_common.next_power_of_two(rows), max(1, TILE_ELEMS // block_cols))
    return LayerNormBlockSizes(block_rows=block_rows, block_cols=block_cols, num_warps=8, num_stages=2)


def check_block_sizes(bs: LayerNormBlockSizes, rows: int, cols: int) -> None:
    del rows, cols
    for field in ("block_rows", "block_cols"):
        value = getattr(bs, field)
        if not _common.is_power_of_two(value):
            raise ValueError(f"triton: LayerNormBlockSizes.{field}={value} must be a power of two")


def iota(size: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (size,), 0)


def col_start(j, block_cols: int) -> jax.Array:
    """First column of column block ``j``, int32 like ``program_id``: a Python int or a loop
    index is int64 under x64, and Pallas indexing takes one integer type per slice."""
    return lax.convert_element_type(j, jnp.int32) * block_cols


def load_tile(ref, col0, *, row0, row_ok, block_rows, block_cols):
    """Loads ref[row0:+block_rows, col0:+block_cols] as f32; returns (tile, valid), tile 0 where invalid."""
    cols = col0 + iota(block_cols)
    valid = row_ok[:, None] & (cols < ref.shape[1])[None, :]
    window = ref.at[pl.ds(row0, block_rows), pl.ds(col0, block_cols)]
    tile = plgpu.load(window, mask=valid, other=0.0).astype(jnp.float32)
    return jnp.where(valid, tile, 0.0), valid


def load_vector(ref, col0, *, block_cols):
    """Loads a [D] parameter's [block_cols] window as f32, 0 past D."""
    col_ok = col0 + iota(block_cols) < ref.shape[0]
    v = plgpu.load(ref.at[pl.ds(col0, block_cols)], mask=col_ok, other=0.0).astype(jnp.float32)
    return jnp.where(col_ok, v, 0.0)


def _fwd_kernel(*refs, eps, has_scale, has_bias, block_rows, block_cols):
    """Grid (cdiv(N, block_rows),); each program loops over cdiv(D, block_cols) column blocks.

    Tiles: x, y [block_rows, block_cols]; scale, bias [block_cols] (each only if present);
    mean, rstd [block_rows].
    """
    present = (True, has_scale, has_bias, True, True, True)
    x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref = unpack_refs(refs, present)
    n, d = x_ref.shape
    row0 = pl.program_id(0) * block_rows
    row_ok = row0 + iota(block_rows) < n
    tile = functools.partial(load_tile, row0=row0, row_ok=row_ok, block_rows=block_rows, block_cols=block_cols)
    vector = functools.partial(load_vector, block_cols=block_cols)
    num_col_blocks = pl.cdiv(d, block_cols)

    def block_stats(x, valid, count):
        """(mean, sum of squared deviations) of one block's `count` valid columns, per row."""
        mean = jnp.sum(x, axis=1) / count
        dev = jnp.where(valid, x - mean[:, None], 0.0)
        return mean, jnp.sum(dev * dev, axis=1)

    def store_y(x, col0, mean, rstd):
        cols = col0 + iota(block_cols)
        y = (x - mean[:, None]) * rstd[:, None]
        if scale_ref is not None:
            y = y * vector(scale_ref, col0)[None, :]
        if bias_ref is not None:
            y = y + vector(bias_ref, col0)[None, :]
        window = y_ref.at[pl.ds(row0, block_rows), pl.ds(col0, block_cols)]
        plgpu.store(window, y.astype(y_ref.dtype), mask=row_ok[:, None] & (cols < d)[None, :])

    if num_col_blocks == 1:  # the whole row in one tile: load it once
        x, valid = tile(x_ref, col_start(0, block_cols))
        mean, m2 = block_stats(x, valid, float(d))
    else:
        # Chan et al.'s pairwise update: merging the first c columns (mean_a, m2_a) with
        # a block of b columns (mean_b, m2_b), delta = mean_b - mean_a:
        #   mean = mean_a + delta * b / (c + b),  m2 = m2_a + m2_b + delta**2 * c * b / (c + b).
        # All blocks but the last are full, so c = j * block_cols.
        def stats_body(j, carry):
            mean_a, m2_a = carry
            col0 = col_start(j, block_cols)
            x, valid = tile(x_ref, col0)
            c = col0.astype(jnp.float32)
            b = jnp.minimum(block_cols, d - col0).astype(jnp.float32)
            mean_b, m2_b = block_stats(x, valid, b)
            delta = mean_b - mean_a
            return mean_a + delta * (b / (c + b)), m2_a + m2_b + delta * delta * (c * b / (c + b))

        zeros = jnp.zeros((block_rows,), jnp.float32)
        mean, m2 = lax.fori_loop(0, num_col_blocks, stats_body, (zeros, zeros))
    rstd = lax.rsqrt(m2 / d + eps)
    plgpu.store(mean_ref.at[pl.ds(row0, block_rows)], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[pl.ds(row0, block_rows)], rstd, mask=row_ok)

    if num_col_blocks == 1:
        store_y(x, col_start(0, block_cols), mean, rstd)
    else:

        @pl.loop(0, num_col_blocks)
        def _(j):
            col0 = col_start(j, block_cols)
            store_y(tile(x_ref, col0)[0], col0, mean, rstd)


def _bwd_kernel(*refs, has_scale, has_bias, block_rows, block_cols):
    """Grid (cdiv(N, block_rows),); two loops over cdiv(D, block_cols) column blocks.

    Tiles: x, g, dx [block_rows, block_cols]; scale [block_cols]; mean, rstd [block_rows];
    dscale, dbias: this program's row [1, block_cols] of the [cdiv(N, block_rows), D]
    partials. scale and dscale exist only with a scale, dbias only with a bias.
    """
    present = (True, has_scale, True, True, True, True, has_scale, has_bias)
    x_ref, scale_ref, mean_ref, rstd_ref, g_ref, dx_ref, dscale_ref, dbias_ref = unpack_refs(refs, present)
    n, d = x_ref.shape
    i = pl.program_id(0)
    row0 = i * block_rows
    row_ok = row0 + iota(block_rows) < n
    tile = functools.partial(load_tile, row0=row0, row_ok=row_ok, block_rows=block_rows, block_cols=block_cols)
    num_col_blocks = pl.cdiv(d, block_cols)
    # Rows past N load mean 0, rstd 0: their xhat is 0 and their g tile is 0.
    mean = plgpu.load(mean_ref.at[pl.ds(row0, block_rows)], mask=row_ok, other=0.0)[:, None]
    rstd = plgpu.load(rstd_ref.at[pl.ds(row0, block_rows)], mask=row_ok, other=0.0)[:, None]

    def load_block(col0):
        """(xhat, dxhat, g, valid) of one column block, f32, 0 outside the array."""
        x, valid = tile(x_ref, col0)
        g, _ = tile(g_ref, col0)
        xhat = jnp.where(valid, (x - mean) * rstd, 0.0)
        dxhat = g if scale_ref is None else g * load_vector(scale_ref, col0, block_cols=block_cols)[None, :]
        return xhat, dxhat, g, valid

    def reduce_block(col0, block, carry):
        """Per-row sums for dx; this row block's column sums for dscale, dbias."""
        xhat, dxhat, g, _ = block
        cols = col0 + iota(block_cols)
        window = (pl.ds(i, 1), pl.ds(col0, block_cols))
        col_ok = (cols < d)[None, :]
        if dscale_ref is not None:
            plgpu.store(dscale_ref.at[window], jnp.sum(g * xhat, axis=0, keepdims=True), mask=col_ok)
        if dbias_ref is not None:
            plgpu.store(dbias_ref.at[window], jnp.sum(g, axis=0, keepdims=True), mask=col_ok)
        sum_dxhat_xhat, sum_dxhat = carry
        return sum_dxhat_xhat + jnp.sum(dxhat * xhat, axis=1), sum_dxhat + jnp.sum(dxhat, axis=1)

    def store_dx(col0, xhat, dxhat, valid, c1, c2):
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        dx = rstd * (dxhat - c2[:, None] - xhat * c1[:, None])
        window = dx_ref.at[pl.ds(row0, block_rows), pl.ds(col0, block_cols)]
        plgpu.store(window, dx.astype(dx_ref.dtype), mask=valid)

    zeros = jnp.zeros((block_rows,), jnp.float32)
    if num_col_blocks == 1:  # the whole row in one tile: load x and g once
        block = load_block(col_start(0, block_cols))
        xhat, dxhat, _, valid = block
        sums = reduce_block(col_start(0, block_cols), block, (zeros, zeros))
    else:

        def reduce_body(j, carry):
            col0 = col_start(j, block_cols)
            return reduce_block(col0, load_block(col0), carry)

        sums = lax.fori_loop(0, num_col_blocks, reduce_body, (zeros, zeros))
    c1, c2 = sums[0] / d, sums[1] / d

    if num_col_blocks == 1:
        store_dx(col_start(0, block_cols), xhat, dxhat, valid, c1, c2)
    else:

        @pl.loop(0, num_col_blocks)
        def _(j):
            col0 = col_start(j, block_cols)
            xhat, dxhat, _, valid = load_block(col0)
            store_dx(col0, xhat, dxhat, valid, c1, c2)


def fwd(x, scale, bias, *, eps, block_sizes, interpret):
    n, d = x.shape
    bs = block_sizes or LayerNormBlockSizes.default(n, d, x.dtype, "triton")
    kernel = functools.partial(_fwd_kernel, eps=eps, has_scale=scale is not None, has_bias=bias is not None,
                               block_rows=bs.block_rows, block_cols=bs.block_cols)
    row_stat = _common.out_struct((n,), jnp.float32)
    y, mean, rstd = pl.pallas_call(
        kernel,
        out_shape=[_common.out_struct((n, d), x.dtype), row_stat, row_stat],
        grid=(pl.cdiv(n, bs.block_rows),),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=cost_estimate(x, has_scale=scale is not None, has_bias=bias is not None, backward=False),
        interpret=interpret,
        name="fusedvjp_layer_norm_fwd",
    )(*present_arrays(x, scale, bias))
    return y, (mean, rstd)


def bwd(x, scale, mean, rstd, g, *, has_bias, block_sizes, interpret):
    n, d = x.shape
    has_scale = scale is not None
    bs = block_sizes or LayerNormBlockSizes.default(n, d, x.dtype, "triton")
    kernel = functools.partial(_bwd_kernel, has_scale=has_scale, has_bias=has_bias, block_rows=bs.block_rows,
                               block_cols=bs.block_cols)
    partial_sums = _common.out_struct((pl.cdiv(n, bs.block_rows), d), jnp.float32)
    dx, *partials = pl.pallas_call(
        kernel,
        out_shape=[_common.out_struct((n, d), x.dtype), *[partial_sums] * (has_scale + has_bias)],
        grid=(pl.cdiv(n, bs.block_rows),),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=cost_estimate(x, has_scale=has_scale, has_bias=has_bias, backward=True),
        interpret=interpret,
        name="fusedvjp_layer_norm_bwd",
    )(*present_arrays(x, scale, mean, rstd, g))
    return dx, *finish_column_sums(partials, has_scale, has_bias, x.dtype)
