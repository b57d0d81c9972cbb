"""Pallas kernels for layer_norm: forward and backward. See ops/layer_norm.py for the math.

Per row ``x`` of ``[N, D]``: ``y = (x - mean) * rstd * scale + bias`` with
``rstd = 1 / sqrt(var + eps)``; the forward also writes the f32 ``mean`` and ``rstd``
per row, the residuals of the backward:

    xhat = (x - mean) * rstd          dxhat = g * scale
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dscale = sum_rows(g * xhat)       dbias = sum_rows(g)

Grid: one axis over blocks of ``block_rows`` rows, on both backends.

* Triton: the program walks the row's ``D`` columns in ``block_cols`` steps (two
  in-kernel loops: statistics, then output), so any ``D`` fits in registers. The
  forward's statistics use Chan's pairwise update of (mean, sum of squared deviations)
  per column block -- as stable as the two-pass formula, with one read of ``x`` for the
  statistics instead of two. With ``D <= block_cols`` the row is loaded once.
* Mosaic TPU: a block holds whole rows (``[block_rows, D]``, always a legal TPU block
  since the last dim is the whole array's); a row of ``D = 8192`` f32 is 32 KiB of VMEM,
  and ``block_rows`` is sized to a VMEM budget. Rows too long for the budget even at 8
  rows raise ``NotImplementedError`` (the op then falls back to jnp).

``dscale``/``dbias`` are column sums over all ``N`` rows. Each backward program sums its
own block of rows in f32 and writes one row of partial sums, ``[cdiv(N, block_rows), D]``
f32 per parameter; a jnp sum over that small array finishes the reduction. The
alternatives: per-row partials would be ``[N, D]`` (as large as ``dx``); a second kernel
that walks the columns (JAX's GPU example does) reads ``x`` and ``g`` a second time,
2 N D elements; atomics are not expressible portably in Pallas. The partials cost
``2 * 2 * 4 * D * N / block_rows`` bytes (write + read, two parameters) against the
``3 N D`` elements ``x``, ``g``, ``dx`` must move anyway -- under 10% at
``block_rows = 32`` in bf16, which is why ``block_rows`` defaults to 32 rather than 1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from fusedvjp.kernels import _common

_OP_NAME = "layer_norm"
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

# Triton: elements of one live [block_rows, block_cols] f32 temporary. 4096 at 8 warps
# (256 threads) is 16 registers per thread per temporary; the backward holds about five.
TRITON_TILE_ELEMS = 4096
# Mosaic TPU tiles: a block's last two dims are multiples of (8, 128) or the whole dims.
TPU_SUBLANE = 8
# Bytes of one f32 [block_rows, D] temporary the TPU default aims for, and the VMEM the
# backward (the larger kernel) may use in all: double-buffered x, g, dx blocks plus about
# four f32 temporaries. 12 MiB stays inside v5e's 16 MiB default scoped VMEM.
TPU_TILE_BYTES = 512 * 1024
TPU_VMEM_BUDGET = 12 * 1024 * 1024


# --- block sizes -----------------------------------------------------------------------


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
        if backend == "triton":
            del dtype  # the math is f32 whatever the input dtype; tiles are sized for f32
            # 128 columns: each row's load is 256 B (bf16) to 512 B (f32) contiguous.
            # 32 rows per program: the dscale/dbias partials are then 1/32 of [N, D]
            # (see the module docstring). Not measured on a GPU.
            # static: H100 sm_90a, bf16 8192x4096: 32x256 tiles spilled 8 B in the forward
            # (64 regs, occupancy 50%) and held the backward at 148 regs (occupancy 12%);
            # 32x128: 0 spills, fwd 48 regs (62%), bwd 80 regs (38%); f32 fwd 48, bwd 93.
            block_cols = min(_common.next_power_of_two(cols), 128)
            block_rows = min(_common.next_power_of_two(rows), max(1, TRITON_TILE_ELEMS // block_cols))
            return cls(block_rows=block_rows, block_cols=block_cols, num_warps=8, num_stages=2)
        if backend == "mosaic_tpu":
            # Whole rows; as many as fit a TPU_TILE_BYTES f32 tile, a multiple of 8, at
            # most 256 (a 256-row block already amortises the ~0.35 us per grid step).
            # Not measured on a TPU.
            fit = max(TPU_SUBLANE, min(256, TPU_TILE_BYTES // (4 * cols)) // TPU_SUBLANE * TPU_SUBLANE)
            block_rows = rows if rows <= fit else fit
            return cls(block_rows=block_rows, block_cols=cols)
        raise ValueError(f"unknown backend {backend!r}; expected one of {_common.BACKEND_NAMES}")

    def check(self, rows: int, cols: int, backend: str) -> None:
        """Raises ValueError if this tile breaks ``backend``'s lowering rules for ``[rows, cols]``."""
        del cols
        if backend == "triton":
            for field in ("block_rows", "block_cols"):
                value = getattr(self, field)
                if not _common.is_power_of_two(value):
                    raise ValueError(f"triton: LayerNormBlockSizes.{field}={value} must be a power of two")
        elif backend == "mosaic_tpu":
            br = self.block_rows
            if br != rows and (br % TPU_SUBLANE or br > rows):
                raise ValueError(
                    f"mosaic_tpu: LayerNormBlockSizes.block_rows={br} must be a multiple of "
                    f"{TPU_SUBLANE} no larger than N={rows}, or equal N"
                )
        else:
            raise ValueError(f"unknown backend {backend!r}; expected one of {_common.BACKEND_NAMES}")


