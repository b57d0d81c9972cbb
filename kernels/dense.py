"""Fused dense layer ``a = act(x @ w + b)`` with a hand-written backward pass.

The VJP, for ``z = x W + b`` and ``a = tanh(z)`` (``a = z`` without activation):

    dz = g * (1 - a**2)        # tanh'(z) = 1 - tanh(z)**2, so `a` alone suffices
    dx = dz W^T                # [M, N] @ [N, K]
    dW = x^T dz                # [K, M] @ [M, N] = sum over rows of outer products x_r dz_r
    db = sum_rows(dz)          # [N]

The forward output ``a`` is the only residual besides the inputs: tanh' is a function
of ``a``, so neither ``z`` nor a mask needs saving. ``dz`` is never written to memory:
each backward matmul kernel recomputes it in f32 from the ``g`` and ``a`` tiles it
loads (its prologue), and ``db`` is the column sum of the same ``dz`` tiles the ``dW``
kernel already holds, so it costs no extra pass over ``g`` and ``a``.

Three kernels per backend: forward, ``dx`` and ``dW``+``db``. Each backend tiles the
problem with the same three block sizes -- ``block_m`` along M (rows of x),
``block_n`` along N (outputs) and ``block_k`` along K (inputs) -- whichever of them
is the reduction axis of a given kernel.

Precision: the matmuls accumulate in f32 (``preferred_element_type``); bias, tanh and
``dz`` are f32; outputs are cast once at the store. For f32 operands every dot asks for
``lax.Precision.HIGHEST``: in jax 0.11.2 the Pallas Triton lowering maps a dot's
default precision (``None``/``DEFAULT``) and ``HIGH`` to Triton's ``input_precision=
"tf32"`` and only ``HIGHEST`` to ``"ieee"`` (``DotAlgorithmPreset.F32_F32_F32`` also
gives ``"ieee"``); Mosaic TPU maps ``HIGHEST`` to ``contract_precision<fp32>`` and
leaves the default to the compiler. The reference matmul uses ``HIGHEST`` too, so
kernel and reference are both IEEE f32. bf16 operands use the default precision: their products
are exact in the f32 accumulator (Triton applies ``input_precision`` to f32 operands
only), and ``HIGHEST`` would make Mosaic emulate f32 passes for nothing. In the bf16
backward, ``dz`` is rounded to bf16 once to feed the MXU/tensor cores next to the bf16
``W``/``x`` tiles, as XLA's bf16 autodiff rounds it; ``db`` sums the f32 ``dz``.
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

ACTIVATIONS = (None, "tanh")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

# H100: 227 KiB of shared memory per thread block (opt-in maximum).
TRITON_SMEM_BYTES = 227 * 1024
# Triton tensors (and so every block dimension) are powers of two; tl.dot needs each
# of M, N, K >= 16.
TRITON_MIN_BLOCK = 16
# Mosaic TPU tiles: the last two dims of a block are multiples of (8, 128) or the
# whole array dimension.
TPU_SUBLANE, TPU_LANE = 8, 128

# Contracting dimension numbers: dz [bm, bn] . w [bk, bn] over N -> [bm, bk];
# x [bm, bk] . dz [bm, bn] over M -> [bk, bn].
_CONTRACT_LAST = (((1,), (1,)), ((), ()))
_CONTRACT_FIRST = (((0,), (0,)), ((), ()))


# --- block sizes ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DenseBlockSizes:
    """Tile sizes shared by the forward, dx and dW+db kernels.

    Attributes:
      block_m: rows of x per tile (the reduction tile of the dW+db kernel).
      block_n: output features per tile (the reduction tile of the dx kernel).
      block_k: input features per tile (the reduction tile of the forward kernel).
      num_warps: Triton only: warps per program, a power of two.
      num_stages: Triton only: software-pipelining depth of the reduction loop.

    Backend rules (checked when a kernel is built, since one value may serve either
    backend): Triton needs powers of two >= 16 that fit shared memory; Mosaic TPU
    needs ``block_m`` a multiple of 8 and ``block_n``, ``block_k`` multiples of 128,
    each unless it equals the whole dimension, and none larger than its dimension.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _common.validate_block_fields(self, ("block_m", "block_n", "block_k", "num_warps", "num_stages"))

    @classmethod
    def default(cls, m: int, n: int, k: int, dtype, backend: str) -> DenseBlockSizes:
        """Block sizes for an [M, K] @ [K, N] problem in ``dtype`` on ``backend``.

        None of these defaults was measured on a GPU or TPU yet; they follow the
        hardware rules and budgets stated beside each choice. A measured entry of the
        tuning table (``kernels/tuning.json``, see ``_common.tuned_block_sizes``) wins.
        """
        tuned = _common.tuned_block_sizes(cls, "dense", (m, n, k), dtype, backend)
        if tuned is not None:
            return tuned
        dtype = jnp.dtype(dtype)
        if backend == "triton":
            return _triton_default(m, n, k, dtype)
        if backend == "mosaic_tpu":
            return _tpu_default(m, n, k)
        raise ValueError(f"no dense block-size default for backend {backend!r}; expected 'triton' or 'mosaic_tpu'")


