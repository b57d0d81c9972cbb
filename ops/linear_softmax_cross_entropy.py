"""Fused linear + softmax cross-entropy (the LM-head loss) without the [N, V] logits.

Per row ``x_i`` (length D) with integer label ``y_i``, weights ``w [D, V]`` and bias ``b``::

    l = x w + b                       the logits (never all in memory at once)
    z = cap tanh(l / cap)             with ``logit_soft_cap`` (Gemma-2), else z = l
    loss = lse(z) - (1 - a) z_y - (a / V) sum_j z_j + s lse(z)^2

-- :func:`fusedvjp.ops.softmax_cross_entropy_with_integer_labels` on ``z`` (smoothing
``a``, z-loss ``s``). Its gradient with respect to ``z`` is one row,
``dz_j = g ((1 + 2 s lse) p_j - (1 - a) [j == y] - a / V)`` with ``p = softmax(z)``, and
through the cap ``dl = dz (1 - (z / cap)^2)`` (tanh's VJP). Then ``dx = dl w^T``,
``dW = x^T dl``, ``db = sum_i dl``.

Chunked over the vocabulary. The forward walks ``w`` in column chunks ``w[:, c]``; each
chunk's logits are reduced at once to per-row statistics (``row_stats``: row max, log of
the sum of exponentials, the label's logit when the label lies in the chunk, the logit
sum), merged across chunks with the logsumexp identity (as the vocabulary-parallel
cross-entropy merges device slices). The residuals are the inputs and the merged
``(m, log_s)`` -- O(N), never a logit. The backward walks the chunks again: it recomputes
each chunk's logits and forms ``dl`` (``dlogits``), then ``dx += dl w_c^T`` (the only
accumulator, [N, D] f32), ``dW[:, c] = x^T dl`` and ``db[c] = sum_i dl``, each written
once. At most one chunk's [N, Vc] logits is alive; the default chunk keeps it within
:data:`CHUNK_BYTES`. Chunking the vocabulary, not the rows, makes every ``dW`` column a
single full-N matmul with f32 accumulation, rounded to w's dtype once.

The two per-chunk primitives have the signatures of the Pallas kernels
(:mod:`fusedvjp.kernels.linear_softmax_cross_entropy`), which ``impl="pallas"`` calls in
their place; :func:`_row_stats_jnp` and :func:`_dlogits_jnp` are their jnp versions.

Semantics as the cross-entropy ops (README, "Semantics"): ``where=False`` rows give loss
0 and gradient 0 whatever ``x`` holds there (the rows are zeroed before the matmul); a
label outside ``[0, V)`` on a counted row gives a NaN loss and a NaN gradient row (and,
through ``x^T dl``, NaN in ``dW`` and ``db``, as autodiff of the materialized logits gives).
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from fusedvjp.ops import _sharding
from fusedvjp.ops._dispatch import (
    check_float,
    check_static_float,
    compute_dtype,
    resolve_impl,
    reverse_mode_only,
    run_kernel,
    uses_kernels,
)
from fusedvjp.kernels._common import class_indices
from fusedvjp.ops.softmax_cross_entropy import (
    _integer_label_loss,
    _manual,
    _merge_row_stats,
    apply_row_weights,
    check_ignore_index,
    ignored_rows,
    label_array,
    row_weights,
    vocab_parallel_integer_loss,
)

OP_NAME = "linear_softmax_cross_entropy_with_integer_labels"
REDUCTIONS = ("none", "sum", "mean")
# The default chunk keeps one chunk's [N, Vc] f32 logits within this many bytes (XLA's
# fused backward holds about two such buffers: the recomputed logits and dl).
CHUNK_BYTES = 64 * 2**20
# The kernels hold no f32 logits: a chunk's live buffer is dl, [N, Vc] in x's dtype. Each
# chunk re-reads x three times (row_stats, dlogits, x^T dl), so fewer, larger chunks move
# fewer bytes: at x [16384, 4096], w [4096, 128256] bf16, 1024 columns re-read 48 GiB of x,
# 8192 columns 6 GiB. Compiled for an H100 (value_and_grad, temporaries from
# memory_analysis, against 3.91 GiB for impl="xla"): 8192 columns 0.71 GiB, 16384 columns
# 1.23 GiB -- 256 MiB keeps the 1/4 target with room.
KERNEL_CHUNK_BYTES = 256 * 2**20


def default_chunk_size(n: int, v: int, itemsize: int = 4, budget: int = CHUNK_BYTES) -> int:
    """Vocabulary columns per chunk: as many as keep [n, Vc] ``itemsize``-byte elements
    within ``budget`` (f32 logits within CHUNK_BYTES on the jnp path), a multiple of 128
    when that is at least 128 (whole matmul tiles), at least 1, at most V."""
    vc = budget // (itemsize * max(n, 1))
    if vc >= 128:
        vc -= vc % 128
    return max(1, min(vc, v))


# --- precision: the rule of every path (README, "precision") -----------------------------


def _dot(a, b):
    """``a @ b`` accumulated in f32 (f64 in x64 mode): 16-bit operands at default precision
    (one tensor-core pass), f32 at HIGHEST (IEEE; XLA's default f32 dot is TF32 on GPU)."""
    precision = lax.Precision.DEFAULT if jnp.dtype(a.dtype).itemsize == 2 else lax.Precision.HIGHEST
    return jnp.matmul(a, b, precision=precision, preferred_element_type=compute_dtype(a.dtype))


def _capped(l, cap):
    """(z, dz/dl) of f32 logits: ``cap tanh(l / cap)`` and ``1 - tanh^2``; (l, None) uncapped."""
    if cap is None:
        return l, None
    a = jnp.tanh(l * (1.0 / cap))
    return cap * a, 1.0 - a * a


def _chunk_logits(x, w, b, cap):
    """z [C, Vc] in the compute dtype, and dz/dl (None without a cap)."""
    l = _dot(x, w)
    if b is not None:
        l = l + b.astype(l.dtype)
    return _capped(l, cap)


# --- the two per-chunk primitives, in jnp (the kernels' signatures) ----------------------


def _row_stats_jnp(x, w, b, labels, *, logit_soft_cap, with_logit_sum):
    """x [C, D], w [D, Vc], b [Vc] | None, labels [C] -> (m, log_s, label_logit, logit_sum) [C].

    ``m + log_s`` is the logsumexp of the chunk's (capped) logits; ``m`` is 0 on a row
    that is all -inf. ``label_logit`` is ``z[label]`` for a label in ``[0, Vc)``, else 0
    (another chunk's label matches no column); ``logit_sum`` is 0 unless asked for.
    """
    z, _ = _chunk_logits(x, w, b, logit_soft_cap)
    m = jnp.max(z, axis=-1, initial=-jnp.inf)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    log_s = jnp.log(jnp.sum(jnp.exp(z - m[:, None]), axis=-1))
    cols = jnp.arange(z.shape[-1], dtype=labels.dtype)
    label_logit = jnp.sum(jnp.where(cols == labels[:, None], z, 0.0), axis=-1)
    logit_sum = jnp.sum(z, axis=-1) if with_logit_sum else jnp.zeros_like(m)
    return m, log_s, label_logit, logit_sum


def _dlogits_jnp(x, w, b, labels, m, log_s, g_p, g_y, g_u, *, logit_soft_cap):
    """d loss / d (x w + b) of one chunk, [C, Vc] in x's dtype.

    ``p_j = exp((z_j - m) - log_s)`` from the whole row's logsumexp;
    ``dl_j = (g_p p_j - g_y [j == label] - g_u) (1 - (z_j / cap)^2)``.
    """
    z, dz_dl = _chunk_logits(x, w, b, logit_soft_cap)
    p = jnp.exp((z - m[:, None]) - log_s[:, None])
    cols = jnp.arange(z.shape[-1], dtype=labels.dtype)
    d = g_p[:, None] * p - jnp.where(cols == labels[:, None], g_y[:, None], 0.0) - g_u[:, None]
    if dz_dl is not None:
        d = d * dz_dl
    return d.astype(x.dtype)


def _kernels():
    """The Pallas kernels' module; a missing one is a case the kernels do not serve."""
    try:
        from fusedvjp.kernels import linear_softmax_cross_entropy as kernels
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("fusedvjp.kernels"):
            raise
        raise NotImplementedError("the linear_softmax_cross_entropy Pallas kernels are not available") from e
    return kernels


# --- the chunk loops ---------------------------------------------------------------------


def _merge_pair(a, b):
    """Statistics of two disjoint column sets -> of their union (logsumexp identity).

    ``(m, log_s)`` with logsumexp = m + log_s. A set that is all -inf (log_s = -inf, m a
    placeholder 0) must not lift the shift, so it takes part as -inf; +inf or NaN in a
    set reaches its log_s (NaN) and the merged row. Label logits and logit sums add.
    """
    (m_a, ls_a, y_a, u_a), (m_b, ls_b, y_b, u_b) = a, b
    big = jnp.maximum(jnp.where(jnp.isneginf(ls_a), -jnp.inf, m_a), jnp.where(jnp.isneginf(ls_b), -jnp.inf, m_b))
    shift = jnp.where(jnp.isneginf(big), 0.0, big)
    return shift, jnp.logaddexp((m_a - shift) + ls_a, (m_b - shift) + ls_b), y_a + y_b, u_a + u_b


def _chunks(v: int, chunk: int):
    """(number of full chunks, tail width): columns [k c, (k+1) c) then [V - tail, V)."""
    return v // chunk, v % chunk


def _w_chunk(w, b, start, width):
    """w[:, start:start+width] (and b's), ``start`` traced or static."""
    w_c = lax.dynamic_slice_in_dim(w, start, width, axis=1)
    b_c = None if b is None else lax.dynamic_slice_in_dim(b, start, width, axis=0)
    return w_c, b_c


def _varying_like(carry, *inputs):
    """A chunk loop's initial carry typed as varying over the mesh axes its inputs vary
    over. Inside shard_map (check_vma=True) a ``fori_loop`` carry keeps one type, and the
    body's results vary over every axis x, w, ... vary over (the rows of x over "data");
    constant zeros vary over none. Outside shard_map: unchanged."""
    axes = frozenset().union(*(_sharding._varying(a) for a in inputs if a is not None))

    def cast(a):
        extra = tuple(sorted(axes - _sharding._varying(a)))
        return lax.pcast(a, extra, to="varying") if extra else a

    return jax.tree.map(cast, carry)


def _chunked_stats(x, w, b, labels, *, cap, with_logit_sum, chunk, row_stats):
    """Merged ``row_stats`` over all of w's columns, ``labels`` relative to w's column 0.

    One chunk at a time (``lax.fori_loop`` over the full chunks, then the static tail),
    so one chunk's logits at most are alive."""
    n, v = x.shape[0], w.shape[1]
    ct = compute_dtype(x.dtype)
    stats_of = functools.partial(row_stats, logit_soft_cap=cap, with_logit_sum=with_logit_sum)
    # The identity of _merge_pair: an empty set (m = 0, log_s = -inf).
    zeros = jnp.zeros((n,), ct)
    stats = _varying_like((zeros, jnp.full((n,), -jnp.inf, ct), zeros, zeros), x, w, b, labels)
    full, tail = _chunks(v, chunk)

    def body(k, stats):
        start = k.astype(jnp.int32) * chunk
        w_c, b_c = _w_chunk(w, b, start, chunk)
        return _merge_pair(stats, tuple(s.astype(ct) for s in stats_of(x, w_c, b_c, labels - start)))

    if full == 1:
        stats = body(jnp.int32(0), stats)
    elif full > 1:
        stats = lax.fori_loop(0, full, body, stats)
    if tail:
        start = full * chunk
        w_c, b_c = _w_chunk(w, b, start, tail)
        stats = _merge_pair(stats, tuple(s.astype(ct) for s in stats_of(x, w_c, b_c, labels - start)))
    return stats


def _loss_from_stats(m, log_s, label_logit, logit_sum, labels, where, v, *, label_smoothing, z_loss):
    """Per-row loss [N] from the whole row's statistics, written around the row max as in
    ``_integer_label_loss``: ``log_s + (1-a)(m - z_y) + (a/V)(V m - sum z) + s lse^2``."""
    loss = log_s
    if label_smoothing < 1:
        loss = loss + (1.0 - label_smoothing) * (m - label_logit)
    if label_smoothing and not _is_zero(v):  # V = 0: no label is valid, the row is NaN below
        loss = loss + (label_smoothing / v) * (v * m - logit_sum)
    if z_loss:
        loss = loss + z_loss * (m + log_s) ** 2
    # An out-of-range label on a counted row: NaN loss (and, through g, gradient row).
    valid = (labels >= 0) & (labels < v)
    loss = jnp.where(where & ~valid, jnp.nan, loss)
    return jnp.where(where, loss, 0.0)


def _forward_loop(x, w, b, labels, where, *, label_smoothing, z_loss, cap, chunk, row_stats):
    """x [N, D] (uncounted rows zeroed), w [D, V], b [V] | None, labels int32 [N], where
    bool [N] -> (loss [N], m [N], log_s [N]) in the compute dtype."""
    m, log_s, label_logit, logit_sum = _chunked_stats(
        x, w, b, labels, cap=cap, with_logit_sum=bool(label_smoothing), chunk=chunk, row_stats=row_stats)
    loss = _loss_from_stats(m, log_s, label_logit, logit_sum, labels, where, w.shape[1],
                            label_smoothing=label_smoothing, z_loss=z_loss)
    return loss, m, log_s


def _row_coefficients(labels, where, m, log_s, g, v, *, label_smoothing, z_loss):
    """(g_p, g_y, g_u) [N]: d loss / d z_j = g_p p_j - g_y [j == y] - g_u.

    d lse / dz = p, so the z-loss s lse^2 adds 2 s lse g to p's coefficient; the smoothed
    target is (1 - a) onehot + a / V. Uncounted rows: 0. A counted row with an
    out-of-range label: NaN (its gradient row is NaN, as its loss)."""
    g = jnp.where(where, g.astype(m.dtype), 0.0)
    g = jnp.where(where & ~((labels >= 0) & (labels < v)), jnp.nan, g)
    g_p = g * (1.0 + 2.0 * z_loss * (m + log_s)) if z_loss else g
    g_u = g * (label_smoothing / v) if label_smoothing and not _is_zero(v) else jnp.zeros_like(g)
    return g_p, g * (1.0 - label_smoothing), g_u


def _is_zero(v) -> bool:
    """Whether a vocabulary size (an int, or traced under a vocabulary split) is a static 0."""
    return isinstance(v, int) and v == 0


def _backward_loop(x, w, b, labels, where, m, log_s, g, *, label_smoothing, z_loss, cap, chunk, dlogits,
                   v_total=None, offset=0):
    """The VJP for per-row cotangents g [N]: (dx [N, D], dW [D, V], db [V] | None), in
    the dtypes of x, w, b. ``labels`` are global: w's columns are classes
    ``[offset, offset + V)`` of ``v_total`` (a vocabulary slice under sharding)."""
    (n, d), v = x.shape, w.shape[1]
    ct = compute_dtype(x.dtype)
    v_total = v if v_total is None else v_total
    g_p, g_y, g_u = _row_coefficients(labels, where, m, log_s, g, v_total,
                                      label_smoothing=label_smoothing, z_loss=z_loss)
    dl_of = functools.partial(dlogits, logit_soft_cap=cap)
    labels = labels - offset

    def chunk_grads(dx, start, width):
        w_c, b_c = _w_chunk(w, b, start, width)
        dl = dl_of(x, w_c, b_c, labels - start, m, log_s, g_p, g_y, g_u)  # [N, Vc], x's dtype
        dx = dx + _dot(dl, w_c.T)  # f32 accumulation across chunks
        dw_c = _dot(x.T, dl).astype(w.dtype)  # one full-N matmul: this chunk's columns, final
        db_c = None if b is None else jnp.sum(dl.astype(ct), axis=0).astype(b.dtype)
        return dx, dw_c, db_c

    def body(k, carry):
        dx, dw, db = carry
        start = k.astype(jnp.int32) * chunk
        dx, dw_c, db_c = chunk_grads(dx, start, chunk)
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, db_c, start, axis=0)
        return dx, dw, db

    carry = _varying_like((jnp.zeros((n, d), ct), jnp.zeros((d, v), w.dtype),
                           None if b is None else jnp.zeros((v,), b.dtype)), x, w, b, labels, where, m, log_s, g)
    full, tail = _chunks(v, chunk)
    if full == 1:
        carry = body(jnp.int32(0), carry)
    elif full > 1:
        carry = lax.fori_loop(0, full, body, carry)
    dx, dw, db = carry
    if tail:
        start = full * chunk
        dx, dw_c, db_c = chunk_grads(dx, start, tail)
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, db_c, start, axis=0)
    return dx.astype(x.dtype), dw, db


