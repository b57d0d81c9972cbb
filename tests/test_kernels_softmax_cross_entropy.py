"""Softmax cross-entropy Pallas kernels (forward and backward launchers) on CPU.

Both backends run in interpret mode ("triton" through the generic Pallas interpreter,
"mosaic_tpu" through the TPU interpreter), against optax and a float64 oracle. Explicit
small tiles force several vocab blocks with ragged tails; the interpreters fill reads
past the array with NaN, so an unmasked tail shows up as NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    assert_bf16_elementwise,
    assert_close,
    assert_kernels_lowered,
    assert_no_worse_than,
    float64_oracle,
    lower_for,
    randn,
    softmax_cross_entropy_float64,
)

from fusedvjp.kernels import softmax_cross_entropy as xent
from fusedvjp.kernels.softmax_cross_entropy import CrossEntropyBlockSizes

BACKENDS = ("triton", "mosaic_tpu")
# Legal for both backends (powers of two; multiples of (8, 128)); several vocab blocks
# with a ragged tail at V = 1000, and a ragged row block at N = 37 or 1.
SMALL = CrossEntropyBlockSizes(block_n=8, block_v=256)

# name -> (probability labels?, label_smoothing, z_loss)
FEATURES = {
    "int": (False, 0.0, 0.0),
    "int_smooth": (False, 0.1, 0.0),
    "int_zloss": (False, 0.0, 1e-3),
    "int_smooth_zloss": (False, 0.1, 1e-3),
    "prob": (True, 0.0, 0.0),
}


@functools.partial(jax.jit, static_argnames=("label_smoothing", "z_loss", "backend", "block_sizes"))
def _kernel_fwd_bwd(logits, labels, where, g, *, label_smoothing, z_loss, backend, block_sizes):
    """(loss, residual, dlogits) from the two launchers."""
    opts = dict(label_smoothing=label_smoothing, z_loss=z_loss, backend=backend, block_sizes=block_sizes)
    loss, residual = xent.softmax_cross_entropy_fwd(logits, labels, where, **opts)
    return loss, residual, xent.softmax_cross_entropy_bwd(logits, labels, where, residual, g, **opts)


def _lse(residual):
    """The logsumexp the residual stands for, row_max + log_sum, in f32 as a user forms it."""
    row_max, log_sum = residual[:2]
    return np.asarray(row_max + log_sum)


def _check_residual(residual, logits, labels):
    """row_max is exactly the row's max logit (0 on an all -inf row); f32 [N] each; for
    probability labels a third entry, sum_j t_j per row."""
    prob_labels = labels.ndim == 2
    assert len(residual) == (3 if prob_labels else 2)
    residual = [np.asarray(r) for r in residual]
    n = logits.shape[0]
    assert all(r.shape == (n,) and r.dtype == np.float32 for r in residual)
    want = np.max(np.asarray(logits, np.float32), axis=-1)
    np.testing.assert_array_equal(residual[0], np.where(want == -np.inf, 0.0, want))
    if prob_labels:
        np.testing.assert_allclose(residual[2], np.asarray(labels, np.float64).sum(-1), rtol=1e-5)


@functools.partial(jax.jit, static_argnames=("label_smoothing", "z_loss"))
def _reference(logits, labels, where, g, *, label_smoothing, z_loss):
    """(loss, lse, dlogits) in plain jnp, at logits' precision (float64 under the oracle).

    Integer labels become t = (1-a) onehot + a/V; terms with t == 0 are 0 (xlogy), so -inf
    logits with zero target stay finite. Out-of-range labels give a NaN loss.
    """
    v = logits.shape[1]

    def loss_fn(x):
        lse = jax.nn.logsumexp(x, axis=-1)
        if labels.ndim == 1:
            t = (1 - label_smoothing) * jax.nn.one_hot(labels, v, dtype=x.dtype) + label_smoothing / v
        else:
            t = labels.astype(x.dtype)
        loss = lse * t.sum(-1) - jnp.sum(jnp.where(t != 0, t * x, 0.0), axis=-1) + z_loss * lse**2
        if labels.ndim == 1:
            loss = jnp.where((labels >= 0) & (labels < v), loss, jnp.nan)
        return jnp.where(where, loss, 0.0), lse

    (loss, lse), vjp = jax.vjp(loss_fn, logits)
    (dlogits,) = vjp((g.astype(logits.dtype), jnp.zeros_like(lse)))
    return loss, lse, dlogits


@functools.partial(jax.jit, static_argnames=("label_smoothing", "z_loss"))
def _optax(logits, labels, where, g, *, label_smoothing, z_loss):
    """(loss, dlogits) from optax at logits' dtype; z-loss added by hand."""

    def loss_fn(x):
        if labels.ndim == 2:
            loss = optax.softmax_cross_entropy(x, labels.astype(x.dtype))
        elif label_smoothing:
            onehot = jax.nn.one_hot(labels, x.shape[1], dtype=x.dtype)
            loss = optax.softmax_cross_entropy(x, optax.smooth_labels(onehot, label_smoothing))
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(x, labels)
        if z_loss:
            loss = loss + z_loss * jax.nn.logsumexp(x, axis=-1) ** 2
        return jnp.where(where, loss, 0.0)

    loss, vjp = jax.vjp(loss_fn, logits)
    return loss, vjp(g.astype(logits.dtype))[0]