def _triton_smem_bytes(bs: DenseBlockSizes, dtype) -> int:
    """Shared memory the pipelined loads of the largest of the three kernels need.

    Per stage: forward x + w tiles (bm*bk + bk*bn); dx g + a + w tiles
    (2*bm*bn + bk*bn); dW x + g + a tiles (bm*bk + 2*bm*bn).
    """
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    per_stage = max(bm * bk + bk * bn, 2 * bm * bn + bk * bn, bm * bk + 2 * bm * bn)
    return bs.num_stages * per_stage * jnp.dtype(dtype).itemsize


def _triton_default(m: int, n: int, k: int, dtype) -> DenseBlockSizes:
    # Not measured on a GPU yet. bf16 dots run on tensor cores: 128x128 output tiles
    # with a 64-deep K step, 8 warps for the 16K-element accumulator. IEEE f32 dots
    # do not use tensor cores (TF32 would): 64x64 tiles, a 16-deep K step and 8 warps.
    # static: H100 sm_90a, f32 128x784x512 and 8192x4096x4096: 64x64x32 at 4 warps
    # spilled 324 / 448 B in the dW+db kernel (255 regs) and 4 B in dx (168 regs);
    # 64x64x16 at 8 warps: 0 spills in every kernel at the MNIST, LLM and odd shapes,
    # fwd 64 regs (occupancy 50%), dx 62 regs (25%), dW+db 188-202 regs (12%).
    # Each block is clamped to the problem size rounded up to a power of two (>= 16).
    bf16 = dtype == jnp.bfloat16
    cap_mn, cap_k = (128, 64) if bf16 else (64, 16)

    def clamp(size: int, cap: int) -> int:
        return max(TRITON_MIN_BLOCK, min(cap, _common.next_power_of_two(size)))

    bm, bn, bk = clamp(m, cap_mn), clamp(n, cap_mn), clamp(k, cap_k)
    num_warps = 8 if bm * bn >= (128 * 128 if bf16 else 64 * 64) else 4
    # Three stages hide load latency best; drop to two where three would not fit.
    bs = DenseBlockSizes(bm, bn, bk, num_warps=num_warps, num_stages=3)
    if _triton_smem_bytes(bs, dtype) > TRITON_SMEM_BYTES:
        bs = dataclasses.replace(bs, num_stages=2)
    return bs


def _tpu_default(m: int, n: int, k: int) -> DenseBlockSizes:
    # Not measured on a TPU yet. 256x256 output tiles fill v6e's 256-wide MXU and are
    # two passes of v5e's 128-wide one; a 512-deep K step halves the accumulator
    # read-modify-writes per MAC. The dW kernel holds the most VMEM: double-buffered
    # x, g, a tiles + dW out + f32 scratch = 2*(256*512 + 2*256*256)*4 + 2*512*256*4
    # + 512*256*4 bytes ~ 4.5 MiB in f32, within v5e's 16 MiB default scoped VMEM.
    # A dimension no larger than its cap is taken whole (always a legal TPU block).
    def pick(size: int, cap: int) -> int:
        return size if size <= cap else cap

    return DenseBlockSizes(pick(m, 256), pick(n, 256), pick(k, 512))


