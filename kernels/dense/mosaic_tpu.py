"""Dense kernels for TPUs through Mosaic TPU.

BlockSpecs move the tiles; the reduction axis is the last grid axis ("arbitrary"),
accumulating into an f32 VMEM scratch that is zeroed at its first step and stored at
its last. A tile past the array's edge holds garbage (NaN in interpret mode), so along
the *reduction* axis the tail of both operands is set to 0 with jnp.where before the
dot or sum (0 * NaN would still be NaN). Along the other axes garbage only reaches
output rows/columns past the edge, whose writes are dropped.

The backward recomputes ``dz = g act'(z)`` from the ``g`` and residual tiles (``a``
for tanh, ``z`` for gelu) in the prologue of both kernels: the VPU/EUP work (a tanh or
erf and a few multiplies an element) hides under the MXU's, and no dz pass is needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fusedvjp.kernels import _common
from fusedvjp.kernels.dense.common import (
    CONTRACT_FIRST,
    CONTRACT_LAST,
    DenseBlockSizes,
    activate,
    backward_block_sizes,
    forward_block_sizes,
    dot_precision,
    dz as dz_of,
)

# Mosaic TPU tiles: the last two dims of a block are multiples of (8, 128) or the
# whole array dimension.
SUBLANE, LANE = 8, 128


def default_block_sizes(m: int, n: int, k: int, dtype, kernel: str) -> DenseBlockSizes:
    # Not measured on a TPU yet. 256x256 output tiles fill v6e's 256-wide MXU and are
    # two passes of v5e's 128-wide one; a 512-deep reduction step halves the
    # accumulator read-modify-writes per MAC. The dW kernel holds the most VMEM:
    # double-buffered x, g, a tiles + dW out + f32 scratch = 2*(512*256 + 2*512*256)*4
    # + 2*256*256*4 + 256*256*4 bytes ~ 3.8 MiB in f32, within v5e's 16 MiB default
    # scoped VMEM. A dimension no larger than its cap is taken whole (always legal).
    def pick(size: int, cap: int) -> int:
        return size if size <= cap else cap

    caps = {"fwd": (256, 256, 512), "dx": (256, 512, 256), "dw": (512, 256, 256)}[kernel]  # (m, n, k)
    return DenseBlockSizes(*(pick(s, c) for s, c in zip((m, n, k), caps)))


def check_block_sizes(bs: DenseBlockSizes, m: int, n: int, k: int) -> None:
    bad = [
        f"{name}={block} (dimension {size})"
        for name, block, size, align in (
            ("block_m", bs.block_m, m, SUBLANE),
            ("block_n", bs.block_n, n, LANE),
            ("block_k", bs.block_k, k, LANE),
        )
        if block != size and (block % align or block > size)
    ]
    if bad:
        raise ValueError(
            f"Mosaic TPU dense blocks must be block_m % {SUBLANE} == 0 and block_n, block_k "
            f"% {LANE} == 0 (or equal the whole dimension), and no larger than it; got {', '.join(bad)}"
        )


def _tail_mask(block: int, size: int, axis: int, shape: tuple[int, int], step) -> jax.Array | None:
    """Where the global index along ``axis`` of a [shape] tile at ``step`` is < size."""
    if size % block == 0:
        return None
    return step * block + lax.broadcasted_iota(jnp.int32, shape, axis) < size


def _zero_outside(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return x if mask is None else jnp.where(mask, x, jnp.zeros_like(x))


def _fwd_kernel(x_ref, w_ref, *refs, has_bias, activation, write_z, k_size):
    """Grid (M/block_m, N/block_n, K/block_k), K last and "arbitrary".

    Tiles: x [block_m, block_k], w [block_k, block_n], b [1, block_n], a (and z) [block_m, block_n].
    """
    refs = list(refs)
    b_ref = refs.pop(0) if has_bias else None
    a_ref = refs.pop(0)
    z_ref = refs.pop(0) if write_z else None
    acc_ref = refs.pop(0)
    kb = pl.program_id(2)
    block_k = x_ref.shape[1]

    @pl.when(kb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = _zero_outside(x_ref[...], _tail_mask(block_k, k_size, 1, x_ref.shape, kb))
    w = _zero_outside(w_ref[...], _tail_mask(block_k, k_size, 0, w_ref.shape, kb))
    acc_ref[...] += jnp.dot(x, w, precision=dot_precision(x.dtype), preferred_element_type=jnp.float32)

    @pl.when(kb == pl.num_programs(2) - 1)
    def _():
        z = acc_ref[...]
        if has_bias:
            z = z + b_ref[...].astype(jnp.float32)
        a_ref[...] = activate(z, activation).astype(a_ref.dtype)
        if write_z:
            z_ref[...] = z.astype(z_ref.dtype)


def _dx_kernel(g_ref, *refs, activation, n_size):
    """Grid (M/block_m, K/block_k, N/block_n), N last and "arbitrary".

    Tiles: g, residual [block_m, block_n], w [block_k, block_n], dx [block_m, block_k].
    """
    r_ref, w_ref, dx_ref, acc_ref = refs if activation is not None else (None, *refs)
    nb = pl.program_id(2)
    block_n = g_ref.shape[1]

    @pl.when(nb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dz = dz_of(g_ref[...], None if r_ref is None else r_ref[...], activation)
    dz = _zero_outside(dz, _tail_mask(block_n, n_size, 1, g_ref.shape, nb)).astype(w_ref.dtype)
    w = _zero_outside(w_ref[...], _tail_mask(block_n, n_size, 1, w_ref.shape, nb))
    acc_ref[...] += lax.dot_general(
        dz, w, CONTRACT_LAST, precision=dot_precision(w.dtype), preferred_element_type=jnp.float32
    )

    @pl.when(nb == pl.num_programs(2) - 1)
    def _():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


def _dw_kernel(x_ref, g_ref, *refs, activation, has_bias, m_size):
    """Grid (N/block_n, K/block_k, M/block_m), M last; K "arbitrary" too (db stays resident).

    Tiles: x [block_m, block_k], g, residual [block_m, block_n], dw [block_k, block_n], db [1, block_n].
    """
    refs = list(refs)
    r_ref = refs.pop(0) if activation is not None else None
    dw_ref = refs.pop(0)
    db_ref = refs.pop(0) if has_bias else None
    dw_acc_ref = refs.pop(0)
    db_acc_ref = refs.pop(0) if has_bias else None
    kb, mb = pl.program_id(1), pl.program_id(2)
    block_m = x_ref.shape[0]
    last_m = mb == pl.num_programs(2) - 1

    @pl.when(mb == 0)
    def _():
        dw_acc_ref[...] = jnp.zeros_like(dw_acc_ref)

    dz = dz_of(g_ref[...], None if r_ref is None else r_ref[...], activation)
    dz = _zero_outside(dz, _tail_mask(block_m, m_size, 0, g_ref.shape, mb))  # f32 [block_m, block_n]
    x = _zero_outside(x_ref[...], _tail_mask(block_m, m_size, 0, x_ref.shape, mb))
    dw_acc_ref[...] += lax.dot_general(
        x, dz.astype(x.dtype), CONTRACT_FIRST, precision=dot_precision(x.dtype), preferred_element_type=jnp.float32
    )

    @pl.when(last_m)
    def _():
        dw_ref[...] = dw_acc_ref[...].astype(dw_ref.dtype)

    if has_bias:
        # db[j] is summed and stored by the K-block-0 sweep only. The db block index
        # (0, j) does not change while K and M advance (N is the outermost grid axis),
        # so the block stays in VMEM and is written back once, when j moves on; this is
        # also why K cannot be "parallel" here.
        @pl.when(kb == 0)
        def _():
            @pl.when(mb == 0)
            def _():
                db_acc_ref[...] = jnp.zeros_like(db_acc_ref)

            db_acc_ref[...] += jnp.sum(dz, axis=0, keepdims=True)

            @pl.when(last_m)
            def _():
                db_ref[...] = db_acc_ref[...].astype(db_ref.dtype)


def fwd(x, w, *b, activation, block_sizes, interpret, write_z=False):
    """a, or (a, z) with ``write_z`` (the pre-activation, gelu's residual)."""
    m, k = x.shape
    n = w.shape[1]
    bs = forward_block_sizes(block_sizes, m, n, k, x.dtype, "mosaic_tpu")
    check_block_sizes(bs, m, n, k)
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    in_specs = [
        pl.BlockSpec((bm, bk), lambda i, j, kb: (i, kb)),
        pl.BlockSpec((bk, bn), lambda i, j, kb: (kb, j)),
    ]
    if b:
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, kb: (0, j)))
        b = (b[0].reshape(1, n),)  # TPU blocks are at least 2-D
    out, out_spec = _common.out_struct((m, n), x.dtype), pl.BlockSpec((bm, bn), lambda i, j, kb: (i, j))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, has_bias=bool(b), activation=activation, write_z=write_z, k_size=k),
        out_shape=(out, out) if write_z else out,
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), pl.cdiv(k, bk)),
        in_specs=in_specs,
        out_specs=(out_spec, out_spec) if write_z else out_spec,
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_dense_fwd",
    )(x, w, *b)