def _tpu_vmem_bytes(block_rows: int, cols: int, dtype) -> int:
    """VMEM of the backward kernel: double-buffered x, g, dx blocks + ~4 f32 temporaries."""
    return block_rows * cols * (3 * 2 * jnp.dtype(dtype).itemsize + 4 * 4)


# --- Triton (GPU) ----------------------------------------------------------------------
#
# The refs are whole arrays; each program loads its [block_rows, block_cols] tiles
# through pl.ds windows with masked loads and stores, so nothing past the array is read
# or written. The loaded values of masked entries are then forced to 0 with jnp.where
# before every sum (never multiplied by a mask: garbage * 0 can be NaN).


def _iota(size: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (size,), 0)


def _col_start(j, block_cols: int) -> jax.Array:
    """First column of column block ``j``, int32 like ``program_id``: a Python int or a loop
    index is int64 under x64, and Pallas indexing takes one integer type per slice."""
    return lax.convert_element_type(j, jnp.int32) * block_cols


def _triton_tile(ref, col0, *, row0, row_ok, block_rows, block_cols):
    """Loads ref[row0:+block_rows, col0:+block_cols] as f32; returns (tile, valid), tile 0 where invalid."""
    cols = col0 + _iota(block_cols)
    valid = row_ok[:, None] & (cols < ref.shape[1])[None, :]
    window = ref.at[pl.ds(row0, block_rows), pl.ds(col0, block_cols)]
    tile = plgpu.load(window, mask=valid, other=0.0).astype(jnp.float32)
    return jnp.where(valid, tile, 0.0), valid


def _triton_vector(ref, col0, *, block_cols):
    """Loads a [D] parameter's [block_cols] window as f32, 0 past D."""
    col_ok = col0 + _iota(block_cols) < ref.shape[0]
    v = plgpu.load(ref.at[pl.ds(col0, block_cols)], mask=col_ok, other=0.0).astype(jnp.float32)
    return jnp.where(col_ok, v, 0.0)


