"""Fused softmax cross-entropy: Pallas forward and backward kernels.

Per row ``x = logits[i]`` (``V`` classes) the forward makes ONE pass over the row in
vocab blocks with an online max/sum and returns the loss and the row's logsumexp split in
two f32 numbers, ``lse = m + log_s`` with ``m = max_j x_j`` and ``log_s = log sum_j exp(x_j
- m)``; the probabilities are never written. The backward makes one pass that recomputes
``p = exp((x - m) - log_s)`` blockwise and writes ``dlogits``.

Why the split and not ``lse`` itself: ``lse`` rounded to f32 is off by up to
``2**-24 |lse|`` (6e-4 at ``|x| ~ 1e4``), and every ``p = exp(x - lse)`` inherits that as
relative error -- far worse than optax's f32 gradient, which divides ``exp(x - m)`` by
its sum. ``m`` is one of the logits, so ``x - m`` is exact (Sterbenz) for ``x`` within a
factor 2 of ``m`` and otherwise off by at most ``2**-24 (m - x)``, which moves
``p <= exp(-(m - x))`` by at most ``2**-24 / e`` absolute; ``log_s`` lies in
``[0, log V]``, so its rounding is ~1e-6 absolute. ``p`` is then as accurate as optax's.

Recompute versus saving the gradient: this design moves 2 reads + 1 write of ``[N, V]``
over forward and backward (forward reads ``x``; backward reads ``x`` and writes ``dx``).
Writing the unscaled gradient ``p - t`` as a residual in the forward costs 2 reads + 2
writes (forward reads ``x`` and writes ``p - t``; backward reads it and writes ``g * (p -
t)``, unless XLA fuses that scale into the next matmul) and keeps an ``[N, V]`` residual
alive between forward and backward -- 2 GiB at N=8192, V=128256 in bf16. The recompute
costs one extra ``exp`` per element, which is free for a memory-bound kernel. (Not
measured on a GPU yet: the argument is a byte count.)

Semantics (``a`` = label_smoothing, ``s`` = z_loss, ``y`` = integer label):
  * integer labels: ``t = (1 - a) * onehot(y) + a / V``;
    ``loss = lse - (1 - a) * x[y] - (a / V) * sum_j x_j + s * lse**2``.
    ``y`` outside ``[0, V)``: loss NaN and gradient row NaN.
  * probability labels ``t [N, V]``: ``loss = lse * sum_j t_j - sum_j t_j * x_j``, where a
    term with ``t_j == 0`` is 0 even if ``x_j = -inf`` (the xlogy convention).
  * ``where[i] == False``: loss 0 and gradient row 0, whatever the row holds.
  * ``-inf`` logits (masked vocabulary): ``p = 0`` there and the gradient is ``-g * t``
    (0 where the target is 0); the loss stays finite unless the target puts mass on a
    ``-inf`` logit (then it is ``+inf``, as it should be: e.g. ``a > 0``).
  * a row whose logits are all ``-inf``: ``lse = -inf``, loss NaN, gradient row NaN.

Vocabulary sharding (``vocab_shard=True`` forward, ``num_classes`` / ``check_labels`` in
the backward): device ``k`` holds columns ``[off_k, off_k + V_k)`` and labels ``y - off_k``.
Its forward returns row statistics that add up over devices:
``lse = M + log sum_k exp(row_max_k + log_sum_k - M)`` with ``M = max_k row_max_k``,
``x[y] = sum_k label_logit_k`` (0 on every device but the label's), ``sum_j x_j = sum_k
logit_sum_k``; for probability labels ``sum(t) = sum_k label_sum_k`` and ``sum(t x) =
sum_k label_dot_k``. The backward on each device is the unsharded one given the global
``(M, log S)`` (and global ``sum(t)``), with ``a / V`` over the global ``V``; the
combining code, which sees the global label, makes invalid rows NaN through ``g``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from fusedvjp.kernels import _common

_OP_NAME = "softmax_cross_entropy"
_LOGIT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# --- block sizes -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CrossEntropyBlockSizes:
    """Tile of the ``[N, V]`` logits one kernel step works on.

    Attributes:
      block_n: rows per program.
      block_v: vocab columns per step (forward: per loop step / grid step; backward:
        per program).
      num_warps: Triton only.
      num_stages: Triton only (software pipelining of the forward's vocab loop).
    """

    block_n: int
    block_v: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _common.validate_block_fields(self, ("block_n", "block_v", "num_warps", "num_stages"))

    @classmethod
    def default(cls, n: int, v: int, dtype, backend: str) -> CrossEntropyBlockSizes:
        """Default tile for ``[n, v]`` logits of ``dtype`` on ``backend``.

        None of these defaults was measured on a GPU or TPU yet; they follow the
        lowering rules and the register / VMEM budgets below. A measured entry of the
        tuning table (``kernels/tuning.json``, see ``_common.tuned_block_sizes``) wins.
        """
        tuned = _common.tuned_block_sizes(cls, "softmax_cross_entropy", (n, v), dtype, backend)
        if tuned is not None:
            return tuned
        # The live temporaries are f32 whatever the input dtype, so the dtype does not
        # change the tile (a bf16 input only halves the bytes each step loads).
        del dtype
        if backend == "triton":
            # Triton tensors are powers of two. A tile of <= 4096 f32 elements keeps each
            # live [block_n, block_v] temporary at <= 32 registers per thread with 4
            # warps; block_v up to 2048 keeps the loads long and contiguous. Not measured
            # on a GPU yet.
            block_v = min(_common.next_power_of_two(v), 2048)
            block_n = max(1, min(_common.next_power_of_two(n), 4096 // block_v))
            return cls(block_n=block_n, block_v=block_v, num_warps=4, num_stages=2)
        if backend == "mosaic_tpu":
            # TPU blocks: last two dims multiples of (8, 128) or the full dims. 128 x 2048
            # f32 is 1 MiB per live temporary: a few of them plus the double-buffered
            # input tiles fit the 16 MiB default scoped VMEM of v5e, and a step moves
            # enough bytes (0.5-1 MiB) to hide the per-step overhead. Not measured on a
            # TPU yet.
            block_n = n if n <= 128 else 128
            block_v = v if v <= 2048 else 2048
            return cls(block_n=block_n, block_v=block_v)
        raise ValueError(f"unknown backend {backend!r}; expected one of {_common.BACKEND_NAMES}")

    def check(self, n: int, v: int, backend: str) -> None:
        """Raises ValueError if this tile breaks ``backend``'s lowering rules for ``[n, v]``."""
        if backend == "triton":
            for field in ("block_n", "block_v"):
                value = getattr(self, field)
                if not _common.is_power_of_two(value):
                    raise ValueError(f"triton: {field}={value} must be a power of two")
        elif backend == "mosaic_tpu":
            if not (self.block_n == n or self.block_n % 8 == 0):
                raise ValueError(f"mosaic_tpu: block_n={self.block_n} must be a multiple of 8 or equal N={n}")
            if not (self.block_v == v or self.block_v % 128 == 0):
                raise ValueError(f"mosaic_tpu: block_v={self.block_v} must be a multiple of 128 or equal V={v}")
        else:
            raise ValueError(f"unknown backend {backend!r}; expected one of {_common.BACKEND_NAMES}")


# --- block math shared by both backends ------------------------------------------------
#
# Per-row state is kept as [block_n, 1] f32 columns (TPU wants 2-D values; Triton is
# happy either way). `x` is a [block_n, block_v] f32 tile, `valid` says which of its
# entries are inside the array (the tail block holds garbage: NaN in interpret mode).
#
# Online logsumexp: with r the running max, sum_j exp(x_j) = exp(r) * s. A block whose max
# raises r to r' rescales s' = s * exp(r - r') + sum_blk exp(x - r'). While every entry
# seen is -inf the shift r is taken as 0, not -inf, so no -inf - -inf = NaN appears and s
# stays 0; lse = r + log(s) is then -inf. The residual is (r, log(s)): r is one of the
# logits (or 0), so x - r is exact where it matters (see the module docstring).


def _shift(m):
    return jnp.where(m == -jnp.inf, 0.0, m)


def _online_lse_step(m, s, x):
    """Returns (m', s', r, r'): new running max and sum, old and new shift."""
    m_new = jnp.maximum(m, jnp.max(x, axis=1, keepdims=True))
    r, r_new = _shift(m), _shift(m_new)
    # r <= r' always, except while m is -inf: nothing has been summed (s = 0) and the old
    # shift is the placeholder 0, so exp(r - r') = exp(-r') would overflow for a row whose
    # logits all lie below -88 and make it NaN (0 * inf). Capping the exponent at 0 keeps
    # s = 0 there; a NaN m still propagates (minimum keeps NaN).
    s_new = s * jnp.exp(jnp.minimum(r - r_new, 0.0)) + jnp.sum(jnp.exp(x - r_new), axis=1, keepdims=True)
    return m_new, s_new, r, r_new


def _int_label_step(state, x, valid, cols, label, num_prev, *, label_smoothing):
    """One vocab block for integer labels. state = (m, s, x[y], sum_j (r - x_j)).

    x[y] is picked up by comparing the column index with y: no one-hot exists. The
    smoothing term needs sum_j x_j; it is accumulated as sum_j (r - x_j) (a sum of
    numbers of a few units even when |x| ~ 1e4) and re-based by num_prev * (r' - r)
    when the shift moves (num_prev columns were summed against r).
    """
    m, s, picked, dev_sum = state
    x = jnp.where(valid, x, -jnp.inf)
    m, s, r, r_new = _online_lse_step(m, s, x)
    picked = picked + jnp.sum(jnp.where(cols == label, x, 0.0), axis=1, keepdims=True)
    if label_smoothing:
        dev_sum = (
            dev_sum
            + num_prev * (r_new - r)
            + jnp.sum(jnp.where(valid, r_new - x, 0.0), axis=1, keepdims=True)
        )
    return m, s, picked, dev_sum


def _prob_label_step(state, x, t, valid):
    """One vocab block for probability labels. state = (m, s, sum_j t_j, sum_j t_j (r - x_j)).

    Accumulating t_j (r - x_j) instead of t_j x_j avoids cancelling lse * sum(t) against
    sum(t x) at |x| ~ 1e4; on a shift move the sum is re-based by sum(t) * (r' - r).
    Terms with t_j == 0 are 0 even where x_j = -inf (xlogy convention).
    """
    m, s, label_sum, dev_dot = state
    x = jnp.where(valid, x, -jnp.inf)
    t = jnp.where(valid, t, 0.0)
    m, s, r, r_new = _online_lse_step(m, s, x)
    dev_dot = (
        dev_dot
        + label_sum * (r_new - r)
        + jnp.sum(jnp.where(t != 0, t * (r_new - x), 0.0), axis=1, keepdims=True)
    )
    label_sum = label_sum + jnp.sum(t, axis=1, keepdims=True)
    return m, s, label_sum, dev_dot


def _finish(state, label, row_on, *, v, label_smoothing, z_loss, prob_labels, vocab_shard):
    """Returns (loss, row_max, log_sum) [block_n, 1] from the final state, and for
    probability labels also label_sum = sum_j t_j (the backward's p * sum(t) needs it).
    With vocab_shard: (row_max, log_sum, x[y] or sum(t), sum(x) or sum(t x)) instead.

    lse - (1-a) x[y] - (a/V) sum_j x_j = log(s) + (1-a) (r - x[y]) + (a/V) sum_j (r - x_j),
    and for probability labels lse sum(t) - sum(t x) = sum(t) log(s) + sum_j t_j (r - x_j):
    both without subtracting two numbers of size |x|.
    """
    m, s, acc0, acc1 = state
    r = _shift(m)
    log_s = jnp.log(s)
    if vocab_shard:
        # The sums un-based from the shift: sum_j x_j = V r - sum_j (r - x_j) and
        # sum_j t_j x_j = sum(t) r - sum_j t_j (r - x_j). Without smoothing acc1 was never
        # accumulated and sum(x) is not needed: 0.
        if prob_labels:
            stats = (acc0, acc0 * r - acc1)
        else:
            stats = (acc0, v * r - acc1 if label_smoothing else jnp.zeros_like(r))
        return (r, log_s, *(jnp.where(row_on, a, 0.0) for a in stats))
    lse = r + log_s
    if prob_labels:
        loss = acc0 * log_s + acc1
    else:
        loss = log_s
        if label_smoothing < 1:  # (1-a) * (r - x[y]) would be 0 * inf = NaN at a = 1, x[y] = -inf
            loss = loss + (1.0 - label_smoothing) * (r - acc0)
        if label_smoothing:
            loss = loss + (label_smoothing / v) * acc1
        if z_loss:
            loss = loss + z_loss * lse * lse
        loss = jnp.where((label >= 0) & (label < v), loss, jnp.nan)
    outs = (jnp.where(row_on, loss, 0.0), r, log_s)
    return (*outs, acc0) if prob_labels else outs


def _grad_tile(
    x,
    cols,
    row_max,
    log_sum,
    g,
    row_on,
    label_or_t,
    label_sum,
    *,
    v,
    num_classes,
    check_labels,
    label_smoothing,
    z_loss,
    prob_labels,
):
    """dlogits tile in f32 (cast once by the caller).

    d loss / dx_j = sum(t) p_j - t_j, p = exp((x - m) - log_s); the z-loss s lse^2 adds
    2 s lse p_j (lse = m + log_s; its f32 rounding is 2**-24 relative there, harmless).
    Integer labels: sum(t) = 1 and t_j = (1-a) [j == y] + a/num_classes, built from the
    column index, so d = p (1 + 2 s lse) - t; a label outside [0, v) matches no column.
    """
    p = jnp.exp((x - row_max) - log_sum)
    if prob_labels:
        d = p * label_sum - label_or_t
    else:
        label = label_or_t
        off = label_smoothing / num_classes
        target = jnp.where(cols == label, (1.0 - label_smoothing) + off, off)
        d = (p * (1.0 + 2.0 * z_loss * (row_max + log_sum)) if z_loss else p) - target
        if check_labels:
            d = jnp.where((label >= 0) & (label < v), d, jnp.nan)
    return jnp.where(row_on, g * d, 0.0)


def _init_state(shape):
    zeros = jnp.zeros(shape, jnp.float32)
    return jnp.full(shape, -jnp.inf, jnp.float32), zeros, zeros, zeros


# --- Triton (GPU) ----------------------------------------------------------------------
#
# Triton does not mask edge blocks: every load and store past the array is masked
# explicitly (plgpu.load/store mask=...), which is also what keeps the GPU from reading
# the next row or past the buffer. The loaded values of masked entries are then
# replaced by jnp.where inside the block math, which is what makes them correct.


def _fwd_kernel_triton(
    logits_ref,
    labels_ref,
    where_ref,
    *out_refs,
    n,
    v,
    block_n,
    block_v,
    label_smoothing,
    z_loss,
    prob_labels,
    vocab_shard,
):
    """Rows [block_n] per program over grid (cdiv(N, block_n),); in-kernel loop over
    cdiv(V, block_v) vocab blocks of logits_ref [block_n, V] (and labels_ref [block_n, V]
    for probability labels); out_refs: _finish's outputs, [block_n] each."""
    rows = pl.program_id(0) * block_n + jnp.arange(block_n)
    row_ok = rows < n  # [block_n]
    row_on = (plgpu.load(where_ref, mask=row_ok, other=0) != 0)[:, None]
    label = None if prob_labels else plgpu.load(labels_ref, mask=row_ok, other=0)[:, None]

    def body(j, state):
        start = j * block_v
        cols = (start + jnp.arange(block_v))[None, :]  # [1, block_v]
        valid = row_ok[:, None] & (cols < v)
        block = (slice(None), pl.ds(start, block_v))
        x = plgpu.load(logits_ref.at[block], mask=valid, other=0.0).astype(jnp.float32)
        if prob_labels:
            t = plgpu.load(labels_ref.at[block], mask=valid, other=0.0).astype(jnp.float32)
            return _prob_label_step(state, x, t, valid)
        num_prev = start.astype(jnp.float32)
        return _int_label_step(state, x, valid, cols, label, num_prev, label_smoothing=label_smoothing)

    state = lax.fori_loop(0, pl.cdiv(v, block_v), body, _init_state((block_n, 1)))
    outs = _finish(
        state,
        label,
        row_on,
        v=v,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
        vocab_shard=vocab_shard,
    )
    for ref, value in zip(out_refs, outs, strict=True):
        plgpu.store(ref, value.reshape(block_n), mask=row_ok)


def _bwd_kernel_triton(
    logits_ref,
    labels_ref,
    where_ref,
    row_max_ref,
    log_sum_ref,
    g_ref,
    *refs,
    n,
    v,
    block_n,
    block_v,
    num_classes,
    check_labels,
    label_smoothing,
    z_loss,
    prob_labels,
):
    """One [block_n, block_v] tile per program over grid (cdiv(N, block_n), cdiv(V, block_v));
    per-row inputs are [block_n] blocks; refs = (label_sum_ref, dlogits_ref) or (dlogits_ref,)."""
    *label_sum_ref, dlogits_ref = refs
    rows = pl.program_id(0) * block_n + jnp.arange(block_n)
    cols = (pl.program_id(1) * block_v + jnp.arange(block_v))[None, :]
    row_ok = rows < n
    valid = row_ok[:, None] & (cols < v)

    def row_load(ref, other):
        return plgpu.load(ref, mask=row_ok, other=other)[:, None]

    x = plgpu.load(logits_ref, mask=valid, other=0.0).astype(jnp.float32)
    if prob_labels:
        label_or_t = plgpu.load(labels_ref, mask=valid, other=0.0).astype(jnp.float32)
        label_sum = row_load(label_sum_ref[0], 0.0)
    else:
        label_or_t, label_sum = row_load(labels_ref, 0), None
    d = _grad_tile(
        x,
        cols,
        row_load(row_max_ref, 0.0),
        row_load(log_sum_ref, 0.0),
        row_load(g_ref, 0.0),
        row_load(where_ref, 0) != 0,
        label_or_t,
        label_sum,
        v=v,
        num_classes=num_classes,
        check_labels=check_labels,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
    )
    plgpu.store(dlogits_ref, d.astype(dlogits_ref.dtype), mask=valid)


def _fwd_triton(logits, labels, where, *, interpret, block_sizes, label_smoothing, z_loss, vocab_shard):
    n, v = logits.shape
    bs = block_sizes or CrossEntropyBlockSizes.default(n, v, logits.dtype, "triton")
    prob_labels = labels.ndim == 2
    row_spec = pl.BlockSpec((bs.block_n,), lambda i: (i,))
    full_rows = pl.BlockSpec((bs.block_n, v), lambda i: (i, 0))
    kernel = functools.partial(
        _fwd_kernel_triton,
        n=n,
        v=v,
        block_n=bs.block_n,
        block_v=bs.block_v,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
        vocab_shard=vocab_shard,
    )
    out = _common.out_struct((n,), jnp.float32)
    num_out = 4 if prob_labels or vocab_shard else 3
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bs.block_n),),
        in_specs=[full_rows, full_rows if prob_labels else row_spec, row_spec],
        out_specs=[row_spec] * num_out,
        out_shape=[out] * num_out,
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=_cost(logits, labels, backward=False),
        interpret=interpret,
        name="fusedvjp_xent_fwd",
    )(logits, labels, where)
    return tuple(outs) if vocab_shard else (outs[0], tuple(outs[1:]))