def bwd(x, w, g, *r, activation, has_bias, block_sizes, interpret):
    """``r``: the residual (a for tanh, z for gelu), absent without an activation."""
    m, k = x.shape
    n = w.shape[1]
    bwd_bs = backward_block_sizes(block_sizes, m, n, k, x.dtype, "mosaic_tpu")
    for bs in (bwd_bs.dx, bwd_bs.dw):
        check_block_sizes(bs, m, n, k)
    has_act = activation is not None

    bm, bn, bk = bwd_bs.dx.block_m, bwd_bs.dx.block_n, bwd_bs.dx.block_k

    gz_spec = pl.BlockSpec((bm, bn), lambda i, kb, nb: (i, nb))
    dx = pl.pallas_call(
        functools.partial(_dx_kernel, activation=activation, n_size=n),
        out_shape=_common.out_struct((m, k), x.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(k, bk), pl.cdiv(n, bn)),
        in_specs=[gz_spec] * (1 + has_act) + [pl.BlockSpec((bk, bn), lambda i, kb, nb: (kb, nb))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, kb, nb: (i, kb)),
        scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_dense_bwd_dx",
    )(g, *r, w)

    bm, bn, bk = bwd_bs.dw.block_m, bwd_bs.dw.block_n, bwd_bs.dw.block_k
    gz_spec = pl.BlockSpec((bm, bn), lambda j, kb, mb: (mb, j))
    # K is "arbitrary" with a bias: the db block stays resident across it (see the kernel).
    k_semantics = "arbitrary" if has_bias else "parallel"
    out_shape = [_common.out_struct((k, n), w.dtype)]
    out_specs = [pl.BlockSpec((bk, bn), lambda j, kb, mb: (kb, j))]
    scratch = [pltpu.VMEM((bk, bn), jnp.float32)]
    if has_bias:
        out_shape.append(_common.out_struct((1, n), w.dtype))
        out_specs.append(pl.BlockSpec((1, bn), lambda j, kb, mb: (0, j)))
        scratch.append(pltpu.VMEM((1, bn), jnp.float32))
    dw, *db = pl.pallas_call(
        functools.partial(_dw_kernel, activation=activation, has_bias=has_bias, m_size=m),
        out_shape=out_shape,
        grid=(pl.cdiv(n, bn), pl.cdiv(k, bk), pl.cdiv(m, bm)),
        in_specs=[pl.BlockSpec((bm, bk), lambda j, kb, mb: (mb, kb))] + [gz_spec] * (1 + has_act),
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", k_semantics, "arbitrary")),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_dense_bwd_dw",
    )(x, g, *r)
    return dx, dw, (db[0].reshape(n) if has_bias else None)