def _triton_fwd_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, eps, block_rows, block_cols):
    """Grid (cdiv(N, block_rows),); each program loops over cdiv(D, block_cols) column blocks.

    Tiles: x, y [block_rows, block_cols]; scale, bias [block_cols]; mean, rstd [block_rows].
    """
    n, d = x_ref.shape
    row0 = pl.program_id(0) * block_rows
    row_ok = row0 + _iota(block_rows) < n
    tile = functools.partial(_triton_tile, row0=row0, row_ok=row_ok, block_rows=block_rows, block_cols=block_cols)
    vector = functools.partial(_triton_vector, block_cols=block_cols)
    num_col_blocks = pl.cdiv(d, block_cols)

    def block_stats(x, valid, count):
        """(mean, sum of squared deviations) of one block's `count` valid columns, per row."""
        mean = jnp.sum(x, axis=1) / count
        dev = jnp.where(valid, x - mean[:, None], 0.0)
        return mean, jnp.sum(dev * dev, axis=1)

    def store_y(x, col0, mean, rstd):
        cols = col0 + _iota(block_cols)
        y = (x - mean[:, None]) * rstd[:, None] * vector(scale_ref, col0)[None, :] + vector(bias_ref, col0)[None, :]
        window = y_ref.at[pl.ds(row0, block_rows), pl.ds(col0, block_cols)]
        plgpu.store(window, y.astype(y_ref.dtype), mask=row_ok[:, None] & (cols < d)[None, :])

    if num_col_blocks == 1:  # the whole row in one tile: load it once
        x, valid = tile(x_ref, _col_start(0, block_cols))
        mean, m2 = block_stats(x, valid, float(d))
    else:
        # Chan et al.'s pairwise update: merging the first c columns (mean_a, m2_a) with
        # a block of b columns (mean_b, m2_b), delta = mean_b - mean_a:
        #   mean = mean_a + delta * b / (c + b),  m2 = m2_a + m2_b + delta**2 * c * b / (c + b).
        # All blocks but the last are full, so c = j * block_cols.
        def stats_body(j, carry):
            mean_a, m2_a = carry
            col0 = _col_start(j, block_cols)
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
        store_y(x, _col_start(0, block_cols), mean, rstd)
    else:

        @pl.loop(0, num_col_blocks)
        def _(j):
            col0 = _col_start(j, block_cols)
            store_y(tile(x_ref, col0)[0], col0, mean, rstd)


def _triton_bwd_kernel(
    x_ref, scale_ref, mean_ref, rstd_ref, g_ref, dx_ref, dscale_ref, dbias_ref, *, block_rows, block_cols
):
    """Grid (cdiv(N, block_rows),); two loops over cdiv(D, block_cols) column blocks.

    Tiles: x, g, dx [block_rows, block_cols]; scale [block_cols]; mean, rstd [block_rows];
    dscale, dbias: this program's row [1, block_cols] of the [cdiv(N, block_rows), D] partials.
    """
    n, d = x_ref.shape
    i = pl.program_id(0)
    row0 = i * block_rows
    row_ok = row0 + _iota(block_rows) < n
    tile = functools.partial(_triton_tile, row0=row0, row_ok=row_ok, block_rows=block_rows, block_cols=block_cols)
    num_col_blocks = pl.cdiv(d, block_cols)
    # Rows past N load mean 0, rstd 0: their xhat is 0 and their g tile is 0.
    mean = plgpu.load(mean_ref.at[pl.ds(row0, block_rows)], mask=row_ok, other=0.0)[:, None]
    rstd = plgpu.load(rstd_ref.at[pl.ds(row0, block_rows)], mask=row_ok, other=0.0)[:, None]

    def load_block(col0):
        """(xhat, dxhat, g, valid) of one column block, f32, 0 outside the array."""
        x, valid = tile(x_ref, col0)
        g, _ = tile(g_ref, col0)
        xhat = jnp.where(valid, (x - mean) * rstd, 0.0)
        dxhat = g * _triton_vector(scale_ref, col0, block_cols=block_cols)[None, :]
        return xhat, dxhat, g, valid

    def reduce_block(col0, block, carry):
        """Per-row sums for dx; this row block's column sums for dscale, dbias."""
        xhat, dxhat, g, _ = block
        cols = col0 + _iota(block_cols)
        window = (pl.ds(i, 1), pl.ds(col0, block_cols))
        col_ok = (cols < d)[None, :]
        plgpu.store(dscale_ref.at[window], jnp.sum(g * xhat, axis=0, keepdims=True), mask=col_ok)
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
        block = load_block(_col_start(0, block_cols))
        xhat, dxhat, _, valid = block
        sums = reduce_block(_col_start(0, block_cols), block, (zeros, zeros))
    else:

        def reduce_body(j, carry):
            col0 = _col_start(j, block_cols)
            return reduce_block(col0, load_block(col0), carry)

        sums = lax.fori_loop(0, num_col_blocks, reduce_body, (zeros, zeros))
    c1, c2 = sums[0] / d, sums[1] / d

    if num_col_blocks == 1:
        store_dx(_col_start(0, block_cols), xhat, dxhat, valid, c1, c2)
    else:

        @pl.loop(0, num_col_blocks)
        def _(j):
            col0 = _col_start(j, block_cols)
            xhat, dxhat, _, valid = load_block(col0)
            store_dx(col0, xhat, dxhat, valid, c1, c2)


