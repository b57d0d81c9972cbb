"""Vocabulary-sharded softmax cross-entropy kernels (vocab_shard / num_classes / check_labels).

The logits [N, V] are cut into equal column slices, one per simulated device, and each
slice runs through the kernels (interpret mode, both backends) as a device would: the
forward with ``vocab_shard=True`` and labels shifted to local indices; the per-row
statistics are then combined in float64 numpy, as the all-reduces of the ops layer would;
the backward runs per slice with the combined residual, ``num_classes=V`` and
``check_labels=False``, and the slices are concatenated. Loss and gradient are compared
entry by entry with the float64 oracle of the unsharded loss (conftest), on inputs with
rows masked by ``where``, labels outside [0, V) and a slice of a row that is all -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    assert_kernels_lowered,
    bf16_elementwise_excess,
    lower_for,
    randn,
    softmax_cross_entropy_float64,
    tol,
)

from fusedvjp.kernels import softmax_cross_entropy as xent
from fusedvjp.kernels.softmax_cross_entropy import CrossEntropyBlockSizes

BACKENDS = ("triton", "mosaic_tpu")
# Legal for both backends at every local V below: block_v 128 leaves a tail of 122 at
# V_local = 250 and of 1 at 129; 2048 leaves 1666 at 16002.
SMALL = CrossEntropyBlockSizes(block_n=8, block_v=128)
LARGE = CrossEntropyBlockSizes(block_n=8, block_v=2048)

# name -> (probability labels?, label_smoothing, z_loss)
FEATURES = {
    "int": (False, 0.0, 0.0),  # logit_sum is not computed: zeros
    "int_smooth_zloss": (False, 0.1, 1e-3),
    "prob": (True, 0.0, 0.0),
}

# Rows with a role (the rest are random, where ~75% True):
MASKED_SLICE = 2  # the columns of shard 1 are all -inf; label / target mass elsewhere
ALL_NEG_INF = 1  # every logit -inf, where False: loss 0, gradient 0
LABEL_LOW, LABEL_HIGH = 3, 4  # labels -1 and V, where True: loss and gradient NaN
LABEL_HIGH_OFF = 5  # label V, where False: 0


@functools.partial(jax.jit, static_argnames=("label_smoothing", "z_loss", "backend", "block_sizes"))
def _shard_fwd(logits, labels, where, *, label_smoothing, z_loss, backend, block_sizes):
    return xent.softmax_cross_entropy_fwd(
        logits, labels, where, label_smoothing=label_smoothing, z_loss=z_loss, vocab_shard=True,
        backend=backend, block_sizes=block_sizes,
    )


@functools.partial(
    jax.jit, static_argnames=("label_smoothing", "z_loss", "num_classes", "backend", "block_sizes")
)
def _shard_bwd(logits, labels, where, residual, g, *, label_smoothing, z_loss, num_classes, backend, block_sizes):
    return xent.softmax_cross_entropy_bwd(
        logits, labels, where, residual, g, label_smoothing=label_smoothing, z_loss=z_loss,
        num_classes=num_classes, check_labels=False, backend=backend, block_sizes=block_sizes,
    )


def _inputs(rng, n, v, num_shards, dtype, prob_labels):
    """Logits of a few units with the special rows above; labels (global); where; g."""
    v_local = v // num_shards
    x = rng.standard_normal((n, v)) * 2.0
    x[ALL_NEG_INF] = -np.inf
    x[MASKED_SLICE, v_local : 2 * v_local] = -np.inf
    finite = np.isfinite(x)
    if prob_labels:
        t = rng.random((n, v)) ** 3
        t[t < 0.05] = 0.0  # exact zeros, as in sparse targets
        t[~finite] = 0.0  # no mass on -inf logits (the loss would be +inf)
        t[ALL_NEG_INF] = rng.random(v)  # where False: anything
        t[np.arange(n), rng.integers(0, v_local, n)] = 0.5  # never an empty row
        labels = jnp.asarray(t / t.sum(-1, keepdims=True), jnp.float32)
    else:
        y = rng.integers(0, v, n)
        y[MASKED_SLICE] = rng.integers(0, v_local)  # on shard 0, a finite logit
        y[[LABEL_LOW, LABEL_HIGH, LABEL_HIGH_OFF]] = [-1, v, v]
        labels = jnp.asarray(y, jnp.int32)
    where = rng.random(n) < 0.75
    where[[0, MASKED_SLICE, LABEL_LOW, LABEL_HIGH]] = True
    where[[ALL_NEG_INF, LABEL_HIGH_OFF]] = False
    g = randn(rng, (n,), jnp.float32)
    return jnp.asarray(x, dtype), labels, jnp.asarray(where), g


def _local_labels(labels, k, v_local):
    if labels.ndim == 2:
        return labels[:, k * v_local : (k + 1) * v_local]
    return labels - k * v_local  # a label on another shard is outside [0, v_local)


def _combine(stats, prob_labels, *, v, label_smoothing, z_loss):
    """float64 (loss before where/NaN, M, log S, sum(t)) from the shards' statistics,
    as the ops layer's all-reduces would combine them."""
    row_max, log_sum, a_stat, b_stat = (np.stack([np.asarray(s[i], np.float64) for s in stats]) for i in range(4))
    m = row_max.max(0)
    with np.errstate(divide="ignore"):
        log_s = np.log(np.sum(np.exp((row_max - m) + log_sum), axis=0))
    lse = m + log_s
    with np.errstate(invalid="ignore"):
        if prob_labels:  # lse sum(t) - sum(t x)
            loss = lse * a_stat.sum(0) - b_stat.sum(0)
        else:  # lse - (1 - a) x[y] - (a / V) sum(x) + z lse^2
            a = label_smoothing
            loss = lse - (1 - a) * a_stat.sum(0) - (a / v) * b_stat.sum(0) + z_loss * lse**2
    return loss, m, log_s, a_stat.sum(0)


