"""Linear cross-entropy kernels for GPUs through the Pallas Triton lowering.

Both kernels are matmuls of x [C, D] and w [D, Vc] whose f32 [block_c, block_v] tile
is reduced in registers instead of stored. The refs are whole arrays; each program
loads its tiles with ``pl.ds`` windows and masked loads (``other=0``), so tail tiles
read zeros past every edge (never memory past the array) and the zeros drop out of the
dot; the epilogue then masks columns past Vc with jnp.where (a zero logit is still a
logit). Stores are masked too. Element offsets are computed by the lowering from the
per-dimension indices (each below its dimension plus a block, so i32) times the
strides, in i64 for arrays past 2**31 elements (dz at C=20000, Vc=128256: 2.6e9; at
C=16384 it is 2.1e9 elements and i32 offsets suffice); nothing
is flattened by hand (``tests/test_offsets.py`` explains and checks the rule).

Program order: a 1-D grid in *groups* of ``_common.GROUP_ROWS`` row blocks (Triton's matmul
tutorial ordering, as ``kernels/dense/triton.py``): the programs resident at once share
a few row blocks of x and sweep the column blocks of w, so a wave re-reads its operands
from L2 instead of HBM (x at C=16384, D=4096 bf16 is 128 MiB, L2 is 50 MiB).

``row_stats``: a program owns (row block, vocabulary split) and walks
``v_blocks_per_program`` column tiles of its split, each with an inner loop over D,
folding each tile's statistics into running [block_c] ones (the online logsumexp). It
writes one partial (m, s, label_logit, logit_sum) per split, [splits, C] each, which
the launcher merges in jnp (deterministic, no atomics). More splits give more programs
(at C=16384 with 128-row blocks there are only 128 row blocks for 132 SMs); fewer
write fewer partials. ``dlogits``: a program owns one output tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.linear_softmax_cross_entropy.common import (
    LinearCrossEntropyBlockSizes,
    cost,
    dlogits_tile,
    dot_precision,
    init_stats,
    logits,
    merge_partials,
    merge_stats,
    tile_stats,
)

# H100: 227 KiB of shared memory per thread block (opt-in maximum).
SMEM_BYTES = 227 * 1024
# Triton tensors are powers of two; tl.dot needs each of M, N, K >= 16.
MIN_BLOCK = 16
# row_stats: at least this many waves of one program per SM (what the LLM tiles allow),
# so the last, partial wave idles at most ~1/8 of the SMs' time; and up to this many
# vocabulary tiles per program: the partials shrink as many times (at C=16384, Vc=128256
# with 128x128 tiles: 63 splits, 16 MiB of partials, instead of 1002 splits, 250 MiB).
MIN_WAVES = 8
MAX_V_BLOCKS_PER_PROGRAM = 16


# --- block sizes ---------------------------------------------------------------------------


def smem_bytes(bs: LinearCrossEntropyBlockSizes, dtype) -> int:
    """Shared memory of the pipelined D loop: num_stages x (x [bc, bd] + w [bd, bv])."""
    return bs.num_stages * (bs.block_c * bs.block_d + bs.block_d * bs.block_v) * jnp.dtype(dtype).itemsize


def default_block_sizes(c: int, v: int, d: int, dtype, kernel: str) -> LinearCrossEntropyBlockSizes:
    # Evidence: static compile for H100 sm_90a (tests_aot/test_compile_linear_xent.py;
    # ptxas -v through bench/static.py), no GPU run. The tiles are kernels/dense/triton.py's
    # forward tiles, this being a matmul with an epilogue: bf16 on tensor cores (wgmma),
    # 128x128 output tiles, a 64-deep D step, 8 warps for the 16K-element f32
    # accumulator, 4 stages (128 KiB of shared memory). At x [16384, 4096], w [4096,
    # 16384] bf16: row_stats 174 registers, dlogits 205, no spills, 1 block (8 warps) per
    # SM either way (registers and shared memory each allow one); Vc = 128256: 171 and
    # 189. IEEE f32 runs on the FMA units: dense's f32 tiles, 64x64 with a 16-deep step
    # and 8 warps: 99 and 66 registers at that shape, 75 and 77 at 37x129x1000, no spills.
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    out_cap, step_cap = (128, 64) if bf16 else (64, 16)

    def clamp(size: int, cap: int) -> int:
        return max(MIN_BLOCK, min(cap, _common.next_power_of_two(size)))

    bc, bv, bd = clamp(c, out_cap), clamp(v, out_cap), clamp(d, step_cap)
    num_warps = 8 if bc * bv >= (128 * 128 if bf16 else 64 * 64) else 4
    per_program = 1
    if kernel == "stats":
        # The most tiles per program (fewest partials) that still leaves MIN_WAVES waves.
        row_blocks, v_blocks = pl.cdiv(c, bc), pl.cdiv(v, bv)
        while (
            per_program * 2 <= min(MAX_V_BLOCKS_PER_PROGRAM, v_blocks)
            and row_blocks * pl.cdiv(v_blocks, per_program * 2) >= MIN_WAVES * _common.num_sms()
        ):
            per_program *= 2
    bs = LinearCrossEntropyBlockSizes(bc, bv, bd, per_program, num_warps=num_warps, num_stages=4)
    while bs.num_stages > 1 and smem_bytes(bs, dtype) > SMEM_BYTES:
        bs = dataclasses.replace(bs, num_stages=bs.num_stages - 1)
    return bs


def check_block_sizes(bs: LinearCrossEntropyBlockSizes, c: int, v: int, d: int, dtype) -> None:
    bs.check(c, v, d, "triton")
    smem = smem_bytes(bs, dtype)
    if smem > SMEM_BYTES:
        raise ValueError(
            f"Triton linear cross-entropy blocks (block_c={bs.block_c}, block_v={bs.block_v}, "
            f"block_d={bs.block_d}, num_stages={bs.num_stages}, {jnp.dtype(dtype).name}) need ~{smem} bytes "
            f"of shared memory, more than the {SMEM_BYTES} an H100 block has"
        )


# --- tiles -----------------------------------------------------------------------------------


def _iota(size: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (size,), 0)


def _span(index, block: int, size: int):
    """Block ``index`` of a dimension of ``size``: its pl.ds window, the global indices
    [block] and which of them are in bounds."""
    start = pl.multiple_of(index * block, block)
    idx = start + _iota(block)
    return pl.ds(start, block), idx, idx < size


def _row_load(ref, rows, other) -> jax.Array:
    """[block_c, 1] of a per-row [C] ref."""
    row_ds, _, row_ok = rows
    return plgpu.load(ref.at[row_ds], mask=row_ok, other=other)[:, None]


def _logit_tile(x_ref, w_ref, b_ref, rows, cols, *, cap, block_d):
    """(z, dz/dl) of the [block_c, block_v] tile: loops over D in block_d steps."""
    (row_ds, _, row_ok), (col_ds, _, col_ok) = rows, cols
    d = x_ref.shape[1]
    precision = dot_precision(x_ref.dtype)

    def body(kb, acc):
        k_ds, _, k_ok = _span(kb, block_d, d)
        x = plgpu.load(x_ref.at[row_ds, k_ds], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = plgpu.load(w_ref.at[k_ds, col_ds], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        return acc + jnp.dot(x, w, precision=precision, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, pl.cdiv(d, block_d), body, jnp.zeros((row_ok.shape[0], col_ok.shape[0]), jnp.float32))
    bias = None if b_ref is None else plgpu.load(b_ref.at[col_ds], mask=col_ok, other=0.0)[None, :]
    return logits(acc, bias, cap)


# --- kernels ---------------------------------------------------------------------------------


def _stats_kernel(x_ref, w_ref, *refs, has_bias, cap, with_logit_sum, block_c, block_v, block_d, v_blocks):
    """Row block i, vocabulary split s: folds tiles [block_c, block_v] of z for the column
    blocks s * v_blocks + t (t < v_blocks, inside Vc) into partial statistics; writes
    row s of the [splits, C] outputs m, s, label_logit, logit_sum."""
    b_ref, labels_ref, *out_refs = refs if has_bias else (None, *refs)
    c, v = x_ref.shape[0], w_ref.shape[1]
    n_vblocks = pl.cdiv(v, block_v)
    i, split = _common.grouped_program(pl.cdiv(c, block_c), pl.cdiv(n_vblocks, v_blocks))
    rows = _span(i, block_c, c)
    label = _row_load(labels_ref, rows, -1)
    first = split * v_blocks

    def body(t, state):
        cols = _span(first + t, block_v, v)
        z, _ = _logit_tile(x_ref, w_ref, b_ref, rows, cols, cap=cap, block_d=block_d)
        _, col_idx, col_ok = cols
        tile = tile_stats(z, col_ok[None, :], col_idx[None, :], label, with_logit_sum=with_logit_sum)
        return merge_stats(state, tile)

    # The last split may hold fewer than v_blocks tiles.
    state = lax.fori_loop(0, jnp.minimum(v_blocks, n_vblocks - first), body, init_stats((block_c, 1)))
    row_ds, _, row_ok = rows
    for ref, value in zip(out_refs, state, strict=True):
        plgpu.store(ref.at[split, row_ds], value.reshape(block_c), mask=row_ok)


def _dlogits_kernel(x_ref, w_ref, *refs, has_bias, cap, block_c, block_v, block_d):
    """Output tile [block_c, block_v] of dz; loops over D in block_d steps. Per-row
    refs (labels, m, log_s, g_p, g_y, g_u) are [C]."""
    b_ref, labels_ref, m_ref, log_s_ref, g_p_ref, g_y_ref, g_u_ref, dz_ref = refs if has_bias else (None, *refs)
    c, v = x_ref.shape[0], w_ref.shape[1]
    i, j = _common.grouped_program(pl.cdiv(c, block_c), pl.cdiv(v, block_v))
    rows, cols = _span(i, block_c, c), _span(j, block_v, v)
    z, dz_dl = _logit_tile(x_ref, w_ref, b_ref, rows, cols, cap=cap, block_d=block_d)
    dz = dlogits_tile(
        z,
        dz_dl,
        cols[1][None, :],
        _row_load(labels_ref, rows, -1),
        *(_row_load(ref, rows, 0.0) for ref in (m_ref, log_s_ref, g_p_ref, g_y_ref, g_u_ref)),
    )
    (row_ds, _, row_ok), (col_ds, _, col_ok) = rows, cols
    plgpu.store(dz_ref.at[row_ds, col_ds], dz.astype(dz_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


# --- launchers -------------------------------------------------------------------------------


def row_stats(x, w, *rest, cap, with_logit_sum, block_sizes, interpret):
    """rest = ([b,] labels). Returns (m, log_s, label_logit, logit_sum), [C] f32 each."""
    *b, labels = rest
    (c, d), v = x.shape, w.shape[1]
    bs = block_sizes or LinearCrossEntropyBlockSizes.default(c, v, d, x.dtype, "triton", "stats")
    check_block_sizes(bs, c, v, d, x.dtype)
    splits = pl.cdiv(pl.cdiv(v, bs.block_v), bs.v_blocks_per_program)
    kernel = functools.partial(
        _stats_kernel,
        has_bias=bool(b),
        cap=cap,
        with_logit_sum=with_logit_sum,
        block_c=bs.block_c,
        block_v=bs.block_v,
        block_d=bs.block_d,
        v_blocks=bs.v_blocks_per_program,
    )
    partials = pl.pallas_call(
        kernel,
        out_shape=[_common.out_struct((splits, c), jnp.float32)] * 4,
        grid=(pl.cdiv(c, bs.block_c) * splits,),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=cost(x, w, "stats", cap),
        interpret=interpret,
        name="fusedvjp_lce_stats",
    )(x, w, *b, labels)
    return merge_partials(*partials)


def dlogits(x, w, *rest, cap, block_sizes, interpret):
    """rest = ([b,] labels, m, log_s, g_p, g_y, g_u). Returns dz [C, Vc] in x's dtype."""
    (c, d), v = x.shape, w.shape[1]
    bs = block_sizes or LinearCrossEntropyBlockSizes.default(c, v, d, x.dtype, "triton", "dlogits")
    check_block_sizes(bs, c, v, d, x.dtype)
    kernel = functools.partial(
        _dlogits_kernel,
        has_bias=len(rest) == 7,
        cap=cap,
        block_c=bs.block_c,
        block_v=bs.block_v,
        block_d=bs.block_d,
    )
    return pl.pallas_call(
        kernel,
        out_shape=_common.out_struct((c, v), x.dtype),
        grid=(pl.cdiv(c, bs.block_c) * pl.cdiv(v, bs.block_v),),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=cost(x, w, "dlogits", cap),
        interpret=interpret,
        name="fusedvjp_lce_dlogits",
    )(x, w, *rest)