def _triton_fwd(x, scale, bias, *, eps, block_sizes, interpret):
    n, d = x.shape
    bs = block_sizes or LayerNormBlockSizes.default(n, d, x.dtype, "triton")
    kernel = functools.partial(_triton_fwd_kernel, eps=eps, block_rows=bs.block_rows, block_cols=bs.block_cols)
    row_stat = _common.out_struct((n,), jnp.float32)
    y, mean, rstd = pl.pallas_call(
        kernel,
        out_shape=[_common.out_struct((n, d), x.dtype), row_stat, row_stat],
        grid=(pl.cdiv(n, bs.block_rows),),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=_cost(x, backward=False),
        interpret=interpret,
        name="fusedvjp_layer_norm_fwd",
    )(x, scale, bias)
    return y, (mean, rstd)


def _triton_bwd(x, scale, mean, rstd, g, *, block_sizes, interpret):
    n, d = x.shape
    bs = block_sizes or LayerNormBlockSizes.default(n, d, x.dtype, "triton")
    kernel = functools.partial(_triton_bwd_kernel, block_rows=bs.block_rows, block_cols=bs.block_cols)
    partial_sums = _common.out_struct((pl.cdiv(n, bs.block_rows), d), jnp.float32)
    dx, dscale, dbias = pl.pallas_call(
        kernel,
        out_shape=[_common.out_struct((n, d), x.dtype), partial_sums, partial_sums],
        grid=(pl.cdiv(n, bs.block_rows),),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=_cost(x, backward=True),
        interpret=interpret,
        name="fusedvjp_layer_norm_bwd",
    )(x, scale, mean, rstd, g)
    return dx, *_finish_column_sums(dscale, dbias, x.dtype)


# --- Mosaic TPU ------------------------------------------------------------------------
#
# Blocks of whole rows: x, y, g, dx [block_rows, D]; scale, bias [1, D]; per-row mean and
# rstd travel as [N, 1] (block (block_rows, 1): the last dim is the array's). The ragged
# last row block holds garbage rows (NaN in the TPU interpreter); they only reach output
# rows whose writes are dropped -- except in the backward's column sums, where they are
# set to 0 with jnp.where first.


def _tpu_fwd_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, eps):
    """Grid (cdiv(N, block_rows),). Tiles: x, y [block_rows, D]; scale, bias [1, D];
    mean, rstd [block_rows, 1]."""
    x = x_ref[...].astype(jnp.float32)
    d = x.shape[1]
    mean = jnp.sum(x, axis=1, keepdims=True) / d
    xc = x - mean
    rstd = lax.rsqrt(jnp.sum(xc * xc, axis=1, keepdims=True) / d + eps)  # two-pass variance, in VMEM
    y = xc * rstd * scale_ref[...].astype(jnp.float32) + bias_ref[...].astype(jnp.float32)
    y_ref[...] = y.astype(y_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _tpu_bwd_kernel(x_ref, scale_ref, mean_ref, rstd_ref, g_ref, dx_ref, dscale_ref, dbias_ref, *, n):
    """Grid (cdiv(N, block_rows),). Tiles: x, g, dx [block_rows, D]; scale [1, D]; mean,
    rstd [block_rows, 1]; dscale, dbias: this block's row [1, D] of the partial sums."""
    block_rows, d = x_ref.shape
    rstd = rstd_ref[...]
    xhat = (x_ref[...].astype(jnp.float32) - mean_ref[...]) * rstd
    g = g_ref[...].astype(jnp.float32)
    dxhat = g * scale_ref[...].astype(jnp.float32)
    c1 = jnp.sum(dxhat * xhat, axis=1, keepdims=True) / d
    c2 = jnp.sum(dxhat, axis=1, keepdims=True) / d
    dx_ref[...] = (rstd * (dxhat - c2 - xhat * c1)).astype(dx_ref.dtype)
    g_xhat = g * xhat
    if n % block_rows:  # the last row block is ragged: its garbage rows must not reach the sums
        rows = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows, d), 0)
        g_xhat = jnp.where(rows < n, g_xhat, 0.0)
        g = jnp.where(rows < n, g, 0.0)
    dscale_ref[...] = jnp.sum(g_xhat, axis=0, keepdims=True)
    dbias_ref[...] = jnp.sum(g, axis=0, keepdims=True)