def _sharded(logits, labels, where, g, *, num_shards, backend, block_sizes, label_smoothing, z_loss,
             num_classes_for_bwd=None):
    """(loss [N], dlogits [N, V]) through the kernels, one shard at a time."""
    n, v = logits.shape
    v_local = v // num_shards
    prob_labels = labels.ndim == 2
    opts = dict(label_smoothing=label_smoothing, z_loss=z_loss, backend=backend, block_sizes=block_sizes)
    shards = [logits[:, k * v_local : (k + 1) * v_local] for k in range(num_shards)]
    local = [_local_labels(labels, k, v_local) for k in range(num_shards)]
    stats = [_shard_fwd(x, y, where, **opts) for x, y in zip(shards, local)]
    for s in stats:
        assert len(s) == 4 and all(a.shape == (n,) and a.dtype == jnp.float32 for a in s)
        for a in s[2:]:  # rows with where False: exactly 0; no NaN from labels of other shards
            assert not np.asarray(a)[~np.asarray(where)].any()
            assert not np.isnan(np.asarray(a)).any()
    loss, m, log_s, label_sum = _combine(stats, prob_labels, v=v, label_smoothing=label_smoothing, z_loss=z_loss)
    g_global = np.asarray(g, np.float64)
    if not prob_labels:
        valid = (np.asarray(labels) >= 0) & (np.asarray(labels) < v)
        loss = np.where(valid, loss, np.nan)
        g_global = np.where(valid, g_global, np.nan)  # the ops layer NaNs invalid rows through g
    loss = np.where(np.asarray(where), loss, 0.0)
    residual = (m, log_s, label_sum) if prob_labels else (m, log_s)
    residual = tuple(jnp.asarray(r, jnp.float32) for r in residual)
    g_global = jnp.asarray(g_global, jnp.float32)
    num_classes = v if num_classes_for_bwd is None else num_classes_for_bwd
    dlogits = [
        _shard_bwd(x, y, where, residual, g_global, num_classes=num_classes, **opts)
        for x, y in zip(shards, local)
    ]
    return loss, np.concatenate([np.asarray(d).astype(np.float64) for d in dlogits], axis=1)