def _check_triton(bs: DenseBlockSizes, dtype) -> None:
    bad = [
        f"{name}={getattr(bs, name)}"
        for name in ("block_m", "block_n", "block_k")
        if not _common.is_power_of_two(getattr(bs, name)) or getattr(bs, name) < TRITON_MIN_BLOCK
    ]
    if bad:
        raise ValueError(f"Triton dense blocks must be powers of two >= {TRITON_MIN_BLOCK}; got {', '.join(bad)}")
    smem = _triton_smem_bytes(bs, dtype)
    if smem > TRITON_SMEM_BYTES:
        raise ValueError(
            f"Triton dense blocks (block_m={bs.block_m}, block_n={bs.block_n}, block_k={bs.block_k}, "
            f"num_stages={bs.num_stages}, {jnp.dtype(dtype).name}) need ~{smem} bytes of shared memory, "
            f"more than the {TRITON_SMEM_BYTES} an H100 block has"
        )


def _check_tpu(bs: DenseBlockSizes, m: int, n: int, k: int) -> None:
    bad = [
        f"{name}={block} (dimension {size})"
        for name, block, size, align in (
            ("block_m", bs.block_m, m, TPU_SUBLANE),
            ("block_n", bs.block_n, n, TPU_LANE),
            ("block_k", bs.block_k, k, TPU_LANE),
        )
        if block != size and (block % align or block > size)
    ]
    if bad:
        raise ValueError(
            f"Mosaic TPU dense blocks must be block_m % {TPU_SUBLANE} == 0 and block_n, block_k "
            f"% {TPU_LANE} == 0 (or equal the whole dimension), and no larger than it; got {', '.join(bad)}"
        )


# --- shared math ------------------------------------------------------------------------


def _dot_precision(dtype) -> lax.Precision:
    # IEEE f32 for f32 operands; see the module docstring for both lowerings.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _activate(z: jax.Array, activation: str | None) -> jax.Array:
    return jnp.tanh(z) if activation == "tanh" else z


def _dz(g: jax.Array, a: jax.Array | None) -> jax.Array:
    """dz = g * tanh'(z) = g * (1 - a^2) in f32; dz = g without activation (a is None)."""
    g = g.astype(jnp.float32)
    if a is None:
        return g
    a = a.astype(jnp.float32)
    return g * (1.0 - a * a)


def _iota(size: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (size,), 0)


# --- Triton kernels ---------------------------------------------------------------------
#
# The refs are the whole arrays; each program loads its tiles with pl.ds windows and
# masked loads (other=0), so tail tiles read zeros past every edge -- never memory past
# the array -- and the zeros drop out of the dots and sums. Stores are masked the same
# way.


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


