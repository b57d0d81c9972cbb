"""RMS norm kernels for TPUs through Mosaic TPU.

Blocks of whole rows, as layer_norm's (kernels/layer_norm/mosaic_tpu.py, whose VMEM
budget they share): x, y, g, dx [block_rows, D]; scale [1, D]; rstd travels as [N, 1].
The ragged last row block holds garbage rows; they only reach output rows whose writes
are dropped -- except in the backward's column sums, where they are set to 0 first.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.layer_norm import mosaic_tpu as layer_norm_tpu
from fusedvjp.kernels.layer_norm.common import finish_column_sums, present_arrays, unpack_refs
from fusedvjp.kernels.rms_norm.common import RmsNormBlockSizes, cost_estimate


def default_block_sizes(rows: int, cols: int) -> RmsNormBlockSizes:
    # layer_norm's rule (whole rows, a 512 KiB f32 tile, at most 256 rows). Not measured.
    ln = layer_norm_tpu.default_block_sizes(rows, cols)
    return RmsNormBlockSizes(block_rows=ln.block_rows, block_cols=ln.block_cols)


def check_block_sizes(bs: RmsNormBlockSizes, rows: int, cols: int) -> None:
    del cols
    br, sublane = bs.block_rows, layer_norm_tpu.SUBLANE
    if br != rows and (br % sublane or br > rows):
        raise ValueError(
            f"mosaic_tpu: RmsNormBlockSizes.block_rows={br} must be a multiple of {sublane} no larger than N={rows}, "
            f"or equal N"
        )


def _fwd_kernel(*refs, eps, has_scale):
    """Grid (cdiv(N, block_rows),). Tiles: x, y [block_rows, D]; scale [1, D] (only if
    present); rstd [block_rows, 1]."""
    x_ref, scale_ref, y_ref, rstd_ref = unpack_refs(refs, (True, has_scale, True, True))
    x = x_ref[...].astype(jnp.float32)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / x.shape[1] + eps)
    y = x * rstd
    if scale_ref is not None:
        y = y * scale_ref[...].astype(jnp.float32)
    y_ref[...] = y.astype(y_ref.dtype)
    rstd_ref[...] = rstd


def _bwd_kernel(*refs, n, has_scale):
    """Grid (cdiv(N, block_rows),). Tiles: x, g, dx [block_rows, D]; scale [1, D]; rstd
    [block_rows, 1]; dscale: this block's row [1, D] of the partial sums (scale and
    dscale only with a scale)."""
    x_ref, scale_ref, rstd_ref, g_ref, dx_ref, dscale_ref = unpack_refs(
        refs, (True, has_scale, True, True, True, has_scale))
    block_rows, d = x_ref.shape
    rstd = rstd_ref[...]
    xhat = x_ref[...].astype(jnp.float32) * rstd
    g = g_ref[...].astype(jnp.float32)
    dxhat = g if scale_ref is None else g * scale_ref[...].astype(jnp.float32)
    c1 = jnp.sum(dxhat * xhat, axis=1, keepdims=True) / d
    dx_ref[...] = (rstd * (dxhat - xhat * c1)).astype(dx_ref.dtype)
    if dscale_ref is None:
        return
    g_xhat = g * xhat
    if n % block_rows:  # the last row block is ragged: its garbage rows must not reach the sums
        rows = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows, d), 0)
        g_xhat = jnp.where(rows < n, g_xhat, 0.0)
    dscale_ref[...] = jnp.sum(g_xhat, axis=0, keepdims=True)


def _block_rows(x, block_sizes) -> int:
    n, d = x.shape
    bs = block_sizes or RmsNormBlockSizes.default(n, d, x.dtype, "mosaic_tpu")
    vmem = layer_norm_tpu.vmem_bytes(bs.block_rows, d, x.dtype)
    if vmem > layer_norm_tpu.VMEM_BUDGET:
        raise NotImplementedError(
            f"rows of D={d} need ~{vmem} bytes of VMEM at block_rows={bs.block_rows}, more than the "
            f"{layer_norm_tpu.VMEM_BUDGET} budget (the TPU kernel keeps whole rows in VMEM)"
        )
    return bs.block_rows


def fwd(x, scale, *, eps, block_sizes, interpret):
    n, d = x.shape
    has_scale = scale is not None
    br = _block_rows(x, block_sizes)
    rows = pl.BlockSpec((br, d), lambda i: (i, 0))
    row_stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
    y, rstd = pl.pallas_call(
        functools.partial(_fwd_kernel, eps=eps, has_scale=has_scale),
        out_shape=[_common.out_struct((n, d), x.dtype), _common.out_struct((n, 1), jnp.float32)],
        grid=(pl.cdiv(n, br),),
        in_specs=[rows, *[pl.BlockSpec((1, d), lambda i: (0, 0))] * has_scale],
        out_specs=[rows, row_stat],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=cost_estimate(x, has_scale=has_scale, backward=False),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_rms_norm_fwd",
    )(*present_arrays(x, layer_norm_tpu.row_vector(scale, d)))
    return y, rstd.reshape(n)


def bwd(x, scale, rstd, g, *, block_sizes, interpret):
    n, d = x.shape
    has_scale = scale is not None
    br = _block_rows(x, block_sizes)
    num_row_blocks = pl.cdiv(n, br)
    rows = pl.BlockSpec((br, d), lambda i: (i, 0))
    # Partials as [num_row_blocks, 1, D] so the block's last two dims (1, D) are whole dims.
    partial_spec = pl.BlockSpec((None, 1, d), lambda i: (i, 0, 0))
    dx, *partials = pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, has_scale=has_scale),
        out_shape=[_common.out_struct((n, d), x.dtype),
                   *[_common.out_struct((num_row_blocks, 1, d), jnp.float32)] * has_scale],
        grid=(num_row_blocks,),
        in_specs=[rows, *[pl.BlockSpec((1, d), lambda i: (0, 0))] * has_scale, pl.BlockSpec((br, 1), lambda i: (i, 0)),
                  rows],
        out_specs=[rows, *[partial_spec] * has_scale],
        # Each program writes only its own partial row, so the row axis stays parallel.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=cost_estimate(x, has_scale=has_scale, backward=True),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_rms_norm_bwd",
    )(*present_arrays(x, layer_norm_tpu.row_vector(scale, d), rstd.reshape(n, 1), g))
    return dx, finish_column_sums(partials, has_scale, False, x.dtype)[0]