def _loss_terms(logits, labels, *, label_smoothing, z_loss):
    """float64 [N]: 1 + the magnitudes of the terms each row's loss sums, |lse sum(t)| +
    sum_j t_j |x_j| + z lse^2 (non-finite terms count 0: those entries must match exactly)."""
    x = np.asarray(logits).astype(np.float64)
    v = x.shape[1]
    fin = np.isfinite(x)
    m = np.max(np.where(fin, x, -np.inf), axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        lse = m + np.log(np.sum(np.exp(x - m[:, None]), axis=1))
    absx = np.where(fin, np.abs(x), 0.0)
    labels = np.asarray(labels)
    if labels.ndim == 2:
        t = labels.astype(np.float64)
        body = np.abs(t.sum(1) * lse) + np.sum(t * absx, axis=1)
    else:
        y = np.clip(labels, 0, v - 1)
        body = np.abs(lse) + (1 - label_smoothing) * absx[np.arange(len(y)), y] + label_smoothing * absx.mean(1)
    return 1.0 + np.where(np.isfinite(body), body, 0.0) + z_loss * np.where(np.isfinite(lse), lse, 0.0) ** 2


def _elementwise_excess(actual, expected, bound):
    """max |actual - expected| / bound over the entries where expected is finite; NaN and
    inf entries must match exactly (and a non-finite actual elsewhere is an inf excess)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    special = ~np.isfinite(e)
    if not np.array_equal(a[special], e[special], equal_nan=True) or not np.isfinite(a[~special]).all():
        return np.inf
    err = np.abs(a[~special] - e[~special])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound[~special])  # an error where the bound is 0: inf
    return float(ratio.max()) if ratio.size else 0.0


def _excesses(loss, dlogits, logits, labels, where, g, dtype, *, label_smoothing, z_loss):
    """(loss excess, dlogits excess) against the float64 oracle of the unsharded loss; the
    check passes at <= 1.

    The loss comes from f32 statistics of the logits as given (bf16 inputs are exact in
    f32), so it gets the f32 tolerance whatever the dtype: rtol times the terms it sums.
    dlogits: f32 -- rtol times |g| (|c p| + |t|), the terms of g (c p - t); bf16 -- the
    element-wise bound of conftest (one bf16 rounding of the stored value, plus 2**-16 of
    the terms). Entries that must be 0 (where False) must be exactly 0.
    """
    exact = softmax_cross_entropy_float64(
        logits, labels, g, where=where, label_smoothing=label_smoothing, z_loss=z_loss
    )
    rtol = tol(jnp.float32)["rtol"]
    loss_bound = rtol * _loss_terms(logits, labels, label_smoothing=label_smoothing, z_loss=z_loss)
    loss_excess = _elementwise_excess(loss, exact.loss, np.where(np.asarray(where), loss_bound, 0.0))
    if jnp.dtype(dtype) == jnp.bfloat16:
        d_excess = bf16_elementwise_excess(dlogits, exact.dlogits, exact.dlogits_terms)
    else:
        d_excess = _elementwise_excess(dlogits, exact.dlogits, rtol * exact.dlogits_terms)
    return loss_excess, d_excess


# (n, V, shards, block sizes, dtype, feature): V = 1000 in 4 slices of 250 (2 vocab blocks
# each, tail of 122) in every combination that differs; V = 387 in 3 slices of 129 (tail
# of 1) for the rest of the coverage at the interpreter's cost.
CASES = [
    pytest.param(37, 1000, 4, SMALL, "f32", "int", id="37x1000/4-f32-int"),
    pytest.param(37, 1000, 4, SMALL, "f32", "int_smooth_zloss", id="37x1000/4-f32-int_smooth_zloss"),
    pytest.param(37, 1000, 4, SMALL, "f32", "prob", id="37x1000/4-f32-prob"),
    pytest.param(37, 1000, 4, SMALL, "bf16", "int_smooth_zloss", id="37x1000/4-bf16-int_smooth_zloss"),
    pytest.param(37, 1000, 4, SMALL, "bf16", "prob", id="37x1000/4-bf16-prob"),
    pytest.param(37, 387, 3, SMALL, "f32", "prob", id="37x387/3-f32-prob"),
    pytest.param(37, 387, 3, SMALL, "bf16", "int_smooth_zloss", id="37x387/3-bf16-int_smooth_zloss"),
]


@pytest.mark.parametrize("n, v, num_shards, block_sizes, dtype, feature", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_matches_unsharded_float64(rng, backend, n, v, num_shards, block_sizes, dtype, feature):
    prob_labels, a, z = FEATURES[feature]
    dtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
    logits, labels, where, g = _inputs(rng, n, v, num_shards, dtype, prob_labels)
    opts = dict(label_smoothing=a, z_loss=z)
    loss, dlogits = _sharded(
        logits, labels, where, g, num_shards=num_shards, backend=backend, block_sizes=block_sizes, **opts
    )
    # The special rows, spelled out (the oracle agrees; this says what is expected).
    assert loss[ALL_NEG_INF] == 0 and not dlogits[ALL_NEG_INF].any()
    if not prob_labels:
        assert np.isnan(loss[[LABEL_LOW, LABEL_HIGH]]).all()
        assert np.isnan(dlogits[[LABEL_LOW, LABEL_HIGH]]).all()
        assert loss[LABEL_HIGH_OFF] == 0 and not dlogits[LABEL_HIGH_OFF].any()
    # The masked slice: p = 0 there, so the gradient is -g t; the loss is +inf iff the
    # target puts mass there (smoothing).
    assert (loss[MASKED_SLICE] == np.inf) == bool(a)
    loss_excess, d_excess = _excesses(loss, dlogits, logits, labels, where, g, dtype, **opts)
    assert loss_excess <= 1, f"loss: {loss_excess:.3g} x its bound"
    assert d_excess <= 1, f"dlogits: {d_excess:.3g} x its bound"


@pytest.mark.parametrize("feature", ["int_smooth_zloss", "prob"])
def test_sharded_large_vocab(rng, feature):
    # V = 32004 in 2 slices of 16002: 8 vocab blocks of 2048 per slice, tail of 1666.
    prob_labels, a, z = FEATURES[feature]
    n, v, num_shards = 7, 32004, 2
    logits, labels, where, g = _inputs(rng, n, v, num_shards, jnp.bfloat16, prob_labels)
    opts = dict(label_smoothing=a, z_loss=z)
    loss, dlogits = _sharded(
        logits, labels, where, g, num_shards=num_shards, backend="triton", block_sizes=LARGE, **opts
    )
    loss_excess, d_excess = _excesses(loss, dlogits, logits, labels, where, g, jnp.bfloat16, **opts)
    assert loss_excess <= 1, f"loss: {loss_excess:.3g} x its bound"
    assert d_excess <= 1, f"dlogits: {d_excess:.3g} x its bound"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_bounds_bite(rng, dtype):
    """The bounds above catch the likely mistakes: a / V_local instead of a / V in the
    backward (the default num_classes) or in the combined loss."""
    n, v, num_shards = 37, 1000, 4
    _, a, z = FEATURES["int_smooth_zloss"]
    logits, labels, where, g = _inputs(rng, n, v, num_shards, dtype, False)
    opts = dict(label_smoothing=a, z_loss=z)
    loss, dlogits = _sharded(
        logits, labels, where, g, num_shards=num_shards, backend="triton", block_sizes=SMALL,
        num_classes_for_bwd=v // num_shards, **opts,
    )
    loss_excess, d_excess = _excesses(loss, dlogits, logits, labels, where, g, dtype, **opts)
    assert loss_excess <= 1  # combined with the right V here
    assert d_excess > 10, f"a / V_local in the backward: only {d_excess:.3g} x the bound"
    # The combined loss with a / V_local: (a / V_local - a / V) sum(x) ~ 3e-4 * 2 sqrt(V).
    x = np.asarray(logits).astype(np.float64)
    with np.errstate(invalid="ignore"):
        planted = loss - (a / (v // num_shards) - a / v) * np.where(np.asarray(where), x.sum(1), 0.0)
    planted_excess, _ = _excesses(planted, dlogits, logits, labels, where, g, dtype, **opts)
    assert planted_excess > 10, f"a / V_local in the loss: only {planted_excess:.3g} x the bound"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_conventions(rng, backend):
    """One slice's statistics: (row_max, log_sum) bit-equal to the ordinary residual; x[y]
    bit-exact, 0 for other shards' labels (also those in [V_local, V_local + block_v),
    which the tail block's padding columns would match); sum(x) zeros without smoothing;
    sum(t) and sum(t x) with t = 0 at -inf logits; 0 where False."""
    n, v = 13, 300
    x = rng.standard_normal((n, v)) * 2.0
    x[0] = -np.inf  # the whole slice masked
    x[1, ::3] = -np.inf
    logits = jnp.asarray(x, jnp.float32)
    y = rng.integers(-v, 2 * v, n)  # most on other shards
    y[1] = 2  # a finite logit (2 % 3 != 0)
    labels = jnp.asarray(y, jnp.int32)
    where = rng.random(n) < 0.7
    where[:2] = True
    where = jnp.asarray(where)
    opts = dict(backend=backend, block_sizes=SMALL)
    _, residual = jax.jit(functools.partial(xent.softmax_cross_entropy_fwd, **opts))(logits, labels, where)
    for a in (0.0, 0.1):
        row_max, log_sum, label_logit, logit_sum = map(
            np.asarray, _shard_fwd(logits, labels, where, label_smoothing=a, z_loss=0.0, **opts)
        )
        np.testing.assert_array_equal(row_max, np.asarray(residual[0]))
        np.testing.assert_array_equal(log_sum, np.asarray(residual[1]))
        on = np.asarray(where) & (y >= 0) & (y < v)
        want = np.where(on, np.asarray(logits)[np.arange(n), np.clip(y, 0, v - 1)], 0.0)
        np.testing.assert_array_equal(label_logit, want)
        if not a:
            assert not logit_sum.any()
        else:
            want = np.where(np.asarray(where), x.sum(1), 0.0)
            assert logit_sum[0] == -np.inf and logit_sum[1] == -np.inf
            np.testing.assert_allclose(logit_sum[2:], want[2:], rtol=1e-5, atol=1e-5 * v)
    t = rng.random((n, v)) * (rng.random((n, v)) < 0.5)
    t[np.isinf(x)] = 0.0  # row 0: no mass at all
    probs = jnp.asarray(t, jnp.float32)
    _, _, label_sum, label_dot = map(
        np.asarray, _shard_fwd(logits, probs, where, label_smoothing=0.0, z_loss=0.0, **opts)
    )
    w = np.asarray(where)
    np.testing.assert_allclose(label_sum, np.where(w, t.sum(1), 0.0), rtol=1e-5)
    tx = np.where(t != 0, t * np.where(np.isinf(x), 0.0, x), 0.0).sum(1)
    np.testing.assert_allclose(label_dot, np.where(w, tx, 0.0), rtol=1e-5, atol=1e-5 * v)
    assert label_sum[0] == 0 and label_dot[0] == 0  # all -inf, no mass: 0, not NaN


def test_check_labels_false_and_num_classes(rng):
    """check_labels=False: a label outside [0, V_local) matches no column, the row stays
    finite and is g (p (1 + 2 z lse) - a / num_classes)."""
    n, v = 9, 300
    logits = randn(rng, (n, v), jnp.float32, scale=2.0)
    labels = jnp.asarray([-1, v, 5, 7, -100, 3 * v, 0, v - 1, 12], jnp.int32)
    where = jnp.ones((n,), bool)
    g = randn(rng, (n,), jnp.float32)
    a, z, num_classes = 0.1, 1e-3, 4 * v
    x = np.asarray(logits, np.float64)
    m = x.max(1, keepdims=True)
    log_s = np.log(np.exp(x - m).sum(1, keepdims=True))
    residual = (jnp.asarray(m[:, 0], jnp.float32), jnp.asarray(log_s[:, 0], jnp.float32))
    d = xent.softmax_cross_entropy_bwd(
        logits, labels, where, residual, g, label_smoothing=a, z_loss=z, num_classes=num_classes,
        check_labels=False, backend="triton", block_sizes=SMALL,
    )
    p = np.exp(x - m - log_s)
    y = np.asarray(labels)
    t = np.where(np.arange(v) == y[:, None], 1 - a, 0.0) + a / num_classes
    want = np.asarray(g, np.float64)[:, None] * (p * (1 + 2 * z * (m + log_s)) - t)
    np.testing.assert_allclose(np.asarray(d), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_option_validation():
    logits = jnp.zeros((4, 10), jnp.float32)
    labels, where = jnp.zeros((4,), jnp.int32), jnp.ones((4,), bool)
    residual, g = (jnp.zeros(4), jnp.zeros(4)), jnp.ones(4)
    bwd = functools.partial(xent.softmax_cross_entropy_bwd, logits, labels, where, residual, g)
    with pytest.raises(ValueError, match=r"num_classes=9 must be an int >= the local V=10"):
        bwd(num_classes=9)
    with pytest.raises(ValueError, match=r"num_classes=True must be an int"):
        bwd(num_classes=True)
    with pytest.raises(ValueError, match=r"num_classes=20.0 must be an int"):
        bwd(num_classes=20.0)
    with pytest.raises(ValueError, match=r"check_labels=1 must be a Python bool"):
        bwd(check_labels=1)
    with pytest.raises(ValueError, match=r"vocab_shard='yes' must be a Python bool"):
        xent.softmax_cross_entropy_fwd(logits, labels, where, vocab_shard="yes")


@pytest.mark.parametrize("prob_labels", [False, True], ids=["int", "prob"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_accelerators(platform, prob_labels):
    n, v_local = 1024, 16032  # a 128256 vocabulary over 8 devices

    def fwd_bwd(logits, labels, where, g):
        opts = dict(label_smoothing=0.0 if prob_labels else 0.1)
        row_max, log_sum, stat0, _ = xent.softmax_cross_entropy_fwd(logits, labels, where, vocab_shard=True, **opts)
        residual = (row_max, log_sum, stat0) if prob_labels else (row_max, log_sum)
        return xent.softmax_cross_entropy_bwd(
            logits, labels, where, residual, g, num_classes=8 * v_local, check_labels=False, **opts
        )

    args = (
        jax.ShapeDtypeStruct((n, v_local), jnp.bfloat16),
        jax.ShapeDtypeStruct((n, v_local) if prob_labels else (n,), jnp.bfloat16 if prob_labels else jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.bool_),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )
    text = lower_for(platform, fwd_bwd, *args)
    assert_kernels_lowered(text, platform, ("fusedvjp_xent_fwd", "fusedvjp_xent_bwd"))