def _inputs(rng, n, v, dtype, prob_labels):
    """Modest random logits (|x| of a few units), labels, a mixed where, a random g."""
    logits = randn(rng, (n, v), dtype, scale=2.0)
    if prob_labels:
        t = rng.random((n, v)) ** 3
        zero = t < 0.05  # exact zeros, as in sparse targets; never a whole row
        zero[np.arange(n), rng.integers(0, v, n)] = False
        t[zero] = 0.0
        labels = jnp.asarray(t / t.sum(-1, keepdims=True), jnp.float32)
    else:
        labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    where = rng.random(n) < 0.75
    where[0] = True  # size-1 batches still test a real row
    g = randn(rng, (n,), jnp.float32)
    return logits, labels, jnp.asarray(where), g


def _check_f32(rng, backend, n, v, feature, block_sizes):
    prob_labels, a, z = FEATURES[feature]
    logits, labels, where, g = _inputs(rng, n, v, jnp.float32, prob_labels)
    opts = dict(label_smoothing=a, z_loss=z)
    loss, residual, dlogits = _kernel_fwd_bwd(
        logits, labels, where, g, backend=backend, block_sizes=block_sizes, **opts
    )
    _check_residual(residual, logits, labels)
    lse = _lse(residual)
    assert loss.shape == (n,) and loss.dtype == jnp.float32
    assert dlogits.shape == (n, v) and dlogits.dtype == jnp.float32
    for out in (loss, lse, dlogits):
        assert np.isfinite(np.asarray(out)).all()  # an unwritten or unmasked block would show
    opt_loss, opt_dlogits = _optax(logits, labels, where, g, **opts)
    assert_close(loss, opt_loss, err_msg="loss vs optax")
    assert_close(dlogits, opt_dlogits, err_msg="dlogits vs optax")
    ref_loss, ref_lse, ref_dlogits = float64_oracle(_reference, logits, labels, where, g, **opts)
    assert_close(loss, ref_loss, err_msg="loss vs float64")
    assert_close(lse, ref_lse, err_msg="lse vs float64")
    assert_close(dlogits, ref_dlogits, err_msg="dlogits vs float64")
    assert not np.asarray(loss)[~np.asarray(where)].any()
    assert not np.asarray(dlogits)[~np.asarray(where)].any()


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_optax_and_float64(rng, backend, feature):
    _check_f32(rng, backend, 37, 1000, feature, SMALL)