def _forward_pallas(*args, **options):
    return _forward_loop(*args, row_stats=_kernels().row_stats, **options)


def _backward_pallas(*args, **options):
    return _backward_loop(*args, dlogits=_kernels().dlogits, **options)


# --- under sharding (ops/_sharding.py): rows and the vocabulary ----------------------------
#
# Factors: m (rows), d (features), v (vocabulary). Rows split (data parallel): each device
# runs the chunk loops on its rows; dW and db are partial sums over rows (psum over m).
# The vocabulary split (w column-parallel, b with it): each device reduces its slice of
# every row to the statistics (max, log-sum, the label's logit if the label is in its
# slice, the logit sum) and only those [N] vectors are all-reduced (_merge_row_stats:
# one pmax, a few psums); the merged (m, log_s) is the residual, so in the backward each
# device writes its own columns of dW and db and a partial dx (psum over v). d is never
# split: a split d is gathered (``whole``).


def _vocab_slice(assign, v_local: int):
    """(first global class of this device's vocabulary slice, total V)."""
    axes = _sharding.axes_of(assign, ("v",))
    return lax.axis_index(axes).astype(jnp.int32) * v_local, v_local * lax.psum(1, axes)


def _forward_local(assign, fn, is_kernel, *, label_smoothing, z_loss, cap, chunk):
    if "v" not in assign:
        return fn
    axes = _sharding.axes_of(assign, ("v",))
    row_stats = _kernels().row_stats if is_kernel else _row_stats_jnp

    def local(x, w, *rest):
        b, labels, where = rest if len(rest) == 3 else (None, *rest)
        offset, v = _vocab_slice(assign, w.shape[1])
        m, log_s, label_logit, logit_sum = _chunked_stats(
            x, w, b, labels - offset, cap=cap, with_logit_sum=bool(label_smoothing),
            chunk=min(chunk, max(w.shape[1], 1)), row_stats=row_stats)
        m, log_s = _merge_row_stats(m, log_s, axes)
        label_logit, logit_sum = lax.psum(label_logit, axes), lax.psum(logit_sum, axes)
        loss = _loss_from_stats(m, log_s, label_logit, logit_sum, labels, where, v,
                                label_smoothing=label_smoothing, z_loss=z_loss)
        return loss, m, log_s

    return local