def _bwd_triton(
    logits,
    labels,
    where,
    row_max,
    log_sum,
    g,
    *label_sum,
    interpret,
    block_sizes,
    num_classes,
    check_labels,
    label_smoothing,
    z_loss,
):
    n, v = logits.shape
    bs = block_sizes or CrossEntropyBlockSizes.default(n, v, logits.dtype, "triton")
    prob_labels = labels.ndim == 2
    tile = pl.BlockSpec((bs.block_n, bs.block_v), lambda i, j: (i, j))
    row_spec = pl.BlockSpec((bs.block_n,), lambda i, j: (i,))
    kernel = functools.partial(
        _bwd_kernel_triton,
        n=n,
        v=v,
        block_n=bs.block_n,
        block_v=bs.block_v,
        num_classes=num_classes,
        check_labels=check_labels,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bs.block_n), pl.cdiv(v, bs.block_v)),
        in_specs=[tile, tile if prob_labels else row_spec] + [row_spec] * (4 + len(label_sum)),
        out_specs=tile,
        out_shape=_common.out_struct((n, v), logits.dtype),
        compiler_params=_common.triton_params(bs.num_warps, bs.num_stages),
        cost_estimate=_cost(logits, labels, backward=True),
        interpret=interpret,
        name="fusedvjp_xent_bwd",
    )(logits, labels, where, row_max, log_sum, g, *label_sum)


