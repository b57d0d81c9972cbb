"""Layer norm kernels for TPUs through Mosaic TPU.

Blocks of whole rows: x, y, g, dx [block_rows, D]; scale, bias [1, D]; per-row mean and
rstd travel as [N, 1] (block (block_rows, 1): the last dim is the array's). The ragged
last row block holds garbage rows (NaN in the TPU interpreter); they only reach output
rows whose writes are dropped -- except in the backward's column sums, where they are
set to 0 with jnp.where first.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.layer_norm.common import (
    LayerNormBlockSizes,
    cost_estimate,
    finish_column_sums,
    present_arrays,
    unpack_refs,
)

# Mosaic TPU tiles: a block's last two dims are multiples of (8, 128) or the whole dims.
SUBLANE = 8
# Bytes of one f32 [block_rows, D] temporary the default aims for, and the VMEM the
# backward (the larger kernel) may use in all: double-buffered x, g, dx blocks plus about
# four f32 temporaries. 12 MiB stays inside v5e's 16 MiB default scoped VMEM.
TILE_BYTES = 512 * 1024
VMEM_BUDGET = 12 * 1024 * 1024


def default_block_sizes(rows: int, cols: int) -> LayerNormBlockSizes:
    # Whole rows; as many as fit a TILE_BYTES f32 tile, a multiple of 8, at most 256
    # (a 256-row block already amortises the ~0.35 us per grid step). Not measured on
    # a TPU.
    fit = max(SUBLANE, min(256, TILE_BYTES // (4 * cols)) // SUBLANE * SUBLANE)
    block_rows = rows if rows <= fit else fit
    return LayerNormBlockSizes(block_rows=block_rows, block_cols=cols)


def check_block_sizes(bs: LayerNormBlockSizes, rows: int, cols: int) -> None:
    del cols
    br = bs.block_rows
    if br != rows and (br % SUBLANE or br > rows):
        raise ValueError(
            f"mosaic_tpu: LayerNormBlockSizes.block_rows={br} must be a multiple of "
            f"{SUBLANE} no larger than N={rows}, or equal N"
        )


def vmem_bytes(block_rows: int, cols: int, dtype) -> int:
    """VMEM of the backward kernel: double-buffered x, g, dx blocks + ~4 f32 temporaries."""
    return block_rows * cols * (3 * 2 * jnp.dtype(dtype).itemsize + 4 * 4)


def _fwd_kernel(*refs, eps, has_scale, has_bias):
    """Grid (cdiv(N, block_rows),). Tiles: x, y [block_rows, D]; scale, bias [1, D] (each
    only if present); mean, rstd [block_rows, 1]."""
    present = (True, has_scale, has_bias, True, True, True)
    x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref = unpack_refs(refs, present)
    x = x_ref[...].astype(jnp.float32)
    d = x.shape[1]
    mean = jnp.sum(x, axis=1, keepdims=True) / d
    xc = x - mean
    rstd = lax.rsqrt(jnp.sum(xc * xc, axis=1, keepdims=True) / d + eps)  # two-pass variance, in VMEM
    y = xc * rstd
    if scale_ref is not None:
        y = y * scale_ref[...].astype(jnp.float32)
    if bias_ref is not None:
        y = y + bias_ref[...].astype(jnp.float32)
    y_ref[...] = y.astype(y_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _bwd_kernel(*refs, n, has_scale, has_bias):
    """Grid (cdiv(N, block_rows),). Tiles: x, g, dx [block_rows, D]; scale [1, D]; mean,
    rstd [block_rows, 1]; dscale, dbias: this block's row [1, D] of the partial sums.
    scale and dscale exist only with a scale, dbias only with a bias."""
    present = (True, has_scale, True, True, True, True, has_scale, has_bias)
    x_ref, scale_ref, mean_ref, rstd_ref, g_ref, dx_ref, dscale_ref, dbias_ref = unpack_refs(refs, present)
    block_rows, d = x_ref.shape
    rstd = rstd_ref[...]
    xhat = (x_ref[...].astype(jnp.float32) - mean_ref[...]) * rstd
    g = g_ref[...].astype(jnp.float32)
    dxhat = g if scale_ref is None else g * scale_ref[...].astype(jnp.float32)
    c1 = jnp.sum(dxhat * xhat, axis=1, keepdims=True) / d
    c2 = jnp.sum(dxhat, axis=1, keepdims=True) / d
    dx_ref[...] = (rstd * (dxhat - c2 - xhat * c1)).astype(dx_ref.dtype)
    if dscale_ref is None and dbias_ref is None:
        return
    g_xhat = g * xhat
    if n % block_rows:  # the last row block is ragged: its garbage rows must not reach the sums
        rows = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows, d), 0)
        g_xhat = jnp.where(rows < n, g_xhat, 0.0)
        g = jnp.where(rows < n, g, 0.0)
    if dscale_ref is not None:
        dscale_ref[...] = jnp.sum(g_xhat, axis=0, keepdims=True)
    if dbias_ref is not None:
        dbias_ref[...] = jnp.sum(g, axis=0, keepdims=True)


def _block_rows(x, block_sizes) -> int:
    n, d = x.shape
    bs = block_sizes or LayerNormBlockSizes.default(n, d, x.dtype, "mosaic_tpu")
    vmem = vmem_bytes(bs.block_rows, d, x.dtype)
    if vmem > VMEM_BUDGET:
        raise NotImplementedError(
            f"rows of D={d} need ~{vmem} bytes of VMEM at block_rows={bs.block_rows}, more than the "
            f"{VMEM_BUDGET} budget (the TPU kernel keeps whole rows in VMEM)"
        )
    return bs.block_rows


def row_vector(p, d):
    """A [D] parameter as the [1, D] array its BlockSpec takes; None stays None."""
    return None if p is None else p.reshape(1, d)


def fwd(x, scale, bias, *, eps, block_sizes, interpret):
    n, d = x.shape
    br = _block_rows(x, block_sizes)
    rows = pl.BlockSpec((br, d), lambda i: (i, 0))
    param = pl.BlockSpec((1, d), lambda i: (0, 0))
    row_stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
    stat_shape = _common.out_struct((n, 1), jnp.float32)
    has_scale, has_bias = scale is not None, bias is not None
    y, mean, rstd = pl.pallas_call(
        functools.partial(_fwd_kernel, eps=eps, has_scale=has_scale, has_bias=has_bias),
        out_shape=[_common.out_struct((n, d), x.dtype), stat_shape, stat_shape],
        grid=(pl.cdiv(n, br),),
        in_specs=[rows, *[param] * (has_scale + has_bias)],
        out_specs=[rows, row_stat, row_stat],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=cost_estimate(x, has_scale=has_scale, has_bias=has_bias, backward=False),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_layer_norm_fwd",
    )(*present_arrays(x, row_vector(scale, d), row_vector(bias, d)))
    return y, (mean.reshape(n), rstd.reshape(n))


def bwd(x, scale, mean, rstd, g, *, has_bias, block_sizes, interpret):
    n, d = x.shape
    has_scale = scale is not None
    br = _block_rows(x, block_sizes)
    num_row_blocks = pl.cdiv(n, br)
    rows = pl.BlockSpec((br, d), lambda i: (i, 0))
    row_stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
    # Partials as [num_row_blocks, 1, D] so the block's last two dims (1, D) are whole dims.
    partial_spec = pl.BlockSpec((None, 1, d), lambda i: (i, 0, 0))
    partial_sums = _common.out_struct((num_row_blocks, 1, d), jnp.float32)
    num_partials = has_scale + has_bias
    dx, *partials = pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, has_scale=has_scale, has_bias=has_bias),
        out_shape=[_common.out_struct((n, d), x.dtype), *[partial_sums] * num_partials],
        grid=(num_row_blocks,),
        in_specs=[rows, *[pl.BlockSpec((1, d), lambda i: (0, 0))] * has_scale, row_stat, row_stat, rows],
        out_specs=[rows, *[partial_spec] * num_partials],
        # Each program writes only its own partial row, so the row axis stays parallel.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=cost_estimate(x, has_scale=has_scale, has_bias=has_bias, backward=True),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_layer_norm_bwd",
    )(*present_arrays(x, row_vector(scale, d), mean.reshape(n, 1), rstd.reshape(n, 1), g))
    return dx, *finish_column_sums(partials, has_scale, has_bias, x.dtype)