@pytest.mark.parametrize(
    "n, v, block_sizes, feature",
    [
        (37, 10, CrossEntropyBlockSizes(block_n=8, block_v=128), "prob"),  # one block, V < block_v
        (37, 10, CrossEntropyBlockSizes(block_n=8, block_v=128), "int_smooth_zloss"),
        (1, 1000, SMALL, "int_smooth_zloss"),  # one row in a block of 8
        (37, 32003, CrossEntropyBlockSizes(block_n=8, block_v=2048), "int_smooth_zloss"),  # tail of 1283
        (37, 32003, CrossEntropyBlockSizes(block_n=8, block_v=2048), "prob"),
        (3, 1, CrossEntropyBlockSizes(block_n=8, block_v=128), "int_smooth_zloss"),  # V = 1: loss = z lse^2
    ],
    ids=["37x10-prob", "37x10-int", "1x1000-int", "37x32003-int", "37x32003-prob", "3x1-int"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes(rng, backend, n, v, block_sizes, feature):
    _check_f32(rng, backend, n, v, feature, block_sizes)


@pytest.mark.parametrize("backend", [None, "mosaic_tpu"])
def test_default_block_sizes(rng, backend):
    # backend=None on CPU interprets the Triton kernel, with every backend's default traced.
    _check_f32(rng, backend, 5, 32003, "int_smooth_zloss", None)


@pytest.mark.parametrize(
    "n, v, block_sizes",
    [(37, 1000, SMALL), (3, 32003, CrossEntropyBlockSizes(block_n=8, block_v=2048))],
    ids=["37x1000", "3x32003"],
)
@pytest.mark.parametrize("feature", ["int_smooth_zloss", "prob"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(rng, backend, feature, n, v, block_sizes):
    prob_labels, a, z = FEATURES[feature]
    logits, labels, where, g = _inputs(rng, n, v, jnp.bfloat16, prob_labels)
    opts = dict(label_smoothing=a, z_loss=z)
    loss, residual, dlogits = _kernel_fwd_bwd(
        logits, labels, where, g, backend=backend, block_sizes=block_sizes, **opts
    )
    _check_residual(residual, logits, labels)
    lse = _lse(residual)
    assert loss.dtype == jnp.float32 and dlogits.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(dlogits, np.float32)).all()
    ref_loss, ref_lse, ref_dlogits = float64_oracle(_reference, logits, labels, where, g, **opts)
    bf16_loss, bf16_dlogits = _optax(logits, labels, where, g, **opts)  # the plain bf16 computation
    assert_close(loss, ref_loss, jnp.bfloat16)
    assert_close(lse, ref_lse, jnp.bfloat16)
    # Entry by entry: at V = 32003 a tolerance scaled by the row's p_y - 1 passes a
    # gradient with every softmax term 50% too large (see conftest).
    exact = softmax_cross_entropy_float64(logits, labels, g, where=where, **opts)
    np.testing.assert_allclose(exact.dlogits, ref_dlogits, rtol=1e-9, atol=1e-12, err_msg="numpy oracle")
    assert_bf16_elementwise(dlogits, exact.dlogits, exact.dlogits_terms, err_msg="dlogits")
    # f32 math inside the kernel: at least as good as computing in bf16 (the margin is
    # half a bf16 ulp at the largest value, the one rounding of the stored gradient).
    assert_no_worse_than(loss, bf16_loss, ref_loss, margin=2**-9, err_msg="loss")
    assert_no_worse_than(dlogits, bf16_dlogits, ref_dlogits, margin=2**-9, err_msg="dlogits")


def _masked_logits(rng, n, v):
    """Logits with -inf entries: row 0 all -inf, row 1 all -inf but where=False, the
    other rows -inf on a random ~30% of the vocabulary (never the label / the target)."""
    x = rng.standard_normal((n, v)) * 2.0
    x[2:][rng.random((n - 2, v)) < 0.3] = -np.inf
    x[:2] = -np.inf
    return x


@pytest.mark.parametrize("feature", ["int", "int_smooth_zloss", "prob"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits(rng, backend, feature):
    prob_labels, a, z = FEATURES[feature]
    n, v = 13, 300
    x = _masked_logits(rng, n, v)
    finite = np.isfinite(x)
    if prob_labels:
        t = np.where(finite, rng.random((n, v)), 0.0)
        t[1] = rng.random(v)
        labels = jnp.asarray(t / np.maximum(t.sum(-1, keepdims=True), 1e-30), jnp.float32)
    else:
        y = rng.integers(0, v, n)
        for i in range(2, n):
            y[i] = rng.choice(np.flatnonzero(finite[i]))
        labels = jnp.asarray(y, jnp.int32)
    logits = jnp.asarray(x, jnp.float32)
    where = np.ones(n, bool)
    where[1] = False
    where = jnp.asarray(where)
    g = randn(rng, (n,), jnp.float32)
    opts = dict(label_smoothing=a, z_loss=z)
    loss, residual, dlogits = _kernel_fwd_bwd(logits, labels, where, g, backend=backend, block_sizes=SMALL, **opts)
    _check_residual(residual, logits, labels)
    loss, lse, dlogits = np.asarray(loss), _lse(residual), np.asarray(dlogits)
    ref_loss, ref_lse, ref_dlogits = float64_oracle(_reference, logits, labels, where, g, **opts)

    # Row 0 (all -inf): residual (0, -inf), lse -inf, loss NaN, gradient NaN. Row 1 (the
    # same, where=False): 0.
    assert np.asarray(residual[1])[0] == -np.inf
    assert lse[0] == -np.inf and np.isnan(loss[0]) and np.isnan(dlogits[0]).all()
    assert loss[1] == 0 and not dlogits[1].any()
    rows = slice(2, None)
    if a:
        # The smoothed target puts a/V on every class, -inf ones included: loss +inf.
        assert (loss[rows] == np.inf).all()
    else:
        assert np.isfinite(loss[rows]).all()
        assert_close(loss[rows], ref_loss[rows], jnp.float32)
    assert_close(lse[rows], ref_lse[rows], jnp.float32)
    # p = 0 at -inf: the gradient there is -g t (0 unless a > 0), finite everywhere.
    assert np.isfinite(dlogits[rows]).all()
    assert_close(dlogits[rows], ref_dlogits[rows], jnp.float32)
    if not a:
        assert not dlogits[rows][~finite[rows]].any()
    if prob_labels:
        # optax 0.2.8's softmax_cross_entropy gives NaN here (0 * -inf in labels * log p);
        # its safe_softmax_cross_entropy uses the same xlogy convention as the kernel.
        assert np.isnan(np.asarray(optax.softmax_cross_entropy(logits, labels))[rows]).all()
        safe = optax.safe_softmax_cross_entropy(logits, labels)
        assert_close(loss[rows], np.asarray(safe)[rows], jnp.float32)


@pytest.mark.parametrize("feature", ["int_smooth_zloss", "prob"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_magnitudes(rng, backend, feature):
    prob_labels, a, z = FEATURES[feature]
    n, v = 13, 300
    logits, labels, where, g = _inputs(rng, n, v, jnp.float32, prob_labels)
    x = np.asarray(logits, np.float64)
    x[: n // 2] += 1e4  # all near 1e4: lse - x[y] must not cancel to garbage
    x[n // 2 :] *= 3e3  # spread over about +-1e4: exp overflows without the running max
    logits = jnp.asarray(x, jnp.float32)
    opts = dict(label_smoothing=a, z_loss=z)
    loss, residual, dlogits = _kernel_fwd_bwd(logits, labels, where, g, backend=backend, block_sizes=SMALL, **opts)
    _check_residual(residual, logits, labels)
    lse = _lse(residual)
    for out in (loss, lse, dlogits):
        assert np.isfinite(np.asarray(out)).all()
    ref_loss, ref_lse, ref_dlogits = float64_oracle(_reference, logits, labels, where, g, **opts)
    # The loss is formed from x - max and log(sum), never from lse - x at |x| ~ 1e4.
    assert_close(loss, ref_loss)
    assert_close(lse, ref_lse)
    # The plain f32 tolerance: p = exp((x - row_max) - log_sum) never sees the f32
    # rounding of lse (6e-4 absolute at 1e4), which would be a relative error of every p.
    assert_close(dlogits, ref_dlogits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_and_where(rng, backend):
    n, v = 11, 300
    logits, _, _, g = _inputs(rng, n, v, jnp.float32, False)
    y = rng.integers(0, v, n)
    y[[0, 1, 2, 3]] = [-1, v, -1, v]
    where = np.ones(n, bool)
    where[[2, 3, 4]] = False  # rows 2, 3: out of range but masked; row 4: in range, masked
    labels, where = jnp.asarray(y, jnp.int32), jnp.asarray(where)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    loss, residual, dlogits = _kernel_fwd_bwd(logits, labels, where, g, backend=backend, block_sizes=SMALL, **opts)
    loss, lse, dlogits = np.asarray(loss), _lse(residual), np.asarray(dlogits)
    assert np.isnan(loss[:2]).all() and np.isnan(dlogits[:2]).all()
    assert not loss[2:5].any() and not dlogits[2:5].any()
    ref_loss, ref_lse, ref_dlogits = float64_oracle(_reference, logits, labels, where, g, **opts)
    assert np.isfinite(loss[2:]).all() and np.isfinite(dlogits[2:]).all()
    assert_close(loss[2:], ref_loss[2:], jnp.float32)
    assert_close(lse, ref_lse, jnp.float32)
    assert_close(dlogits[2:], ref_dlogits[2:], jnp.float32)


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_n=0, block_v=128), "block_n must be a positive int, got 0"),
        (dict(block_n=8, block_v=-128), "block_v must be a positive int, got -128"),
        (dict(block_n=8.0, block_v=128), "block_n must be a positive int, got 8.0"),
        (dict(block_n=True, block_v=128), "block_n must be a positive int, got True"),
        (dict(block_n=8, block_v=128, num_warps=3), "num_warps must be a power of two, got 3"),
        (dict(block_n=8, block_v=128, num_stages=0), "num_stages must be a positive int, got 0"),
    ],
)
def test_block_sizes_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossEntropyBlockSizes(**kwargs)


@pytest.mark.parametrize(
    "block_sizes, backend, match",
    [
        (CrossEntropyBlockSizes(8, 96), "triton", "block_v=96 must be a power of two"),
        (CrossEntropyBlockSizes(12, 128), "triton", "block_n=12 must be a power of two"),
        (CrossEntropyBlockSizes(4, 128), "mosaic_tpu", r"block_n=4 must be a multiple of 8 or equal N=37"),
        (CrossEntropyBlockSizes(8, 64), "mosaic_tpu", r"block_v=64 must be a multiple of 128 or equal V=1000"),
        # backend=None traces every backend: a Triton-only tile is refused.
        (CrossEntropyBlockSizes(4, 128), None, r"mosaic_tpu: block_n=4"),
    ],
)
def test_block_sizes_checked_per_backend(block_sizes, backend, match):
    logits = jnp.zeros((37, 1000), jnp.float32)
    labels, where = jnp.zeros((37,), jnp.int32), jnp.ones((37,), bool)
    with pytest.raises(ValueError, match=match):
        xent.softmax_cross_entropy_fwd(logits, labels, where, backend=backend, block_sizes=block_sizes)
    with pytest.raises(ValueError, match=match):
        xent.softmax_cross_entropy_bwd(
            logits, labels, where, (jnp.zeros(37), jnp.zeros(37)), jnp.ones(37), backend=backend,
            block_sizes=block_sizes,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_block_sizes_are_legal(backend):
    for n in (1, 8, 37, 1000, 8192):
        for v in (1, 10, 1000, 32003, 50257, 128256, 262144):
            for dtype in (jnp.float32, jnp.bfloat16):
                CrossEntropyBlockSizes.default(n, v, dtype, backend).check(n, v, backend)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        CrossEntropyBlockSizes.default(8, 10, jnp.float32, "cuda")


def test_argument_validation():
    logits = jnp.zeros((4, 10), jnp.float32)
    labels, where = jnp.zeros((4,), jnp.int32), jnp.ones((4,), bool)
    probs = jnp.full((4, 10), 0.1, jnp.float32)
    fwd = xent.softmax_cross_entropy_fwd
    with pytest.raises(ValueError, match="must be 0 with probability labels"):
        fwd(logits, probs, where, label_smoothing=0.1)
    with pytest.raises(ValueError, match="must be 0 with probability labels"):
        fwd(logits, probs, where, z_loss=1e-4)
    with pytest.raises(ValueError, match=r"labels must be integer \[N\]"):
        fwd(logits, labels[:3], where)
    with pytest.raises(ValueError, match=r"where must be \[N\]"):
        fwd(logits, labels, where[:3])
    with pytest.raises(ValueError, match=r"logits must be \[N, V\]"):
        fwd(logits[0], labels, where)
    with pytest.raises(NotImplementedError, match="float16"):
        fwd(logits.astype(jnp.float16), labels, where)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        fwd(logits, labels, where, backend="cuda")
    bwd = xent.softmax_cross_entropy_bwd
    residual = (jnp.zeros(4), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"g must be \[N\]"):
        bwd(logits, labels, where, residual, jnp.ones(3))
    with pytest.raises(ValueError, match=r"residual must be the forward's \(row_max, log_sum\)"):
        bwd(logits, labels, where, jnp.zeros(4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"log_sum must be \[N\]"):
        bwd(logits, labels, where, (jnp.zeros(4), jnp.zeros(3)), jnp.ones(4))
    probs = jnp.full(logits.shape, 1.0 / logits.shape[1], jnp.float32)
    with pytest.raises(ValueError, match=r"residual must be the forward's \(row_max, log_sum, label_sum\)"):
        bwd(logits, probs, where, residual, jnp.ones(4))


# --- lowering for accelerators (on this CPU machine) ------------------------------------


@pytest.mark.parametrize(
    "n, v, dtype",
    [(128, 10, jnp.float32), (1000, 32003, jnp.float32), (8192, 128256, jnp.bfloat16), (4, 262144, jnp.float32)],
    ids=["128x10-f32", "1000x32003-f32", "8192x128256-bf16", "4x262144-f32"],
)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_accelerators(platform, n, v, dtype):
    def fwd_bwd(logits, labels, where, g):
        opts = dict(label_smoothing=0.1, z_loss=1e-4)
        loss, residual = xent.softmax_cross_entropy_fwd(logits, labels, where, **opts)
        dlogits = xent.softmax_cross_entropy_bwd(logits, labels, where, residual, g, **opts)
        return loss, dlogits

    args = (
        jax.ShapeDtypeStruct((n, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.bool_),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )
    text = lower_for(platform, fwd_bwd, *args)
    assert_kernels_lowered(text, platform, ("fusedvjp_xent_fwd", "fusedvjp_xent_bwd"))