# --- Mosaic TPU ------------------------------------------------------------------------
#
# Grid (row blocks, vocab blocks), vocab last. The forward carries the per-row state in
# VMEM scratch across the "arbitrary" vocab axis and writes the loss and the residual
# (row_max, log_sum) at its last step; the backward's tiles are independent ("parallel"
# both ways). Per-row arrays travel as [N, 1] (block (block_n, 1): the last dim equals
# the array's) and the launchers reshape them to [N].


def _fwd_kernel_tpu(
    logits_ref,
    labels_ref,
    where_ref,
    *refs,
    v,
    block_n,
    block_v,
    label_smoothing,
    z_loss,
    prob_labels,
    vocab_shard,
):
    """Tile logits_ref [block_n, block_v] at grid (row block i, vocab block j); per-row
    refs [block_n, 1]: _finish's outputs, then the scratch
    [block_n, 1] f32 that carries (max, sum, acc0, acc1) over j."""
    j = pl.program_id(1)
    *out_refs, m_ref, s_ref, acc0_ref, acc1_ref = refs
    state_refs = (m_ref, s_ref, acc0_ref, acc1_ref)

    @pl.when(j == 0)
    def _():
        for ref, init in zip(state_refs, _init_state((block_n, 1))):
            ref[...] = init

    start = j * block_v
    cols = start + lax.broadcasted_iota(jnp.int32, (block_n, block_v), 1)
    valid = cols < v
    x = logits_ref[...].astype(jnp.float32)
    state = tuple(ref[...] for ref in state_refs)
    if prob_labels:
        state = _prob_label_step(state, x, labels_ref[...].astype(jnp.float32), valid)
    else:
        num_prev = start.astype(jnp.float32)
        state = _int_label_step(state, x, valid, cols, labels_ref[...], num_prev, label_smoothing=label_smoothing)
    for ref, value in zip(state_refs, state):
        ref[...] = value

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        label = None if prob_labels else labels_ref[...]
        outs = _finish(
            state,
            label,
            where_ref[...] != 0,
            v=v,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            prob_labels=prob_labels,
            vocab_shard=vocab_shard,
        )
        for ref, value in zip(out_refs, outs, strict=True):
            ref[...] = value


