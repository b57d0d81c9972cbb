"""What both softmax cross-entropy backends share: the tile dataclass, the dtypes and
the block math.

Per-row state is kept as [block_n, 1] f32 columns (TPU wants 2-D values; Triton is
happy either way). `x` is a [block_n, block_v] f32 tile, `valid` says which of its
entries are inside the array (the tail block holds garbage: NaN in interpret mode).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl

from fusedvjp.kernels import _common

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


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
        lowering rules and the register / VMEM budgets stated in each backend's
        ``default_block_sizes``. A measured entry of the tuning table
        (``kernels/tuning.json``, see ``_common.tuned_block_sizes``) wins.
        """
        tuned = _common.tuned_block_sizes(cls, "softmax_cross_entropy", (n, v), dtype, backend)
        if tuned is not None:
            return tuned
        # The live temporaries are f32 whatever the input dtype, so the dtype does not
        # change the tile (a bf16 input only halves the bytes each step loads).
        del dtype
        return _backend_module(backend).default_block_sizes(n, v)

    def check(self, n: int, v: int, backend: str) -> None:
        """Raises ValueError if this tile breaks ``backend``'s lowering rules for ``[n, v]``."""
        _backend_module(backend).check_block_sizes(self, n, v)


def _backend_module(backend: str):
    return _common.backend_module("fusedvjp.kernels.softmax_cross_entropy", backend)


# Online logsumexp: with r the running max, sum_j exp(x_j) = exp(r) * s. A block whose max
# raises r to r' rescales s' = s * exp(r - r') + sum_blk exp(x - r'). While every entry
# seen is -inf the shift r is taken as 0, not -inf, so no -inf - -inf = NaN appears and s
# stays 0; lse = r + log(s) is then -inf. The residual is (r, log(s)): r is one of the
# logits (or 0), so x - r is exact where it matters (see the package docstring).


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


def int_label_step(state, x, valid, cols, label, num_prev, *, label_smoothing):
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


def prob_label_step(state, x, t, valid):
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


def finish(state, label, row_on, *, v, label_smoothing, z_loss, prob_labels, vocab_shard):
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


def grad_tile(
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


def init_state(shape):
    zeros = jnp.zeros(shape, jnp.float32)
    return jnp.full(shape, -jnp.inf, jnp.float32), zeros, zeros, zeros


def cost_estimate(logits, labels, *, backward: bool) -> pl.CostEstimate:
    n, v = logits.shape
    moved = logits.size * logits.dtype.itemsize * (2 if backward else 1)
    if labels.ndim == 2:
        moved += labels.size * labels.dtype.itemsize
    # Per-row 4-byte values: label, where, loss, row_max, log_sum (forward); label, where,
    # row_max, log_sum, g (backward).
    return pl.CostEstimate(flops=8 * n * v, transcendentals=n * v, bytes_accessed=moved + 20 * n)