def _backward_local(assign, fn, is_kernel, *, label_smoothing, z_loss, cap, chunk, has_bias):
    v_axes = _sharding.axes_of(assign, ("v",))

    def local(x, w, *rest):
        b, rest = (rest[0], rest[1:]) if has_bias else (None, rest)
        if v_axes:
            dlogits = _kernels().dlogits if is_kernel else _dlogits_jnp
            offset, v = _vocab_slice(assign, w.shape[1])
            dx, dw, db = _backward_loop(x, w, b, *rest, label_smoothing=label_smoothing, z_loss=z_loss, cap=cap,
                                        chunk=min(chunk, max(w.shape[1], 1)), dlogits=dlogits, v_total=v,
                                        offset=offset)
            dx = lax.psum(dx, v_axes)
        else:
            dx, dw, db = fn(x, w, *((b,) if has_bias else ()), *rest)
        dw = _sharding.psum_over(dw, assign, ("m",))
        db = None if db is None else _sharding.psum_over(db, assign, ("m",))
        return dx, dw, db

    return local


def _layouts(has_bias: bool, **options):
    bias = ("v",) if has_bias else ()
    # partition_jnp: XLA cannot split the jnp chunk loop's dynamic slices of a V-split w
    # (it would gather w and b), so under Auto axes the jnp path is partitioned as the
    # kernels are.
    forward = _sharding.Layout(("m d", "d v", *bias, "m", "m"), ("m", "m", "m"), whole=("d",),
                               local=functools.partial(_forward_local, **options), partition_jnp=True)
    backward = _sharding.Layout(("m d", "d v", *bias, "m", "m", "m", "m", "m"), ("m d", "d v", *bias),
                                whole=("d",), local=functools.partial(_backward_local, has_bias=has_bias, **options),
                                partition_jnp=True)
    return forward, backward