def _bwd_kernel_tpu(
    logits_ref,
    labels_ref,
    where_ref,
    row_max_ref,
    log_sum_ref,
    g_ref,
    *refs,
    v,
    block_n,
    block_v,
    num_classes,
    check_labels,
    label_smoothing,
    z_loss,
    prob_labels,
):
    """Tile [block_n, block_v] at grid (row block i, vocab block j); per-row refs [block_n, 1];
    refs = (label_sum_ref, dlogits_ref) or (dlogits_ref,)."""
    *label_sum_ref, dlogits_ref = refs
    cols = pl.program_id(1) * block_v + lax.broadcasted_iota(jnp.int32, (block_n, block_v), 1)
    if prob_labels:
        label_or_t, label_sum = labels_ref[...].astype(jnp.float32), label_sum_ref[0][...]
    else:
        label_or_t, label_sum = labels_ref[...], None
    d = _grad_tile(
        logits_ref[...].astype(jnp.float32),
        cols,
        row_max_ref[...],
        log_sum_ref[...],
        g_ref[...],
        where_ref[...] != 0,
        label_or_t,
        label_sum,
        v=v,
        num_classes=num_classes,
        check_labels=check_labels,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
    )
    dlogits_ref[...] = d.astype(dlogits_ref.dtype)