def _tpu_block_rows(x, block_sizes) -> int:
    n, d = x.shape
    bs = block_sizes or LayerNormBlockSizes.default(n, d, x.dtype, "mosaic_tpu")
    vmem = _tpu_vmem_bytes(bs.block_rows, d, x.dtype)
    if vmem > TPU_VMEM_BUDGET:
        raise NotImplementedError(
            f"rows of D={d} need ~{vmem} bytes of VMEM at block_rows={bs.block_rows}, more than the "
            f"{TPU_VMEM_BUDGET} budget (the TPU kernel keeps whole rows in VMEM)"
        )
    return bs.block_rows


def _tpu_fwd(x, scale, bias, *, eps, block_sizes, interpret):
    n, d = x.shape
    br = _tpu_block_rows(x, block_sizes)
    rows = pl.BlockSpec((br, d), lambda i: (i, 0))
    param = pl.BlockSpec((1, d), lambda i: (0, 0))
    row_stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
    stat_shape = _common.out_struct((n, 1), jnp.float32)
    y, mean, rstd = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, eps=eps),
        out_shape=[_common.out_struct((n, d), x.dtype), stat_shape, stat_shape],
        grid=(pl.cdiv(n, br),),
        in_specs=[rows, param, param],
        out_specs=[rows, row_stat, row_stat],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=_cost(x, backward=False),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_layer_norm_fwd",
    )(x, scale.reshape(1, d), bias.reshape(1, d))
    return y, (mean.reshape(n), rstd.reshape(n))


def _tpu_bwd(x, scale, mean, rstd, g, *, block_sizes, interpret):
    n, d = x.shape
    br = _tpu_block_rows(x, block_sizes)
    num_row_blocks = pl.cdiv(n, br)
    rows = pl.BlockSpec((br, d), lambda i: (i, 0))
    row_stat = pl.BlockSpec((br, 1), lambda i: (i, 0))
    # Partials as [num_row_blocks, 1, D] so the block's last two dims (1, D) are whole dims.
    partial_spec = pl.BlockSpec((None, 1, d), lambda i: (i, 0, 0))
    partial_sums = _common.out_struct((num_row_blocks, 1, d), jnp.float32)
    dx, dscale, dbias = pl.pallas_call(
        functools.partial(_tpu_bwd_kernel, n=n),
        out_shape=[_common.out_struct((n, d), x.dtype), partial_sums, partial_sums],
        grid=(num_row_blocks,),
        in_specs=[rows, pl.BlockSpec((1, d), lambda i: (0, 0)), row_stat, row_stat, rows],
        out_specs=[rows, partial_spec, partial_spec],
        # Each program writes only its own partial row, so the row axis stays parallel.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=_cost(x, backward=True),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_layer_norm_bwd",
    )(x, scale.reshape(1, d), mean.reshape(n, 1), rstd.reshape(n, 1), g)
    return dx, *_finish_column_sums(dscale, dbias, x.dtype)


# --- launchers -------------------------------------------------------------------------


def _finish_column_sums(dscale_partial, dbias_partial, dtype):
    """The last step of the column reductions: partial sums [cdiv(N, block_rows), ..., D] f32 -> [D].

    Done inside each backend's branch: the branches of platform_dispatch must return the
    same shapes, and the backends' default block_rows (so their partials) differ.
    """
    d = dscale_partial.shape[-1]
    return tuple(jnp.sum(p.reshape(-1, d), axis=0).astype(dtype) for p in (dscale_partial, dbias_partial))


def _cost(x, *, backward: bool) -> pl.CostEstimate:
    n, d = x.shape
    s = x.dtype.itemsize
    if backward:  # read x, g; write dx; per-row stats in, partial sums out
        return pl.CostEstimate(flops=13 * n * d, transcendentals=0, bytes_accessed=3 * n * d * s + 8 * n + 3 * d * 4)
    return pl.CostEstimate(flops=7 * n * d, transcendentals=n, bytes_accessed=2 * n * d * s + 8 * n + 2 * d * s)