def _triton_fwd_kernel(x_ref, w_ref, *refs, has_bias, activation, block_m, block_n, block_k):
    """Grid (M/block_m, N/block_n); loops over K in block_k steps.

    Tiles: x [block_m, block_k], w [block_k, block_n], b [block_n], a [block_m, block_n].
    """
    b_ref, a_ref = refs if has_bias else (None, *refs)
    (m, k), n = x_ref.shape, w_ref.shape[1]
    rows = _span(pl.program_id(0), block_m, m)
    cols = _span(pl.program_id(1), block_n, n)
    precision = _dot_precision(x_ref.dtype)

    def body(kb, acc):
        ks = _span(kb, block_k, k)
        x, w = _load(x_ref, rows, ks), _load(w_ref, ks, cols)
        return acc + jnp.dot(x, w, precision=precision, preferred_element_type=jnp.float32)

    z = lax.fori_loop(0, pl.cdiv(k, block_k), body, jnp.zeros((block_m, block_n), jnp.float32))
    if has_bias:
        col_ds, col_ok = cols
        z = z + plgpu.load(b_ref.at[col_ds], mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
    _store(a_ref, rows, cols, _activate(z, activation))


def _triton_dx_kernel(g_ref, *refs, has_act, block_m, block_n, block_k):
    """Grid (M/block_m, K/block_k); loops over N in block_n steps.

    Tiles: g, a [block_m, block_n], w [block_k, block_n], dx [block_m, block_k].
    """
    a_ref, w_ref, dx_ref = refs if has_act else (None, *refs)
    (m, n), k = g_ref.shape, w_ref.shape[0]
    rows = _span(pl.program_id(0), block_m, m)
    ks = _span(pl.program_id(1), block_k, k)
    precision = _dot_precision(w_ref.dtype)

    def body(nb, acc):
        cols = _span(nb, block_n, n)
        a = _load(a_ref, rows, cols) if has_act else None
        dz = _dz(_load(g_ref, rows, cols), a).astype(w_ref.dtype)  # 0 outside the array, as g is
        w = _load(w_ref, ks, cols)
        return acc + lax.dot_general(dz, w, _CONTRACT_LAST, precision=precision, preferred_element_type=jnp.float32)

    dx = lax.fori_loop(0, pl.cdiv(n, block_n), body, jnp.zeros((block_m, block_k), jnp.float32))
    _store(dx_ref, rows, ks, dx)


def _triton_dw_kernel(x_ref, g_ref, *refs, has_act, has_bias, block_m, block_n, block_k):
    """Grid (K/block_k, N/block_n); loops over M in block_m steps.

    Tiles: x [block_m, block_k], g, a [block_m, block_n], dw [block_k, block_n], db [block_n].
    """
    refs = list(refs)
    a_ref = refs.pop(0) if has_act else None
    dw_ref = refs.pop(0)
    db_ref = refs.pop(0) if has_bias else None
    (m, k), n = x_ref.shape, g_ref.shape[1]
    ks = _span(pl.program_id(0), block_k, k)
    cols = _span(pl.program_id(1), block_n, n)
    precision = _dot_precision(x_ref.dtype)

    def body(mb, carry):
        dw, db = carry
        rows = _span(mb, block_m, m)
        a = _load(a_ref, rows, cols) if has_act else None
        dz = _dz(_load(g_ref, rows, cols), a)  # f32, 0 outside the array
        x = _load(x_ref, rows, ks)
        dw = dw + lax.dot_general(
            x, dz.astype(x.dtype), _CONTRACT_FIRST, precision=precision, preferred_element_type=jnp.float32
        )
        if has_bias:
            db = db + jnp.sum(dz, axis=0)
        return dw, db

    init = (jnp.zeros((block_k, block_n), jnp.float32), jnp.zeros((block_n,), jnp.float32))
    dw, db = lax.fori_loop(0, pl.cdiv(m, block_m), body, init)
    _store(dw_ref, ks, cols, dw)
    if has_bias:
        # Every K-block program of column block j sums the same dz tiles to the same
        # db[j] (a column sum per tile, 1/block_k of the tile's MACs); the first one
        # stores it, so each element of db has exactly one writer.
        @pl.when(pl.program_id(0) == 0)
        def _():
            col_ds, col_ok = cols
            plgpu.store(db_ref.at[col_ds], db.astype(db_ref.dtype), mask=col_ok)


def _triton_fwd(x, w, *b, activation, block_sizes, interpret):
    m, k = x.shape
    n = w.shape[1]
    bs = block_sizes or DenseBlockSizes.default(m, n, k, x.dtype, "triton")
    _check_triton(bs, x.dtype)
    kernel = functools.partial(
        _triton_fwd_kernel,
        has_bias=bool(b),
        activation=activation,
        block_m=bs.block_m,
        block_n=bs.block_n,
        block_k=bs.block_k,
    )
    return pl.pallas_call(
        kernel,
        out_shape=_common.out_struct((m, n), x.dtype),
        grid=(pl.cdiv(m, bs.block_m), pl.cdiv(n, bs.block_n)),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="fusedvjp_dense_fwd",
    )(x, w, *b)


def _triton_bwd(x, w, g, *a, has_bias, block_sizes, interpret):
    m, k = x.shape
    n = w.shape[1]
    bs = block_sizes or DenseBlockSizes.default(m, n, k, x.dtype, "triton")
    _check_triton(bs, x.dtype)
    params = _common.triton_params(bs.num_warps, bs.num_stages)
    blocks = dict(block_m=bs.block_m, block_n=bs.block_n, block_k=bs.block_k)
    has_act = bool(a)
    dx = pl.pallas_call(
        functools.partial(_triton_dx_kernel, has_act=has_act, **blocks),
        out_shape=_common.out_struct((m, k), x.dtype),
        grid=(pl.cdiv(m, bs.block_m), pl.cdiv(k, bs.block_k)),
        compiler_params=params,
        interpret=interpret,
        name="fusedvjp_dense_bwd_dx",
    )(g, *a, w)
    out_shape = [_common.out_struct((k, n), w.dtype)]
    if has_bias:
        out_shape.append(_common.out_struct((n,), w.dtype))
    dw, *db = pl.pallas_call(
        functools.partial(_triton_dw_kernel, has_act=has_act, has_bias=has_bias, **blocks),
        out_shape=out_shape,
        grid=(pl.cdiv(k, bs.block_k), pl.cdiv(n, bs.block_n)),
        compiler_params=params,
        interpret=interpret,
        name="fusedvjp_dense_bwd_dw_db",
    )(x, g, *a)
    return dx, dw, (db[0] if has_bias else None)


# --- Mosaic TPU kernels -----------------------------------------------------------------
#
# BlockSpecs move the tiles; the reduction axis is the last grid axis ("arbitrary"),
# accumulating into an f32 VMEM scratch that is zeroed at its first step and stored at
# its last. A tile past the array's edge holds garbage (NaN in interpret mode), so
# along the *reduction* axis the tail of both operands is set to 0 with jnp.where
# before the dot or sum (0 * NaN would still be NaN). Along the other axes garbage only
# reaches output rows/columns past the edge, whose writes are dropped.


def _tail_mask(block: int, size: int, axis: int, shape: tuple[int, int], step) -> jax.Array | None:
    """Where the global index along ``axis`` of a [shape] tile at ``step`` is < size."""
    if size % block == 0:
        return None
    return step * block + lax.broadcasted_iota(jnp.int32, shape, axis) < size


def _zero_outside(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return x if mask is None else jnp.where(mask, x, jnp.zeros_like(x))


def _tpu_fwd_kernel(x_ref, w_ref, *refs, has_bias, activation, k_size):
    """Grid (M/block_m, N/block_n, K/block_k), K last and "arbitrary".

    Tiles: x [block_m, block_k], w [block_k, block_n], b [1, block_n], a [block_m, block_n].
    """
    b_ref, a_ref, acc_ref = refs if has_bias else (None, *refs)
    kb = pl.program_id(2)
    block_k = x_ref.shape[1]

    @pl.when(kb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = _zero_outside(x_ref[...], _tail_mask(block_k, k_size, 1, x_ref.shape, kb))
    w = _zero_outside(w_ref[...], _tail_mask(block_k, k_size, 0, w_ref.shape, kb))
    acc_ref[...] += jnp.dot(x, w, precision=_dot_precision(x.dtype), preferred_element_type=jnp.float32)

    @pl.when(kb == pl.num_programs(2) - 1)
    def _():
        z = acc_ref[...]
        if has_bias:
            z = z + b_ref[...].astype(jnp.float32)
        a_ref[...] = _activate(z, activation).astype(a_ref.dtype)


def _tpu_dx_kernel(g_ref, *refs, has_act, n_size):
    """Grid (M/block_m, K/block_k, N/block_n), N last and "arbitrary".

    Tiles: g, a [block_m, block_n], w [block_k, block_n], dx [block_m, block_k].
    """
    a_ref, w_ref, dx_ref, acc_ref = refs if has_act else (None, *refs)
    nb = pl.program_id(2)
    block_n = g_ref.shape[1]

    @pl.when(nb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    dz = _dz(g_ref[...], a_ref[...] if has_act else None)
    dz = _zero_outside(dz, _tail_mask(block_n, n_size, 1, g_ref.shape, nb)).astype(w_ref.dtype)
    w = _zero_outside(w_ref[...], _tail_mask(block_n, n_size, 1, w_ref.shape, nb))
    acc_ref[...] += lax.dot_general(
        dz, w, _CONTRACT_LAST, precision=_dot_precision(w.dtype), preferred_element_type=jnp.float32
    )

    @pl.when(nb == pl.num_programs(2) - 1)
    def _():
        dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)


def _tpu_dw_kernel(x_ref, g_ref, *refs, has_act, has_bias, m_size):
    """Grid (N/block_n, K/block_k, M/block_m), M last; K "arbitrary" too (db stays resident).

    Tiles: x [block_m, block_k], g, a [block_m, block_n], dw [block_k, block_n], db [1, block_n].
    """
    refs = list(refs)
    a_ref = refs.pop(0) if has_act else None
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

    dz = _dz(g_ref[...], a_ref[...] if has_act else None)
    dz = _zero_outside(dz, _tail_mask(block_m, m_size, 0, g_ref.shape, mb))  # f32 [block_m, block_n]
    x = _zero_outside(x_ref[...], _tail_mask(block_m, m_size, 0, x_ref.shape, mb))
    dw_acc_ref[...] += lax.dot_general(
        x, dz.astype(x.dtype), _CONTRACT_FIRST, precision=_dot_precision(x.dtype), preferred_element_type=jnp.float32
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


def _tpu_fwd(x, w, *b, activation, block_sizes, interpret):
    m, k = x.shape
    n = w.shape[1]
    bs = block_sizes or DenseBlockSizes.default(m, n, k, x.dtype, "mosaic_tpu")
    _check_tpu(bs, m, n, k)
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    in_specs = [
        pl.BlockSpec((bm, bk), lambda i, j, kb: (i, kb)),
        pl.BlockSpec((bk, bn), lambda i, j, kb: (kb, j)),
    ]
    if b:
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, kb: (0, j)))
        b = (b[0].reshape(1, n),)  # TPU blocks are at least 2-D
    return pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, has_bias=bool(b), activation=activation, k_size=k),
        out_shape=_common.out_struct((m, n), x.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), pl.cdiv(k, bk)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kb: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_dense_fwd",
    )(x, w, *b)