def _column(a):
    return a.reshape(a.shape[0], 1)


def _fwd_tpu(logits, labels, where, *, interpret, block_sizes, label_smoothing, z_loss, vocab_shard):
    n, v = logits.shape
    bs = block_sizes or CrossEntropyBlockSizes.default(n, v, logits.dtype, "mosaic_tpu")
    prob_labels = labels.ndim == 2
    tile = pl.BlockSpec((bs.block_n, bs.block_v), lambda i, j: (i, j))
    row_spec = pl.BlockSpec((bs.block_n, 1), lambda i, j: (i, 0))
    kernel = functools.partial(
        _fwd_kernel_tpu,
        v=v,
        block_n=bs.block_n,
        block_v=bs.block_v,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
        vocab_shard=vocab_shard,
    )
    out = _common.out_struct((n, 1), jnp.float32)
    num_out = 4 if prob_labels or vocab_shard else 3
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bs.block_n), pl.cdiv(v, bs.block_v)),
        in_specs=[tile, tile if prob_labels else row_spec, row_spec],
        out_specs=[row_spec] * num_out,
        out_shape=[out] * num_out,
        scratch_shapes=[pltpu.VMEM((bs.block_n, 1), jnp.float32) for _ in range(4)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=_cost(logits, labels, backward=False),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_xent_fwd",
    )(logits, labels if prob_labels else _column(labels), _column(where))
    outs = [a.reshape(n) for a in outs]
    return tuple(outs) if vocab_shard else (outs[0], tuple(outs[1:]))


