"""Dense kernels for GPUs through the Pallas Triton lowering (any CUDA or ROCm GPU).

The refs are the whole arrays; each program loads its tiles with ``pl.ds`` windows and
masked loads (``other=0``), so tail tiles read zeros past every edge -- never memory
past the array -- and the zeros drop out of the dots and sums. Stores are masked the
same way.

Program order: each kernel runs a 1-D grid over its output tiles in *groups* of
``_common.GROUP_ROWS`` tile-rows (Triton's matmul tutorial ordering): the programs resident at
once share a few row blocks of the first operand and sweep the column blocks of the
second, so a wave re-reads its operands from L2 instead of HBM. Row-fastest order would
stream the whole second operand once per wave.

The backward's ``dz = g act'(z)`` (``g (1 - a^2)`` for tanh; from the residual ``z``
for gelu): either a pass writes it once (in the operand dtype, with ``db``'s column
sums), and the ``dx`` and ``dW`` kernels are plain matmuls of it, or each of those
kernels recomputes it in its prologue from the ``g`` and residual tiles it loads.
:func:`use_dz_pass` chooses by the bytes each moves.

``"gelu_exact"`` is refused (``NotImplementedError``): the Pallas Triton lowering of jax
0.11.2 has no rule for ``lax.erf`` (nor ``erfc``), so ``impl="auto"`` falls back to
another backend or jnp.
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
from fusedvjp.kernels.dense.common import (
    CONTRACT_FIRST,
    CONTRACT_LAST,
    DenseBackwardBlockSizes,
    DenseBlockSizes,
    activate,
    backward_block_sizes,
    forward_block_sizes,
    dot_precision,
    dz as dz_of,
)

# H100: 227 KiB of shared memory per thread block (opt-in maximum).
SMEM_BYTES = 227 * 1024
# Triton tensors (and so every block dimension) are powers of two; tl.dot needs each
# of M, N, K >= 16.
MIN_BLOCK = 16
# The dz pass is elementwise plus a column sum: [128, 64] tiles, 4 warps. Its db
# partials are [cdiv(M, 128), N] f32 (1 MiB at M=8192, N=4096 -- 1/64 of dz's bytes).
DZ_PASS_BLOCK = (128, 64)
DZ_PASS_WARPS = 4


# --- block sizes ---------------------------------------------------------------------------


def _loads_per_stage(bs: DenseBlockSizes, kernel: str, prologue: bool) -> int:
    """Elements each pipeline stage of ``kernel`` holds in shared memory.

    fwd: x [bm, bk] + w [bk, bn]. dx: dz (or g and a) [bm, bn] + w [bk, bn].
    dW: x [bm, bk] + dz (or g and a) [bm, bn]. ``prologue``: dz recomputed from g and a.
    """
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    mn = (2 if prologue else 1) * bm * bn
    return {"fwd": bm * bk + bk * bn, "dx": mn + bk * bn, "dw": bm * bk + mn}[kernel]


def smem_bytes(bs: DenseBlockSizes, dtype, kernel: str, prologue: bool = False) -> int:
    return bs.num_stages * _loads_per_stage(bs, kernel, prologue) * jnp.dtype(dtype).itemsize


def default_block_sizes(m: int, n: int, k: int, dtype, kernel: str) -> DenseBlockSizes:
    # Evidence: static compile for H100 sm_90a (bench/results/static-h100), no GPU run.
    # bf16 dots run on tensor cores (wgmma): 128x128 output tiles with a 64-deep
    # reduction step and 8 warps for the 16K-element f32 accumulator (fwd 108 registers,
    # dx 161, dW 194 at 8192x4096x4096, no spills). IEEE f32 dots run on the FMA units:
    # 64x64 output tiles with a 16-deep step and 8 warps (32-deep at 4 warps spilled
    # 324-448 B in dW; 64x64x16 at 8 warps spills nowhere).
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    out_cap, step_cap, out_min = (128, 64, 64) if bf16 else (64, 16, 32)

    def clamp(size: int, cap: int) -> int:
        return max(MIN_BLOCK, min(cap, _common.next_power_of_two(size)))

    # Output axes and reduction axis of each kernel, by problem dimension.
    rows, cols, red = {"fwd": ("m", "n", "k"), "dx": ("m", "k", "n"), "dw": ("k", "n", "m")}[kernel]
    size = dict(m=m, n=n, k=k)
    tile = {rows: clamp(size[rows], out_cap), cols: clamp(size[cols], out_cap), red: clamp(size[red], step_cap)}
    # A grid smaller than the SM count leaves SMs idle (the MNIST layer: 128x512 output
    # is 4 tiles of 128x128): halve the larger output side, down to out_min, until the
    # grid covers the SMs.
    while pl.cdiv(size[rows], tile[rows]) * pl.cdiv(size[cols], tile[cols]) < _common.num_sms():
        sides = [s for s in (rows, cols) if tile[s] // 2 >= max(out_min, MIN_BLOCK)]
        if not sides:
            break
        tile[max(sides, key=lambda s: tile[s])] //= 2
    num_warps = 8 if tile[rows] * tile[cols] >= (128 * 128 if bf16 else 64 * 64) else 4
    bs = DenseBlockSizes(tile["m"], tile["n"], tile["k"], num_warps=num_warps, num_stages=4)
    # The deepest pipeline (4 stages hide HBM latency behind wgmma) that fits, counting
    # the prologue's extra tile so either backward path fits.
    while bs.num_stages > 1 and smem_bytes(bs, dtype, kernel, prologue=True) > SMEM_BYTES:
        bs = dataclasses.replace(bs, num_stages=bs.num_stages - 1)
    return bs


def check_block_sizes(bs: DenseBlockSizes, dtype, kernel: str, prologue: bool = False) -> None:
    bad = [
        f"{name}={getattr(bs, name)}"
        for name in ("block_m", "block_n", "block_k")
        if not _common.is_power_of_two(getattr(bs, name)) or getattr(bs, name) < MIN_BLOCK
    ]
    if bad:
        raise ValueError(f"Triton dense blocks must be powers of two >= {MIN_BLOCK}; got {', '.join(bad)}")
    smem = smem_bytes(bs, dtype, kernel, prologue)
    if smem > SMEM_BYTES:
        raise ValueError(
            f"Triton dense blocks (block_m={bs.block_m}, block_n={bs.block_n}, block_k={bs.block_k}, "
            f"num_stages={bs.num_stages}, {jnp.dtype(dtype).name}) need ~{smem} bytes of shared memory "
            f"in the {kernel} kernel, more than the {SMEM_BYTES} an H100 block has"
        )


def use_dz_pass(m: int, n: int, k: int, bwd: DenseBackwardBlockSizes, has_act: bool, has_bias: bool) -> bool:
    """Whether a pass writes dz (and db) once, or the dx and dW kernels recompute it.

    With an activation, counting bytes of [M, N] tiles read by all programs (s bytes an
    element; the dx kernel has P = cdiv(K, block_k) programs per row block, the dW
    kernel P' per column block, each reading the whole [M, N] slab once across the
    grid; r the residual, a for tanh and z for gelu):
      recompute: g and r read by every program:         2 M N s (P + P')
      pass:      read g, r, write dz once, then dz read: 3 M N s + M N s (P + P')
    The pass wins when P + P' > 3 -- every shape with K above three tiles; the
    recompute also costs act' per element per program (3 flops for tanh, a tanh and
    ~12 flops for gelu), which the pass does once. Without an activation dz is g;
    with a bias, db is then a column sum of g: the dW kernel's P' programs of a column
    block would each sum it (one stores), so a pass that reads g once (M N s bytes)
    replaces P' - 1 redundant sums when P' > 1.
    """
    p_dx, p_dw = pl.cdiv(k, bwd.dx.block_k), pl.cdiv(k, bwd.dw.block_k)
    if has_act:
        return p_dx + p_dw > 3
    return has_bias and p_dw > 1


# --- tiles -----------------------------------------------------------------------------------


def _iota(size: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (size,), 0)


def _span(index, block: int, size: int):
    """Block ``index`` of a dimension of ``size``: its pl.ds window and which entries are in bounds."""
    start = pl.multiple_of(index * block, block)
    return pl.ds(start, block), start + _iota(block) < size


def _load(ref, rows, cols) -> jax.Array:
    """The [rows, cols] tile of a 2-D ref (each a (pl.ds, in-bounds) span), 0 outside."""
    (row_ds, row_ok), (col_ds, col_ok) = rows, cols
    return plgpu.load(ref.at[row_ds, col_ds], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


def _store(ref, rows, cols, value: jax.Array) -> None:
    (row_ds, row_ok), (col_ds, col_ok) = rows, cols
    plgpu.store(ref.at[row_ds, col_ds], value.astype(ref.dtype), mask=row_ok[:, None] & col_ok[None, :])


def _fwd_kernel(x_ref, w_ref, *refs, has_bias, activation, write_z, block_m, block_n, block_k):
    """Output tiles [block_m, block_n] of a (and of z with ``write_z``); loops over K in
    block_k steps. Tiles: x [block_m, block_k], w [block_k, block_n], b [block_n].
    """
    refs = list(refs)
    b_ref = refs.pop(0) if has_bias else None
    a_ref = refs.pop(0)
    z_ref = refs.pop(0) if write_z else None
    (m, k), n = x_ref.shape, w_ref.shape[1]
    i, j = _common.grouped_program(pl.cdiv(m, block_m), pl.cdiv(n, block_n))
    rows, cols = _span(i, block_m, m), _span(j, block_n, n)
    precision = dot_precision(x_ref.dtype)

    def body(kb, acc):
        ks = _span(kb, block_k, k)
        x, w = _load(x_ref, rows, ks), _load(w_ref, ks, cols)
        return acc + jnp.dot(x, w, precision=precision, preferred_element_type=jnp.float32)

    z = lax.fori_loop(0, pl.cdiv(k, block_k), body, jnp.zeros((block_m, block_n), jnp.float32))
    if has_bias:
        col_ds, col_ok = cols
        z = z + plgpu.load(b_ref.at[col_ds], mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
    _store(a_ref, rows, cols, activate(z, activation))
    if write_z:
        _store(z_ref, rows, cols, z)


def _dz_pass_kernel(g_ref, *refs, activation, has_bias, block_m, block_n):
    """Tiles [block_m, block_n]: dz = g act'(z) stored in g's dtype (with an activation),
    and the tile's column sums of the f32 dz into row i of the db partials (with a bias)."""
    refs = list(refs)
    has_act = activation is not None
    r_ref = refs.pop(0) if has_act else None
    dz_ref = refs.pop(0) if has_act else None
    db_ref = refs.pop(0) if has_bias else None
    m, n = g_ref.shape
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = _span(i, block_m, m), _span(j, block_n, n)
    dz = dz_of(_load(g_ref, rows, cols), _load(r_ref, rows, cols) if has_act else None, activation)  # 0 outside
    if has_act:
        _store(dz_ref, rows, cols, dz)
    if has_bias:
        col_ds, col_ok = cols
        plgpu.store(db_ref.at[i, col_ds], jnp.sum(dz, axis=0), mask=col_ok)


def _dx_kernel(g_ref, *refs, activation, block_m, block_n, block_k):
    """Output tiles [block_m, block_k] of dx = dz W^T; loops over N in block_n steps.

    ``g_ref`` holds dz (activation None) or g, with the residual next (dz recomputed per
    tile). Tiles: dz / g, residual [block_m, block_n], w [block_k, block_n].
    """
    has_act = activation is not None
    r_ref, w_ref, dx_ref = refs if has_act else (None, *refs)
    (m, n), k = g_ref.shape, w_ref.shape[0]
    i, kb = _common.grouped_program(pl.cdiv(m, block_m), pl.cdiv(k, block_k))
    rows, ks = _span(i, block_m, m), _span(kb, block_k, k)
    precision = dot_precision(w_ref.dtype)

    def body(nb, acc):
        cols = _span(nb, block_n, n)
        dz = _load(g_ref, rows, cols)
        if has_act:
            dz = dz_of(dz, _load(r_ref, rows, cols), activation).astype(w_ref.dtype)  # 0 outside, as g is
        w = _load(w_ref, ks, cols)
        return acc + lax.dot_general(dz, w, CONTRACT_LAST, precision=precision, preferred_element_type=jnp.float32)

    dx = lax.fori_loop(0, pl.cdiv(n, block_n), body, jnp.zeros((block_m, block_k), jnp.float32))
    _store(dx_ref, rows, ks, dx)


def _dw_kernel(x_ref, g_ref, *refs, activation, has_db, block_m, block_n, block_k):
    """Output tiles [block_k, block_n] of dW = x^T dz; loops over M in block_m steps.

    ``g_ref`` holds dz, or g with the residual next (dz recomputed per tile). ``has_db``:
    this kernel also sums db -- only on the recompute path, where the dz pass is not run.
    Tiles: x [block_m, block_k], dz / g, residual [block_m, block_n], dw [block_k, block_n], db [block_n].
    """
    refs = list(refs)
    has_act = activation is not None
    r_ref = refs.pop(0) if has_act else None
    dw_ref = refs.pop(0)
    db_ref = refs.pop(0) if has_db else None
    (m, k), n = x_ref.shape, g_ref.shape[1]
    kb, j = _common.grouped_program(pl.cdiv(k, block_k), pl.cdiv(n, block_n))
    ks, cols = _span(kb, block_k, k), _span(j, block_n, n)
    precision = dot_precision(x_ref.dtype)

    def body(mb, carry):
        dw, db = carry
        rows = _span(mb, block_m, m)
        dz = _load(g_ref, rows, cols)
        if has_act:
            dz = dz_of(dz, _load(r_ref, rows, cols), activation)  # f32, 0 outside the array
        x = _load(x_ref, rows, ks)
        dw = dw + lax.dot_general(
            x, dz.astype(x.dtype), CONTRACT_FIRST, precision=precision, preferred_element_type=jnp.float32
        )
        if has_db:
            db = db + jnp.sum(dz.astype(jnp.float32), axis=0)
        return dw, db

    init = (jnp.zeros((block_k, block_n), jnp.float32), jnp.zeros((block_n,), jnp.float32))
    dw, db = lax.fori_loop(0, pl.cdiv(m, block_m), body, init)
    _store(dw_ref, ks, cols, dw)
    if has_db:
        # The K-block programs of column block j sum the same dz tiles (at most
        # use_dz_pass's few, or the pass would have run); the first one stores.
        @pl.when(kb == 0)
        def _():
            col_ds, col_ok = cols
            plgpu.store(db_ref.at[col_ds], db.astype(db_ref.dtype), mask=col_ok)


# --- launchers -------------------------------------------------------------------------------


def _grid(rows: int, row_block: int, cols: int, col_block: int) -> tuple[int]:
    return (pl.cdiv(rows, row_block) * pl.cdiv(cols, col_block),)


def _refuse_unlowerable(activation) -> None:
    if activation == "gelu_exact":
        raise NotImplementedError(
            "the Triton dense kernels do not take activation='gelu_exact': the Pallas Triton lowering "
            "(jax 0.11.2) has no rule for lax.erf"
        )


def fwd(x, w, *b, activation, block_sizes, interpret, write_z=False):
    """a, or (a, z) with ``write_z`` (the pre-activation, gelu's residual)."""
    _refuse_unlowerable(activation)
    m, k = x.shape
    n = w.shape[1]
    bs = forward_block_sizes(block_sizes, m, n, k, x.dtype, "triton")
    check_block_sizes(bs, x.dtype, "fwd")
    kernel = functools.partial(
        _fwd_kernel, has_bias=bool(b), activation=activation, write_z=write_z, block_m=bs.block_m,
        block_n=bs.block_n, block_k=bs.block_k,
    )
    out = _common.out_struct((m, n), x.dtype)
    return pl.pallas_call(
        kernel,
        out_shape=(out, out) if write_z else out,
        grid=_grid(m, bs.block_m, n, bs.block_n),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="fusedvjp_dense_fwd",
    )(x, w, *b)


def dz_pass(g, *r, activation, has_bias, interpret):
    """(dz in g's dtype, or None without an activation; db [N] f32, or None without a bias).

    ``r``: the residual (a for tanh, z for gelu), absent without an activation.
    """
    m, n = g.shape
    has_act = activation is not None
    bm, bn = (max(MIN_BLOCK, min(c, _common.next_power_of_two(s))) for c, s in zip(DZ_PASS_BLOCK, (m, n)))
    out_shape = []
    if has_act:
        out_shape.append(_common.out_struct((m, n), g.dtype))
    if has_bias:
        out_shape.append(_common.out_struct((pl.cdiv(m, bm), n), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_dz_pass_kernel, activation=activation, has_bias=has_bias, block_m=bm, block_n=bn),
        out_shape=out_shape,
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
        compiler_params=_common.triton_params(DZ_PASS_WARPS, 1),
        interpret=interpret,
        name="fusedvjp_dense_bwd_dz",
    )(g, *r)
    outs = list(outs)
    dz = outs.pop(0) if has_act else None
    # The partials' rows are summed in f32 by XLA: a [cdiv(M, 128), N] reduction.
    db = jnp.sum(outs.pop(0), axis=0) if has_bias else None
    return dz, db


def bwd(x, w, g, *r, activation, has_bias, block_sizes, interpret):
    """``r``: the residual (a for tanh, z for gelu), absent without an activation."""
    _refuse_unlowerable(activation)
    m, k = x.shape
    n = w.shape[1]
    bwd_bs = backward_block_sizes(block_sizes, m, n, k, x.dtype, "triton")
    db = None
    if use_dz_pass(m, n, k, bwd_bs, activation is not None, has_bias):
        dz, db = dz_pass(g, *r, activation=activation, has_bias=has_bias, interpret=interpret)
        # The matmul kernels read dz as if there were no activation.
        operands, activation, has_db = ((g if dz is None else dz),), None, False
    else:
        operands, has_db = (g, *r), has_bias
    has_act = activation is not None
    check_block_sizes(bwd_bs.dx, x.dtype, "dx", prologue=has_act)
    check_block_sizes(bwd_bs.dw, x.dtype, "dw", prologue=has_act)

    bs = bwd_bs.dx
    dx = pl.pallas_call(
        functools.partial(
            _dx_kernel, activation=activation, block_m=bs.block_m, block_n=bs.block_n, block_k=bs.block_k
        ),
        out_shape=_common.out_struct((m, k), x.dtype),
        grid=_grid(m, bs.block_m, k, bs.block_k),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="fusedvjp_dense_bwd_dx",
    )(*operands, w)
    bs = bwd_bs.dw
    out_shape = [_common.out_struct((k, n), w.dtype)]
    if has_db:
        out_shape.append(_common.out_struct((n,), w.dtype))
    dw, *db_out = pl.pallas_call(
        functools.partial(
            _dw_kernel, activation=activation, has_db=has_db, block_m=bs.block_m, block_n=bs.block_n,
            block_k=bs.block_k,
        ),
        out_shape=out_shape,
        grid=_grid(k, bs.block_k, n, bs.block_n),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="fusedvjp_dense_bwd_dw",
    )(x, *operands)
    if has_db:
        db = db_out[0]
    elif db is not None:
        db = db.astype(w.dtype)
    return dx, dw, db