def _tpu_bwd(x, w, g, *a, has_bias, block_sizes, interpret):
    m, k = x.shape
    n = w.shape[1]
    bs = block_sizes or DenseBlockSizes.default(m, n, k, x.dtype, "mosaic_tpu")
    _check_tpu(bs, m, n, k)
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    has_act = bool(a)

    gz_spec = pl.BlockSpec((bm, bn), lambda i, kb, nb: (i, nb))
    dx = pl.pallas_call(
        functools.partial(_tpu_dx_kernel, has_act=has_act, n_size=n),
        out_shape=_common.out_struct((m, k), x.dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(k, bk), pl.cdiv(n, bn)),
        in_specs=[gz_spec] * (1 + has_act) + [pl.BlockSpec((bk, bn), lambda i, kb, nb: (kb, nb))],
        out_specs=pl.BlockSpec((bm, bk), lambda i, kb, nb: (i, kb)),
        scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_dense_bwd_dx",
    )(g, *a, w)

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
        functools.partial(_tpu_dw_kernel, has_act=has_act, has_bias=has_bias, m_size=m),
        out_shape=out_shape,
        grid=(pl.cdiv(n, bn), pl.cdiv(k, bk), pl.cdiv(m, bm)),
        in_specs=[pl.BlockSpec((bm, bk), lambda j, kb, mb: (mb, kb))] + [gz_spec] * (1 + has_act),
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", k_semantics, "arbitrary")),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_dense_bwd_dw_db",
    )(x, g, *a)
    return dx, dw, (db[0].reshape(n) if has_bias else None)