def _bwd_tpu(
    logits,
    labels,
    where,
    row_max,
    log_sum,
    g,
    *label_sum,
    interpret,
    block_sizes,
    num_classes,
    check_labels,
    label_smoothing,
    z_loss,
):
    n, v = logits.shape
    bs = block_sizes or CrossEntropyBlockSizes.default(n, v, logits.dtype, "mosaic_tpu")
    prob_labels = labels.ndim == 2
    tile = pl.BlockSpec((bs.block_n, bs.block_v), lambda i, j: (i, j))
    row_spec = pl.BlockSpec((bs.block_n, 1), lambda i, j: (i, 0))
    kernel = functools.partial(
        _bwd_kernel_tpu,
        v=v,
        block_n=bs.block_n,
        block_v=bs.block_v,
        num_classes=num_classes,
        check_labels=check_labels,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        prob_labels=prob_labels,
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bs.block_n), pl.cdiv(v, bs.block_v)),
        in_specs=[tile, tile if prob_labels else row_spec] + [row_spec] * (4 + len(label_sum)),
        out_specs=tile,
        out_shape=_common.out_struct((n, v), logits.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=_cost(logits, labels, backward=True),
        interpret=_common.tpu_interpret(interpret),
        name="fusedvjp_xent_bwd",
    )(
        logits,
        labels if prob_labels else _column(labels),
        *map(_column, (where, row_max, log_sum, g, *label_sum)),
    )


# --- launchers -------------------------------------------------------------------------


def _cost(logits, labels, *, backward: bool) -> pl.CostEstimate:
    n, v = logits.shape
    moved = logits.size * logits.dtype.itemsize * (2 if backward else 1)
    if labels.ndim == 2:
        moved += labels.size * labels.dtype.itemsize
    # Per-row 4-byte values: label, where, loss, row_max, log_sum (forward); label, where,
    # row_max, log_sum, g (backward).
    return pl.CostEstimate(flops=8 * n * v, transcendentals=n * v, bytes_accessed=moved + 20 * n)


def _check_args(logits, labels, where, label_smoothing, z_loss) -> bool:
    """Validates shapes and options; returns whether labels are probabilities."""
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [N, V] with N, V >= 1, got shape {logits.shape}")
    n, v = logits.shape
    if jnp.dtype(logits.dtype) not in _LOGIT_DTYPES:
        raise NotImplementedError(f"logits dtype {logits.dtype} (the kernels take float32 or bfloat16)")
    if where.shape != (n,):
        raise ValueError(f"where must be [N]={n,}, got shape {where.shape}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss={z_loss} must be finite and >= 0")
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.shape == (n,):
        return False
    if jnp.issubdtype(labels.dtype, jnp.floating) and labels.shape == (n, v):
        if label_smoothing or z_loss:
            raise ValueError(
                f"label_smoothing={label_smoothing} and z_loss={z_loss} must be 0 with probability labels"
            )
        return True
    raise ValueError(
        f"labels must be integer [N]={n,} or floating [N, V]={n, v}, got {labels.dtype} {labels.shape}"
    )


def _check_flag(name: str, value) -> None:
    # Static options pick kernel variants at trace time: a traced or array value is an error.
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r:.80} must be a Python bool")


def _num_classes(num_classes, v: int) -> int:
    """``num_classes`` validated (an int >= the local V), or the local V if None."""
    if num_classes is None:
        return v
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < v:
        raise ValueError(f"num_classes={num_classes!r:.80} must be an int >= the local V={v}")
    return int(num_classes)


def _kernel_labels(labels: jax.Array, prob_labels: bool) -> jax.Array:
    """Labels as the kernels read them: int32 class indices, or probabilities of >= 2 bytes.

    1-byte probabilities (float8) are widened to bf16, which holds every float8 value
    exactly. The Pallas Triton lowering switches element offsets to 64 bits only for
    arrays over 2**32 *bytes*; a 1-byte [N, V] array of 2**31..2**32 elements would get
    32-bit offsets and wrap (tests/test_offsets.py guards this).
    """
    if not prob_labels:
        return labels.astype(jnp.int32)
    return labels.astype(jnp.bfloat16) if jnp.dtype(labels.dtype).itemsize == 1 else labels