# --- custom_vjp: primal and forward rule share _forward -----------------------------------


def _forward(x, w, b, labels, where, options, impl, return_residuals):
    """x [N, D], w [D, V], b [V] | None, labels int32 [N], where bool [N] -> loss [N] (+ residuals)."""
    opts = dict(options)
    manual = _manual(opts.pop("vocab_axes"))
    loss, m, log_s = run_kernel(
        impl,
        functools.partial(_forward_pallas, **opts),
        functools.partial(_forward_loop, row_stats=_row_stats_jnp, **opts),
        (x, w, b, labels, where),
        OP_NAME,
        _layouts(b is not None, **opts)[0],
        manual,
    )
    if return_residuals:
        # (m, log_s): the row's logsumexp in two parts, from which the backward recomputes
        # p = exp((z - m) - log_s) chunk by chunk; x, w, b to recompute z. Nothing [N, V].
        return loss, (x, w, b, labels, where, m, log_s)
    return loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _lce(x, w, b, labels, where, options, impl):
    return _forward(x, w, b, labels, where, options, impl, return_residuals=False)


def _lce_fwd(x, w, b, labels, where, options, impl):
    return _forward(x, w, b, labels, where, options, impl, return_residuals=True)


def _lce_bwd(options, impl, residuals, g):
    x, w, b, labels, where, m, log_s = residuals
    opts = dict(options)
    manual = _manual(opts.pop("vocab_axes"))
    dx, dw, db = run_kernel(
        impl,
        functools.partial(_backward_pallas, **opts),
        functools.partial(_backward_loop, dlogits=_dlogits_jnp, **opts),
        (x, w, b, labels, where, m, log_s, g),
        OP_NAME,
        _layouts(b is not None, **opts)[1],
        manual,
    )
    return (_sharding.match_cotangent(dx, x), _sharding.match_cotangent(dw, w), _sharding.match_cotangent(db, b),
            None, None)