# --- launchers --------------------------------------------------------------------------


def _check_args(x, w, b=None) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"dense expects x [M, K] and w [K, N]; got x {x.shape}, w {w.shape}")
    if b is not None and b.shape != (w.shape[1],):
        raise ValueError(f"dense expects b [N] = [{w.shape[1]}]; got b {b.shape}")
    dtypes = {jnp.dtype(t.dtype) for t in (x, w, b) if t is not None}
    if len(dtypes) != 1:
        raise ValueError(f"dense expects x, w, b of one dtype; got {sorted(d.name for d in dtypes)}")
    if not dtypes <= set(DTYPES):
        raise NotImplementedError(f"dense kernels take float32 or bfloat16, not {dtypes.pop().name}")
    if 0 in x.shape + w.shape:
        raise NotImplementedError(f"dense kernels need non-empty operands; got x {x.shape}, w {w.shape}")


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown dense activation {activation!r}; expected one of {ACTIVATIONS}")


def dense_fwd(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    *,
    activation: str | None,
    backend: str | None = None,
    block_sizes: DenseBlockSizes | None = None,
) -> jax.Array:
    """Fused ``act(x @ w + b)``; the result is also the residual of :func:`dense_bwd`.

    Args:
      x: [M, K] float32 or bfloat16.
      w: [K, N], x's dtype.
      b: [N], x's dtype, or None: then no bias is read (a kernel variant without one).
      activation: None or "tanh".
      backend: "triton", "mosaic_tpu", or None to pick per lowering platform (CPU
        interprets; see ``_common.platform_dispatch``).
      block_sizes: tiles for every kernel; None picks ``DenseBlockSizes.default`` per
        backend. With ``backend=None`` the sizes must be legal for every backend,
        since a branch is traced for each platform.

    Returns:
      a: [M, N] in x's dtype.

    Raises:
      ValueError: bad shapes, mixed dtypes, activation or block sizes.
      NotImplementedError: a dtype other than float32/bfloat16, or an empty dimension.

    Equivalent to: ``act(jnp.dot(x, w, precision=HIGHEST, preferred_element_type=f32) + b).astype(x.dtype)``
    """
    _check_args(x, w, b)
    _check_activation(activation)
    static = dict(activation=activation, block_sizes=block_sizes)
    impls = {
        "triton": functools.partial(_triton_fwd, **static),
        "mosaic_tpu": functools.partial(_tpu_fwd, **static),
    }
    arrays = (x, w) if b is None else (x, w, b)
    return _common.platform_dispatch(impls, *arrays, backend=backend, op_name="dense")