def softmax_cross_entropy_fwd(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    vocab_shard: bool = False,
    backend: str | None = None,
    block_sizes: CrossEntropyBlockSizes | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]] | tuple[jax.Array, ...]:
    """Per-row softmax cross-entropy and its logsumexp residual, in one pass over the logits.

    Equivalent to (integer labels; probability labels use ``t = labels`` directly)::

      x = logits.astype(f32)
      row_max = jnp.max(x, axis=-1)  # 0 instead where a row is all -inf
      log_sum = jnp.log(jnp.sum(jnp.exp(x - row_max[:, None]), axis=-1))
      lse = row_max + log_sum
      t = (1 - label_smoothing) * jax.nn.one_hot(labels, V) + label_smoothing / V
      loss = lse * t.sum(-1) - (t * logits).sum(-1) + z_loss * lse**2
      loss = jnp.where(where, loss, 0.0)

    and with ``vocab_shard`` (``V`` is the local ``V_local``; for probability labels the
    last two are ``t.sum(-1)`` and ``(t * x).sum(-1)`` with 0 where ``t == 0``)::

      label_logit = jnp.sum(jnp.where(jnp.arange(V) == labels[:, None], x, 0.0), axis=-1)
      logit_sum = x.sum(-1) if label_smoothing > 0 else jnp.zeros(N)
      stats = (row_max, log_sum, jnp.where(where, label_logit, 0.0), jnp.where(where, logit_sum, 0.0))

    Args:
      logits: [N, V] float32 or bfloat16.
      labels: integer [N] class indices, or floating [N, V] target probabilities (then
        ``label_smoothing`` and ``z_loss`` must be 0). An index outside [0, V) gives a NaN
        loss (without ``vocab_shard``).
      where: bool [N]; rows that are False get loss 0.
      label_smoothing: ``a`` in [0, 1] (integer labels). With ``vocab_shard`` only
        ``a > 0`` versus ``a == 0`` matters: it says whether ``logit_sum`` is computed.
      z_loss: weight of ``lse**2`` (integer labels). With ``vocab_shard`` it is validated
        and has no effect: no local statistic depends on it.
      vocab_shard: ``logits`` is one device's slice ``[N, V_local]`` of a vocabulary split
        over devices, and integer labels are local (``y - offset``; a label outside
        ``[0, V_local)`` lies on another device and is not an error). Returns the local
        row statistics below instead of the loss; the caller combines them over devices
        (see the module docstring) and applies ``label_smoothing`` and ``z_loss`` there,
        with the global ``V``. Static.
      backend: ``"triton"``, ``"mosaic_tpu"`` or None (per platform; see
        ``_common.platform_dispatch``).
      block_sizes: None for the per-backend default, or a tile that must suit ``backend``
        (every backend when ``backend`` is None).

    Returns:
      ``(loss, (row_max, log_sum))`` -- for probability labels ``(loss, (row_max, log_sum,
      label_sum))`` -- all [N] float32; ``row_max + log_sum`` is the row's logsumexp
      (``row_max`` is 0 on a row that is all -inf, ``log_sum`` -inf there), and
      ``label_sum = sum_j t_j``, which the backward's ``p * sum(t)`` needs and the forward
      has already summed (4N bytes, instead of a second read of the [N, V] labels).
      ``(row_max, log_sum)`` is the residual for the backward: with it
      ``p = exp((x - row_max) - log_sum)`` is recomputed blockwise without a second
      reduction pass. It is the logsumexp in two parts, not one f32 ``lse``, because
      every ``p`` would inherit the rounding of ``lse`` (2**-24 |lse|, 6e-4 at |x| ~ 1e4)
      as relative error (see the module docstring). Two [N] arrays rather than one
      [N, 2]: each is a plain per-row block in both backends ([N] for Triton, [N, 1]
      for TPU), so neither kernel interleaves or slices columns.

      With ``vocab_shard``: a flat tuple of four [N] float32 arrays over the local
      columns, from the same single pass. Integer labels: ``(row_max, log_sum,
      label_logit, logit_sum)`` with ``label_logit = x[y]`` if ``0 <= y < V_local`` else
      0, and ``logit_sum = sum_j x_j`` if ``label_smoothing > 0`` else 0 (then not
      accumulated: the loss does not need it, and a 0 keeps ``0 * logit_sum`` from being
      NaN at ``-inf`` logits). Probability labels: ``(row_max, log_sum, label_sum,
      label_dot)`` with ``label_sum = sum_j t_j`` and ``label_dot = sum_j t_j x_j`` (a
      term with ``t_j == 0`` is 0, even at ``x_j = -inf``). ``(row_max, log_sum)`` are
      this slice's residual exactly as without ``vocab_shard``, on every row, ``where``
      or not (``(0, -inf)`` on a row whose slice is all ``-inf``: it adds ``exp(-inf) =
      0`` to the combined sum); the last two are 0 on rows with ``where`` False.
      ``logit_sum`` and ``label_dot`` are un-based from the shift-relative accumulators
      (``V_local * row_max - sum_j (row_max - x_j)``), so they carry the f32 rounding of
      numbers of size ``V_local |x|``. The combining code should form ``lse - x[y]`` as
      ``(M - label_logit) + log S``, which does not cancel at ``|x| ~ 1e4``.

    Raises:
      ValueError: bad shapes, options or block sizes.
      NotImplementedError: a logits dtype the kernels do not take.
    """
    prob_labels = _check_args(logits, labels, where, label_smoothing, z_loss)
    _check_flag("vocab_shard", vocab_shard)
    n, v = logits.shape
    _common.check_block_sizes(block_sizes, CrossEntropyBlockSizes, backend, n, v)
    options = dict(
        block_sizes=block_sizes,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        vocab_shard=vocab_shard,
    )
    impls = {
        "triton": functools.partial(_fwd_triton, **options),
        "mosaic_tpu": functools.partial(_fwd_tpu, **options),
    }
    labels = _kernel_labels(labels, prob_labels)
    if vocab_shard and not prob_labels:
        # A label of another shard, y >= V_local, would match a column of the tail block
        # past the array (x = -inf there) and make label_logit -inf; -1 matches none.
        labels = jnp.where(labels < v, labels, -1)
    return _common.platform_dispatch(
        impls, logits, labels, where.astype(jnp.int32), backend=backend, op_name=_OP_NAME
    )