_lce.defvjp(_lce_fwd, _lce_bwd)


# --- the xla reference and the public function ---------------------------------------------


def _reduce(loss, where, weight, reduction, dtype):
    """Per-row losses [...] (compute dtype) -> ``reduction`` of them: per-row losses in
    ``dtype``, a sum or mean in the compute dtype (f32 from bf16: rounding the mean to
    bf16 would cost 2**-9 relative, 14.375 for 14.349)."""
    loss = apply_row_weights(loss, where, weight)
    if reduction == "none":
        return loss.astype(dtype)
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    count = loss.size if where is None else jnp.sum(where)
    return total / count  # over zero counted rows 0/0 = NaN, as jnp.mean(loss, where=where)


def _user_matmul(x, w):
    """``x @ w`` as a user writes it: for 16-bit operands the result is rounded to their
    dtype (so autodiff runs the backward matmuls on 16-bit operands, the fair baseline);
    f32 at HIGHEST (IEEE)."""
    if jnp.dtype(x.dtype).itemsize == 2:
        return jnp.matmul(x, w)
    return jnp.matmul(x, w, precision=lax.Precision.HIGHEST)


def linear_softmax_cross_entropy_with_integer_labels_reference(
    x, w, labels, *, b=None, where=None, label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None, reduction="none",
    weight=None, axis_name=None,
):
    """The ``impl="xla"`` path: the [..., V] logits materialized, differentiated by autodiff.

    Equivalent to: ``softmax_cross_entropy_with_integer_labels(cap * tanh((x @ w + b) / cap),
    labels, where=where, ...)`` reduced by ``reduction``, with ``x @ w`` in x's dtype and
    the rest in f32 (f64 for f64 inputs), ``where=False`` rows of x zeroed first.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    w = w.astype(x.dtype)
    b = None if b is None else jnp.asarray(b).astype(x.dtype)
    ct = compute_dtype(x.dtype)
    if where is not None:
        x = jnp.where(where[..., None], x, 0.0)  # a NaN there would reach dW through x^T dz
    z = _user_matmul(x, w).astype(ct)
    if b is not None:
        z = z + b.astype(ct)
    if logit_soft_cap is not None:
        z = logit_soft_cap * jnp.tanh(z / logit_soft_cap)
    if axis_name is None:
        loss, _ = _integer_label_loss(z, labels, where, label_smoothing, z_loss)
    else:  # z is this device's slice of the vocabulary along axis_name
        loss = vocab_parallel_integer_loss(z, labels, where, label_smoothing, z_loss,
                                           _sharding.manual_axes(axis_name, OP_NAME))
    return _reduce(loss, where, weight, reduction, x.dtype)


def _check_cap(logit_soft_cap) -> float | None:
    if logit_soft_cap is None:
        return None
    if isinstance(logit_soft_cap, jax.core.Tracer):
        raise TypeError("logit_soft_cap must be None or a concrete Python float, not a traced value")
    if isinstance(logit_soft_cap, bool) or not isinstance(logit_soft_cap, numbers.Real):
        raise TypeError(f"logit_soft_cap must be None or a Python float > 0, got {logit_soft_cap!r:.80}")
    if not (math.isfinite(logit_soft_cap) and logit_soft_cap > 0):
        raise ValueError(f"logit_soft_cap must be a finite float > 0 (or None), got {logit_soft_cap!r}")
    return float(logit_soft_cap)


def _check(x, w, b, labels, where, reduction, chunk_size):
    check_float("x", x)
    check_float("w", w)
    if x.ndim < 1:
        raise ValueError(f"x must have rank >= 1 ([..., D]), got shape {x.shape}")
    if w.ndim != 2:
        raise ValueError(f"w must have rank 2 ([D, V]), got shape {w.shape}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x's last dim D={x.shape[-1]} does not match w's first dim {w.shape[0]} "
                         f"(x {x.shape}, w {w.shape})")
    if b is not None:
        check_float("b", b)
        if b.shape != (w.shape[1],):
            raise ValueError(f"b must have shape (V,) = ({w.shape[1]},) to match w {w.shape}, got {b.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype} (shape {labels.shape})")
    if labels.shape != x.shape[:-1]:
        raise ValueError(f"labels must have shape {x.shape[:-1]} (x {x.shape} without D), got {labels.shape}")
    if where is not None and where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean array, got dtype {where.dtype} (shape {where.shape})")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r:.80}")


def linear_softmax_cross_entropy_with_integer_labels(
    x, w, labels, *, b=None, where=None, label_smoothing=0.0, z_loss=0.0, logit_soft_cap=None,
    reduction="none", chunk_size=None, ignore_index=None, weight=None, axis_name=None, impl="auto",
):
    """Softmax cross-entropy of the logits ``x @ w + b`` without materializing them.

    The LM-head loss: the [..., V] logits are formed one vocabulary chunk at a time, in
    the forward and again in the backward; only per-row statistics (O(N)) are kept.

    Args:
      x: ``[..., D]`` floating activations.
      w: ``[D, V]`` weights (Flax kernel layout). Cast to ``x.dtype`` (its gradient is
        returned in its own dtype).
      labels: integer class indices in ``[0, V)`` (any integer dtype; numpy and Python
        integers are range-checked before conversion, so none wraps), of x's shape without D.
      b: ``[V]`` bias or None. Cast to ``x.dtype``.
      where: optional bool mask of (or broadcast to) the labels' shape: False rows get loss 0 and gradient
        0, whatever x holds there (NaN included), and leave the mean.
      label_smoothing: ``a`` in ``[0, 1)``: target ``(1 - a) onehot + a / V``.
      z_loss: ``s >= 0``: adds ``s * logsumexp(z)**2`` per example.
      logit_soft_cap: None, or ``cap > 0``: the logits are ``cap * tanh((x @ w + b) / cap)``
        (Gemma-2).
      reduction: ``"none"`` (per-example losses), ``"sum"``, or ``"mean"`` (over the
        ``where=True`` rows; NaN when there is none, as ``jnp.mean(loss, where=where)``).
        A sum or mean is computed and returned in float32 (float64 for float64 x), also
        from bf16 x.
      chunk_size: vocabulary columns per chunk (``jnp`` and ``pallas``); None:
        :func:`default_chunk_size`: ``jnp`` keeps one chunk's [N, Vc] f32 logits within
        :data:`CHUNK_BYTES`, the kernels one chunk's [N, Vc] ``dl`` in x's dtype within
        :data:`KERNEL_CHUNK_BYTES`.
      ignore_index: None, or an int: rows whose label equals it count as ``where=False``
        (loss 0, gradient 0, left out of the mean; ``-100`` for PyTorch's padding).
      weight: None, or float per-row weights of (or broadcast to) the labels' shape: each
        counted row's loss, and so its gradients, scaled by its weight before the
        reduction (the mean still divides by the count of counted rows). Differentiable.
      axis_name: inside ``shard_map``, the mesh axis name (or tuple of names) the
        vocabulary is split over: ``w`` (and ``b``) hold this device's slice of the
        classes (the slices in axis-index order), ``labels`` are global class indices,
        ``x`` is the same on every device of the axis. Per-row statistics are merged over
        ``axis_name`` (a pmax and a few psums of [N] vectors) and ``dx`` is all-reduced
        over it; ``dW`` and ``db`` stay per slice.
      impl: ``"auto"`` (pallas on GPU/TPU, jnp on CPU), ``"pallas"``, ``"jnp"`` (chunked,
        hand-written VJP) or ``"xla"`` (the logits materialized, JAX's autodiff).

    Returns:
      losses of the labels' shape in ``x.dtype`` (``"none"``), or a scalar in float32
      (float64 for f64 x); computed in f32 (f64 for f64 inputs on the xla and jnp
      paths). NaN on counted rows whose label is outside ``[0, V)`` or whose logits
      hold ``+inf`` or NaN. Matmuls: IEEE f32 for f32, bf16 operands with f32
      accumulation for bf16 (``dl`` rounded to bf16 once before the backward matmuls);
      ``dx`` and ``dW`` accumulate in f32.

    Raises:
      TypeError / ValueError: non-float x, w or b, non-integer labels, mismatched shapes
        (named in the message), out-of-range hyperparameters, bad reduction or impl.
      NotImplementedError: ``impl="pallas"`` for a case the kernels do not take (f64).

    Equivalent to: ``reduce(weight * (optax.softmax_cross_entropy(z, (1 - a) one_hot(labels,
    V) + a / V) + s * logsumexp(z, -1)**2))`` with ``z = cap * tanh((x @ w + b) / cap)``
    (``x @ w + b`` without a cap), ``where=False`` rows 0.
    """
    x, w, labels = jnp.asarray(x), jnp.asarray(w), label_array(labels)
    b = None if b is None else jnp.asarray(b)
    where = None if where is None else jnp.asarray(where)
    _check(x, w, b, labels, where, reduction, chunk_size)
    if where is not None:
        try:
            where = jnp.broadcast_to(where, labels.shape)
        except ValueError:
            raise ValueError(f"where must have (or broadcast to) the labels' shape {labels.shape}, "
                             f"got {where.shape}") from None
    label_smoothing = check_static_float("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = check_static_float("z_loss", z_loss, 0.0, math.inf)
    cap = _check_cap(logit_soft_cap)
    ignored = ignored_rows(labels, check_ignore_index(ignore_index))
    if ignored is not None:
        where = ~ignored if where is None else where & ~ignored
    weight = row_weights(weight, labels.shape)
    impl = resolve_impl(impl)
    vocab_axes = _sharding.manual_axes(axis_name, OP_NAME)
    options = dict(b=b, where=where, label_smoothing=label_smoothing, z_loss=z_loss, logit_soft_cap=cap,
                   weight=weight)
    if impl == "xla":
        return linear_softmax_cross_entropy_with_integer_labels_reference(x, w, labels, reduction=reduction,
                                                                          axis_name=vocab_axes, **options)
    # Mixed precision as in Flax (and ops.dense): the parameters are cast to the
    # activation dtype outside the custom_vjp, so their cotangents return in their dtype.
    w = w.astype(x.dtype)
    b = None if b is None else b.astype(x.dtype)
    n, (d, v) = math.prod(labels.shape), w.shape
    where1 = jnp.ones((n,), bool) if where is None else where.reshape(n)
    # Uncounted rows are zeroed before the custom_vjp: whatever they hold cannot reach the
    # logits, and this where's transpose gives them a 0 cotangent.
    x2 = jnp.where(where1[:, None], x.reshape(n, d), 0.0)
    # int32 indices, -1 out of range, checked before any narrowing (a uint8 label against
    # V = 300, an int64 label >= 2**32 under x64); under axis_name, w holds one slice of
    # the vocabulary and labels index the whole of it.
    labels1 = class_indices(labels.reshape(n), v * (1 if vocab_axes is None else _sharding.axes_size(vocab_axes)))
    if chunk_size is None:
        kernels = uses_kernels(impl)
        chunk = default_chunk_size(n, v, jnp.dtype(x.dtype).itemsize if kernels else 4,
                                   KERNEL_CHUNK_BYTES if kernels else CHUNK_BYTES)
    else:
        chunk = min(int(chunk_size), max(v, 1))
    static = (("label_smoothing", label_smoothing), ("z_loss", z_loss), ("cap", cap), ("chunk", chunk),
              ("vocab_axes", vocab_axes))
    with reverse_mode_only(OP_NAME, impl):
        loss = _lce(x2, w, b, labels1, where1, static, impl)
    return _reduce(loss.reshape(labels.shape).astype(compute_dtype(x.dtype)), where, weight, reduction, x.dtype)