def _check_args(x, **params) -> None:
    if x.ndim != 2:
        raise ValueError(f"layer_norm kernels take x [N, D], got shape {x.shape}")
    n, d = x.shape
    for name, p in params.items():
        if p.shape != (d,) or p.dtype != x.dtype:
            raise ValueError(f"layer_norm kernels take {name} [D]=({d},) in x's dtype {x.dtype}; got {p.shape} {p.dtype}")
    if jnp.dtype(x.dtype) not in DTYPES:
        raise NotImplementedError(f"x dtype {x.dtype} (the kernels take float32 or bfloat16)")
    if n == 0 or d == 0:
        raise NotImplementedError(f"empty input {x.shape}")


def layer_norm_fwd(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    eps: float,
    backend: str | None = None,
    block_sizes: LayerNormBlockSizes | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Layer norm over the last axis, and the per-row statistics the backward needs.

    Args:
      x: [N, D] float32 or bfloat16.
      scale, bias: [D] in x's dtype.
      eps: added to the variance, > 0.
      backend: "triton", "mosaic_tpu", or None to pick per lowering platform (CPU
        interprets; see ``_common.platform_dispatch``).
      block_sizes: None for each backend's default, or a tile that must suit ``backend``
        (every backend when ``backend`` is None).

    Returns:
      ``(y, (mean, rstd))``: y [N, D] in x's dtype; mean, rstd [N] float32.

    Raises:
      ValueError: bad shapes, dtypes or block sizes.
      NotImplementedError: a dtype other than float32/bfloat16, an empty input, or (TPU)
        rows too long for VMEM.

    Equivalent to: ``mean = x.mean(-1); rstd = rsqrt(x.var(-1) + eps);
    y = (x - mean[:, None]) * rstd[:, None] * scale + bias`` in f32, y cast to x.dtype.
    """
    _check_args(x, scale=scale, bias=bias)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    n, d = x.shape
    _common.check_block_sizes(block_sizes, LayerNormBlockSizes, backend, n, d)
    static = dict(eps=float(eps), block_sizes=block_sizes)
    impls = {
        "triton": functools.partial(_triton_fwd, **static),
        "mosaic_tpu": functools.partial(_tpu_fwd, **static),
    }
    return _common.platform_dispatch(impls, x, scale, bias, backend=backend, op_name=_OP_NAME)


def layer_norm_bwd(
    x: jax.Array,
    scale: jax.Array,
    mean: jax.Array,
    rstd: jax.Array,
    g: jax.Array,
    *,
    backend: str | None = None,
    block_sizes: LayerNormBlockSizes | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cotangents of :func:`layer_norm_fwd`'s ``y`` with respect to x, scale and bias.

    Args:
      x, scale, backend, block_sizes: as passed to the forward.
      mean, rstd: [N] float32, the forward's residuals.
      g: [N, D] cotangent of y, in x's dtype.

    Returns:
      ``(dx [N, D], dscale [D], dbias [D])``, all in x's dtype (f32 math, one rounding).

    Raises:
      ValueError / NotImplementedError: as in :func:`layer_norm_fwd`.

    Equivalent to: ``xhat = (x - mean[:, None]) * rstd[:, None]; dxhat = g * scale;
    dx = rstd[:, None] * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True));
    dscale = (g * xhat).sum(0); dbias = g.sum(0)``.
    """
    _check_args(x, scale=scale)
    n, d = x.shape
    if g.shape != x.shape or g.dtype != x.dtype:
        raise ValueError(f"g must be [N, D]={x.shape} in {x.dtype}, got {g.shape} {g.dtype}")
    for name, a in (("mean", mean), ("rstd", rstd)):
        if a.shape != (n,) or a.dtype != jnp.float32:
            raise ValueError(f"{name} must be [N]=({n},) float32, got {a.shape} {a.dtype}")
    _common.check_block_sizes(block_sizes, LayerNormBlockSizes, backend, n, d)
    impls = {
        "triton": functools.partial(_triton_bwd, block_sizes=block_sizes),
        "mosaic_tpu": functools.partial(_tpu_bwd, block_sizes=block_sizes),
    }
    return _common.platform_dispatch(impls, x, scale, mean, rstd, g, backend=backend, op_name=_OP_NAME)