def softmax_cross_entropy_bwd(
    logits: jax.Array,
    labels: jax.Array,
    where: jax.Array,
    residual: tuple[jax.Array, ...],
    g: jax.Array,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    num_classes: int | None = None,
    check_labels: bool = True,
    backend: str | None = None,
    block_sizes: CrossEntropyBlockSizes | None = None,
) -> jax.Array:
    """Gradient of :func:`softmax_cross_entropy_fwd`'s loss with respect to the logits.

    Equivalent to (``t`` as in the forward, over the local columns: for integer labels
    ``(1 - a) * one_hot(labels, V_local) + a / num_classes``)::

      row_max, log_sum = residual[:2]
      sum_t = residual[2] if probability labels else 1.0  # sum(t) over the whole vocabulary
      p = jnp.exp((logits.astype(f32) - row_max[:, None]) - log_sum[:, None])
      d = p * (sum_t + 2 * z_loss * (row_max + log_sum))[:, None] - t
      d = jnp.where(check_labels & ~((labels >= 0) & (labels < V_local))[:, None], jnp.nan, d)
      dlogits = jnp.where(where[:, None], g[:, None] * d, 0.0).astype(logits.dtype)

    Args:
      logits, labels, where, label_smoothing, z_loss, backend, block_sizes: as passed
        to the forward.
      residual: the forward's residual: ``(row_max, log_sum)`` (``, label_sum`` for
        probability labels), [N] float32 each. Under vocabulary sharding, the global
        ones combined over devices: ``(M, log S)`` (``, sum_k label_sum_k``).
      g: [N] float32, the cotangent of the loss.
      num_classes: the ``V`` of the smoothing term ``a / V``; None for ``logits.shape[1]``.
        Under vocabulary sharding, the global V (>= the local V, else ValueError). No
        effect for probability labels (no smoothing). Static.
      check_labels: True: an integer label outside ``[0, V_local)`` makes its row NaN.
        False: such a label matches no column and the row is ``g * (p (1 + 2 z lse) -
        a / num_classes)`` -- under sharding the label lies on another device, and the
        combining code makes globally invalid rows NaN itself (with ``g = NaN``). No
        effect for probability labels. Static.

    Returns:
      dlogits [N, V] in ``logits.dtype``. Rows with ``where`` False are 0; rows whose
      integer label is outside [0, V) (with ``check_labels``), or whose logits are all
      -inf, are NaN.

    Raises:
      ValueError: bad shapes, options or block sizes.
      NotImplementedError: a logits dtype the kernels do not take.
    """
    prob_labels = _check_args(logits, labels, where, label_smoothing, z_loss)
    _check_flag("check_labels", check_labels)
    n, v = logits.shape
    num_classes = _num_classes(num_classes, v)
    names = ("row_max", "log_sum", "label_sum") if prob_labels else ("row_max", "log_sum")
    if not (isinstance(residual, (tuple, list)) and len(residual) == len(names)):
        raise ValueError(f"residual must be the forward's ({', '.join(names)}), got {residual!r:.80}")
    for name, a in (*zip(names, residual), ("g", g)):
        if a.shape != (n,):
            raise ValueError(f"{name} must be [N]={n,}, got shape {a.shape}")
    _common.check_block_sizes(block_sizes, CrossEntropyBlockSizes, backend, n, v)
    labels = _kernel_labels(labels, prob_labels)
    options = dict(
        block_sizes=block_sizes,
        num_classes=num_classes,
        check_labels=check_labels,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
    )
    impls = {
        "triton": functools.partial(_bwd_triton, **options),
        "mosaic_tpu": functools.partial(_bwd_tpu, **options),
    }
    return _common.platform_dispatch(
        impls,
        logits,
        labels,
        where.astype(jnp.int32),
        *(r.astype(jnp.float32) for r in residual[:2]),
        g.astype(jnp.float32),
        # Probability labels: sum(t) per row, saved by the forward (4N bytes) rather than
        # re-summed from the [N, V] labels here (an extra read of them).
        *(r.astype(jnp.float32) for r in residual[2:]),
        backend=backend,
        op_name=_OP_NAME,
    )