def dense_bwd(
    x: jax.Array,
    w: jax.Array,
    a: jax.Array,
    g: jax.Array,
    *,
    has_bias: bool,
    activation: str | None,
    backend: str | None = None,
    block_sizes: DenseBlockSizes | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Gradients of ``a = act(x @ w + b)`` for the cotangent ``g``.

    ``dz = g * (1 - a**2)`` (tanh) or ``g`` (no activation) is formed in f32 inside
    the dx and dW kernels and never stored; ``db`` comes out of the dW kernel.

    Args:
      x: [M, K] forward input.
      w: [K, N] forward weight.
      a: [M, N] forward output (the residual); not read when ``activation`` is None.
      g: [M, N] cotangent of ``a``, a's dtype.
      has_bias: whether the forward had a bias (then db is returned).
      activation: the forward's activation, None or "tanh".
      backend: as in :func:`dense_fwd`.
      block_sizes: as in :func:`dense_fwd`.

    Returns:
      (dx [M, K] in x's dtype, dw [K, N] in w's dtype, db [N] in w's dtype or None).

    Raises:
      ValueError: bad shapes, mixed dtypes, activation or block sizes.
      NotImplementedError: as in :func:`dense_fwd`.

    Equivalent to: ``dz = g * (1 - a**2); (dz @ w.T, x.T @ dz, dz.sum(0) if has_bias else None)``
    """
    _check_args(x, w)
    _check_activation(activation)
    mn = (x.shape[0], w.shape[1])
    if a.shape != mn or g.shape != mn or a.dtype != x.dtype or g.dtype != a.dtype:
        raise ValueError(
            f"dense_bwd expects a and g [M, N] = {list(mn)} in {x.dtype}; "
            f"got a {a.shape} {a.dtype}, g {g.shape} {g.dtype}"
        )
    static = dict(has_bias=has_bias, block_sizes=block_sizes)
    impls = {
        "triton": functools.partial(_triton_bwd, **static),
        "mosaic_tpu": functools.partial(_tpu_bwd, **static),
    }
    arrays = (x, w, g) if activation is None else (x, w, g, a)
    return _common.platform_dispatch(impls, *arrays, backend=backend, op_name="dense")
