"""Linear cross-entropy kernels for TPUs through Mosaic TPU.

Both kernels run the grid (C blocks, Vc blocks, D blocks) with D last and "arbitrary":
BlockSpecs move the x [block_c, block_d] and w [block_d, block_v] tiles, the MXU
accumulates into an f32 VMEM scratch zeroed at the first D step, and the epilogue runs
at the last. A tile past an edge holds garbage (NaN in interpret mode): along D both
operands' tails are set to 0 with jnp.where before the dot (0 * NaN is NaN); columns
past Vc are masked in the epilogue (-inf before the max, 0 before the sums); rows past
C only reach rows whose writes are dropped (every reduction is along a row).

``row_stats`` keeps the running statistics (m, s, label_logit, logit_sum) of its row
block in [block_c, 1] VMEM scratch across the Vc axis, also "arbitrary", folds each
tile in at its last D step (the online logsumexp) and writes the [block_c, 1] outputs
at the very last step: no partials, no merge. ``dlogits`` stores its epilogue's tile.
Per-row arrays travel as [C, 1] (the block's last dim equals the array's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.linear_softmax_cross_entropy.common import (
    LinearCrossEntropyBlockSizes,
    cost,
    dlogits_tile,
    dot_precision,
    init_stats,
    logits,
    merge_stats,
    shift,
    tile_stats,
)


def default_block_sizes(c: int, v: int, d: int, dtype, kernel: str) -> LinearCrossEntropyBlockSizes:
    # Not measured on a TPU. Evidence: static compile for v5e and v6e
    # (tests_aot/test_compile_linear_xent.py). Each grid step reads an x and a w tile
    # for block_c * block_v * block_d MACs: an intensity of bc bv / (bc + bv) flops per
    # byte in bf16, 256 at 512x512 -- v5e needs ~240 (197 TFLOP/s over 819 GB/s) to be
    # compute-bound, while dense's 256x256 (128) would leave it memory-bound. The VMEM
    # of 512x512x512 bf16: double-buffered x and w tiles 2 MiB, the f32 accumulator
    # 1 MiB, the epilogue's f32 [512, 512] temporaries 1 MiB each: within v5e's 16 MiB
    # default scoped VMEM. f32 (HIGHEST: ~6 MXU passes) is compute-bound at 256x512.
    # A dimension no larger than its cap is taken whole (always legal).
    def pick(size: int, cap: int) -> int:
        return size if size <= cap else cap

    caps = (512, 512, 512) if jnp.dtype(dtype) == jnp.bfloat16 else (256, 512, 512)
    return LinearCrossEntropyBlockSizes(*(pick(s, cap) for s, cap in zip((c, v, d), caps)))


def _logit_tile_step(x_ref, w_ref, acc_ref, kb, d_size: int) -> None:
    """acc += x @ w for one D step, the D tail of both tiles set to 0."""
    block_d = x_ref.shape[1]
    x, w = x_ref[...], w_ref[...]
    if d_size % block_d:
        x = jnp.where(kb * block_d + lax.broadcasted_iota(jnp.int32, x.shape, 1) < d_size, x, jnp.zeros_like(x))
        w = jnp.where(kb * block_d + lax.broadcasted_iota(jnp.int32, w.shape, 0) < d_size, w, jnp.zeros_like(w))
    acc_ref[...] += jnp.dot(x, w, precision=dot_precision(x.dtype), preferred_element_type=jnp.float32)


def _columns(j, shape, v_size: int):
    """Global column indices of a [block_c, block_v] tile at Vc block j, and which are < Vc."""
    cols = j * shape[1] + lax.broadcasted_iota(jnp.int32, shape, 1)
    return cols, cols < v_size


def _stats_kernel(x_ref, w_ref, *refs, has_bias, cap, with_logit_sum, v_size, d_size):
    """Grid (C/block_c, Vc/block_v, D/block_d); Vc and D "arbitrary".

    Tiles: x [block_c, block_d], w [block_d, block_v], b [1, block_v]; labels and the
    four outputs [block_c, 1]; scratch: the f32 accumulator and the running statistics.
    """
    b_ref, labels_ref, *refs = refs if has_bias else (None, *refs)
    out_refs, (acc_ref, *state_refs) = refs[:4], refs[4:]
    j, kb = pl.program_id(1), pl.program_id(2)
    last_d = kb == pl.num_programs(2) - 1

    @pl.when(kb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((j == 0) & (kb == 0))
    def _():
        for ref, value in zip(state_refs, init_stats(state_refs[0].shape)):
            ref[...] = value

    _logit_tile_step(x_ref, w_ref, acc_ref, kb, d_size)

    @pl.when(last_d)
    def _():
        z, _ = logits(acc_ref[...], None if b_ref is None else b_ref[...], cap)
        cols, col_ok = _columns(j, z.shape, v_size)
        tile = tile_stats(z, col_ok, cols, labels_ref[...], with_logit_sum=with_logit_sum)
        state = merge_stats(tuple(ref[...] for ref in state_refs), tile)
        for ref, value in zip(state_refs, state):
            ref[...] = value

        @pl.when(j == pl.num_programs(1) - 1)
        def _():
            m, s, label_logit, logit_sum = state
            for ref, value in zip(out_refs, (shift(m), jnp.log(s), label_logit, logit_sum)):
                ref[...] = value


def _dlogits_kernel(x_ref, w_ref, *refs, has_bias, cap, v_size, d_size):
    """Grid (C/block_c, Vc/block_v, D/block_d), D last and "arbitrary".

    Tiles: x [block_c, block_d], w [block_d, block_v], b [1, block_v], the per-row
    labels, m, log_s, g_p, g_y, g_u [block_c, 1], dz [block_c, block_v].
    """
    b_ref, *refs = refs if has_bias else (None, *refs)
    labels_ref, m_ref, log_s_ref, g_p_ref, g_y_ref, g_u_ref, dz_ref, acc_ref = refs
    kb = pl.program_id(2)

    @pl.when(kb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    _logit_tile_step(x_ref, w_ref, acc_ref, kb, d_size)

    @pl.when(kb == pl.num_programs(2) - 1)
    def _():
        z, dz_dl = logits(acc_ref[...], None if b_ref is None else b_ref[...], cap)
        cols, _ = _columns(pl.program_id(1), z.shape, v_size)
        dz = dlogits_tile(
            z, dz_dl, cols, labels_ref[...], *(ref[...] for ref in (m_ref, log_s_ref, g_p_ref, g_y_ref, g_u_ref))
        )
        dz_ref[...] = dz.astype(dz_ref.dtype)


# --- launchers -------------------------------------------------------------------------------


def _column(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], 1)


def _specs(bs: LinearCrossEntropyBlockSizes, has_bias: bool, num_rows: int):
    """in_specs: x, w, [b,] then ``num_rows`` per-row [C, 1] arrays."""
    bc, bv, bd = bs.block_c, bs.block_v, bs.block_d
    specs = [
        pl.BlockSpec((bc, bd), lambda i, j, kb: (i, kb)),
        pl.BlockSpec((bd, bv), lambda i, j, kb: (kb, j)),
    ]
    if has_bias:
        specs.append(pl.BlockSpec((1, bv), lambda i, j, kb: (0, j)))
    return specs + [pl.BlockSpec((bc, 1), lambda i, j, kb: (i, 0))] * num_rows


def _blocks(x, w, kernel, block_sizes):
    (c, d), v = x.shape, w.shape[1]
    bs = block_sizes or LinearCrossEntropyBlockSizes.default(c, v, d, x.dtype, "mosaic_tpu", kernel)
    bs.check(c, v, d, "mosaic_tpu")
    grid = (pl.cdiv(c, bs.block_c), pl.cdiv(v, bs.block_v), pl.cdiv(d, bs.block_d))
    return bs, grid


def row_stats(x, w, *rest, cap, with_logit_sum, block_sizes, interpret):
    """rest = ([b,] labels). Returns (m, log_s, label_logit, logit_sum), [C] f32 each."""
    *b, labels = rest
    (c, d), v = x.shape, w.shape[1]
    bs, grid = _blocks(x, w, "stats", block_sizes)
    row = pltpu.VMEM((bs.block_c, 1), jnp.float32)
    outs = pl.pallas_call(
        functools.partial(_stats_kernel, has_bias=bool(b), cap=cap, with_logit_sum=with_logit_sum, v_size=v, d_size=d),
        out_shape=[_common.out_struct((c, 1), jnp.float32)] * 4,
        grid=grid,
        in_specs=_specs(bs, bool(b), 1),
        out_specs=[pl.BlockSpec((bs.block_c, 1), lambda i, j, kb: (i, 0))] * 4,
        scratch_shapes=[pltpu.VMEM((bs.block_c, bs.block_v), jnp.float32)] + [row] * 4,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost(x, w, "stats", cap),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_lce_stats",
    )(x, w, *(a.reshape(1, v) for a in b), _column(labels))
    return tuple(a.reshape(c) for a in outs)


def dlogits(x, w, *rest, cap, block_sizes, interpret):
    """rest = ([b,] labels, m, log_s, g_p, g_y, g_u). Returns dz [C, Vc] in x's dtype."""
    (c, d), v = x.shape, w.shape[1]
    has_bias = len(rest) == 7
    b, per_row = rest[:has_bias], rest[has_bias:]
    bs, grid = _blocks(x, w, "dlogits", block_sizes)
    return pl.pallas_call(
        functools.partial(_dlogits_kernel, has_bias=has_bias, cap=cap, v_size=v, d_size=d),
        out_shape=_common.out_struct((c, v), x.dtype),
        grid=grid,
        in_specs=_specs(bs, has_bias, 6),
        out_specs=pl.BlockSpec((bs.block_c, bs.block_v), lambda i, j, kb: (i, j)),
        scratch_shapes=[pltpu.VMEM((bs.block_c, bs.block_v), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost(x, w, "dlogits", cap),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_lce_dlogits",
    )(x, w, *(a.reshape(1, v) for a in b), *map(_column, per_row))
