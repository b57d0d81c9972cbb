"""Integer labels of every dtype, concrete labels past int32, and a class mask with label
smoothing: issue 19, items 1-3, on every impl and in the kernels themselves.

Each test failed on the code before the fix: a uint8 label 44 at V = 300 gave class 255's
loss (jnp, pallas) or NaN (xla); int8 / int16 labels gave NaN for valid classes; a numpy
int64 label ``2**32 + 1`` gave class 1's loss; an int64 label ``>= 2**32`` under x64
reached the kernels as a valid class; a per-class ``where`` with ``label_smoothing`` gave
``+inf`` on every row. The oracles are float64 numpy. The file runs once more under
``JAX_ENABLE_X64=1`` (``tests/test_x64_suite.py``), where int64 / uint64 labels join in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, randn, softmax_cross_entropy_float64

from fusedvjp import ops
from fusedvjp.kernels import linear_softmax_cross_entropy as lce_kernels
from fusedvjp.kernels import softmax_cross_entropy as xent_kernels

IMPLS = ("xla", "jnp", "pallas")

# label dtype -> (V, labels): V past the dtype's largest value where the dtype has one
# below 2**31 (the comparison with V must not wrap), the dtype's extremes among the labels,
# and out-of-range labels (NaN rows) where the dtype can hold them.
LABEL_CASES = {
    "uint8": (300, [44, 255, 0, 7]),  # 300 is 44 in uint8; -1 would be 255, a class here
    "int8": (200, [127, -1, 0, -128]),
    "int16": (40000, [32767, -1, 5, 1000]),
    "uint16": (70000, [65535, 0, 40000, 3]),
    "uint32": (300, [2**31, 2**32 - 1, 299, 300]),  # 2**31 is negative in int32
    "int32": (300, [-1, 300, 0, 150]),
}
# Only under x64 can a jax array hold these (without it they are narrowed at conversion).
X64_LABEL_CASES = {
    "int64": (300, [2**32 + 1, -(2**32) + 3, 5, 2**40]),  # int32 would wrap the first two to 1, 3
    "uint64": (300, [2**63 + 1, 2**32 + 1, 3, 299]),
}


def _label_cases():
    cases = dict(LABEL_CASES)
    if jax.config.jax_enable_x64:
        cases.update(X64_LABEL_CASES)
    return cases


def _xent(impl, labels, **options):
    return functools.partial(ops.softmax_cross_entropy_with_integer_labels, labels=labels, impl=impl, **options)


def _loss_and_vjp(fn, logits, g):
    loss, vjp = jax.vjp(fn, logits)
    return np.asarray(loss), np.asarray(vjp(jnp.asarray(g, loss.dtype))[0])


def _assert_rows(loss, dlogits, want, err_msg=""):
    """Loss and gradient against the float64 oracle, NaN rows exactly where it has them."""
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(want.loss), err_msg=err_msg)
    assert_close(loss, want.loss, jnp.float32, err_msg=err_msg)
    assert_close(dlogits, want.dlogits, jnp.float32, err_msg=err_msg)


# --- 1. narrow (and wide) integer label dtypes ---------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [*LABEL_CASES, *X64_LABEL_CASES])
def test_every_integer_label_dtype_matches_float64(dtype, impl, rng):
    if dtype not in _label_cases():
        pytest.skip("a jax array holds 64-bit labels only under x64 (the x64 run covers it)")
    v, values = _label_cases()[dtype]
    labels = jnp.asarray(np.array(values, dtype))
    assert labels.dtype == np.dtype(dtype)
    logits = randn(rng, (len(values), v), jnp.float32, 2.0)
    g = rng.standard_normal(len(values))
    want = softmax_cross_entropy_float64(logits, np.array(values, object).astype(float), g)
    loss, dlogits = _loss_and_vjp(_xent(impl, labels), logits, g)
    _assert_rows(loss, dlogits, want, err_msg=f"{dtype} labels {values}, V={v}, impl={impl}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint32", "int64"])
def test_linear_op_takes_every_integer_label_dtype(dtype, impl, rng):
    if dtype not in _label_cases():
        pytest.skip("a jax array holds 64-bit labels only under x64 (the x64 run covers it)")
    v, values = _label_cases()[dtype]
    labels = jnp.asarray(np.array(values, dtype))
    x = randn(rng, (len(values), 16), jnp.float32)
    w = randn(rng, (16, v), jnp.float32, 0.5)
    g = rng.standard_normal(len(values))
    logits64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    want = softmax_cross_entropy_float64(logits64, np.array(values, object).astype(float), g)
    fn = functools.partial(ops.linear_softmax_cross_entropy_with_integer_labels, labels=labels, impl=impl)
    loss, vjp = jax.vjp(lambda x, w: fn(x, w), x, w)
    dx, dw = vjp(jnp.asarray(g, jnp.float32))
    err = f"{dtype} labels {values}, V={v}, impl={impl}"
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(want.loss), err_msg=err)
    assert_close(loss, want.loss, jnp.float32, err_msg=err)
    assert_close(dx, want.dlogits @ np.asarray(w, np.float64).T, jnp.float32, err_msg=err)
    if not np.isnan(want.loss).any():  # a NaN row makes all of dW NaN (x^T dl)
        assert_close(dw, np.asarray(x, np.float64).T @ want.dlogits, jnp.float32, err_msg=err)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_kernels_check_64_bit_labels_before_narrowing(backend, rng):
    """The kernels' own entry points, under x64: an int64 label 2**32 + 3 must not reach
    them as class 3 (unsharded: a NaN row; vocab_shard: a label of another slice)."""
    with jax.enable_x64(True):
        n, v = 4, 300
        logits = randn(rng, (n, v), jnp.float32)
        labels = jnp.asarray([2**32 + 3, 3, -(2**32) + 7, 299], jnp.int64)
        where = jnp.ones((n,), bool)
        x = np.asarray(logits, np.float64)
        loss, residual = xent_kernels.softmax_cross_entropy_fwd(logits, labels, where, backend=backend)
        loss = np.asarray(loss)
        assert np.isnan(loss[[0, 2]]).all() and np.isfinite(loss[[1, 3]]).all(), loss
        d = np.asarray(xent_kernels.softmax_cross_entropy_bwd(logits, labels, where, residual, jnp.ones((n,)),
                                                              backend=backend))
        assert np.isnan(d[[0, 2]]).all() and np.isfinite(d[[1, 3]]).all()
        _, _, label_logit, _ = xent_kernels.softmax_cross_entropy_fwd(logits, labels, where, vocab_shard=True,
                                                                      backend=backend)
        np.testing.assert_array_equal(label_logit, [0.0, x[1, 3], 0.0, x[3, 299]])
        # The linear op's per-chunk statistics kernel.
        xs = randn(rng, (n, 16), jnp.float32)
        w = randn(rng, (16, v), jnp.float32)
        _, _, label_logit, _ = lce_kernels.row_stats(xs, w, None, labels, logit_soft_cap=None,
                                                         with_logit_sum=False, backend=backend)
        z = np.asarray(xs, np.float64) @ np.asarray(w, np.float64)
        np.testing.assert_allclose(label_logit, [0.0, z[1, 3], 0.0, z[3, 299]], rtol=1e-5, atol=1e-5)


# --- 2. numpy / Python labels past int32 without x64 ---------------------------------------

# 2**32 + 1 and -(2**32) + 3 wrap to 1 and 3 in a 32-bit conversion, 2**31 to -2**31.
BIG_LABELS = [0, 2**32 + 1, -(2**32) + 3, 2**31, 6]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["numpy_int64", "numpy_uint64", "python_list"])
def test_concrete_labels_past_int32_are_out_of_range_not_wrapped(kind, impl, rng):
    values = [abs(a) for a in BIG_LABELS] if kind == "numpy_uint64" else BIG_LABELS
    labels = {"numpy_int64": lambda: np.array(values, np.int64), "numpy_uint64": lambda: np.array(values, np.uint64),
              "python_list": lambda: list(values)}[kind]()
    v = 7
    logits = randn(rng, (len(values), v), jnp.float32)
    g = rng.standard_normal(len(values))
    want = softmax_cross_entropy_float64(logits, np.array(values, float), g)
    assert np.isnan(want.loss[1:4]).all() and np.isfinite(want.loss[[0, 4]]).all()
    loss, dlogits = _loss_and_vjp(_xent(impl, labels), logits, g)
    _assert_rows(loss, dlogits, want, err_msg=f"{kind} {values}, impl={impl}")
    # The linear op, with the identity as w: its logits are x.
    lin = ops.linear_softmax_cross_entropy_with_integer_labels(logits, jnp.eye(v), labels, impl=impl)
    np.testing.assert_array_equal(np.isnan(lin), np.isnan(want.loss))
    assert_close(lin, want.loss, jnp.float32)


def test_a_python_int_label_past_int32_is_out_of_range(rng):
    logits = randn(rng, (5,), jnp.float32)
    for impl in IMPLS:
        assert np.isnan(ops.softmax_cross_entropy_with_integer_labels(logits, 2**32 + 1, impl=impl))
        assert np.isfinite(ops.softmax_cross_entropy_with_integer_labels(logits, 1, impl=impl))


# --- 3. a per-class where with label smoothing ---------------------------------------------


def _class_mask_smoothing_float64(logits, labels, mask, g, *, label_smoothing, z_loss):
    """(loss, dlogits) of ``-(1-a) log p_y - (a/K) sum_{j unmasked} log p_j + s lse^2`` in
    float64: masked classes leave the softmax; K = 0 rows give 0 and 0."""
    x = np.asarray(logits).astype(np.float64)
    mask, labels, g = np.asarray(mask, bool), np.asarray(labels), np.asarray(g, np.float64)
    a, n, v = label_smoothing, *x.shape
    k = mask.sum(-1)
    xm = np.where(mask, x, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.max(np.where(np.isfinite(xm), xm, -np.inf), -1, keepdims=True, initial=-np.inf)
        m = np.where(np.isfinite(m), m, 0.0)
        lse = m + np.log(np.sum(np.exp(xm - m), -1, keepdims=True))
        logp = xm - lse
        t = np.where(mask, a / np.maximum(k, 1)[:, None], 0.0) + (1 - a) * (np.arange(v) == labels[:, None])
        loss = -np.sum(np.where(t == 0, 0.0, t * logp), -1) + z_loss * lse[:, 0] ** 2
        d = g[:, None] * (np.exp(logp) * (1 + 2 * z_loss * lse) - t)
    counted = k > 0
    return np.where(counted, loss, 0.0), np.where(counted[:, None] & mask, d, 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("label_smoothing", "z_loss"), [(0.1, 0.0), (0.3, 1e-3)])
def test_class_mask_spreads_smoothing_over_the_unmasked_classes(label_smoothing, z_loss, dtype, impl, rng):
    n, v = 9, 37
    logits = randn(rng, (n, v), dtype, 2.0)
    mask = rng.random((n, v)) < 0.6
    labels = rng.integers(0, v, n)
    mask[np.arange(n), labels] = True
    mask[2] = False  # no class left: counts as where=False (loss 0, gradient 0), even holding NaN
    logits = logits.at[2, 5].set(jnp.nan)
    mask[3, labels[3]] = False  # a label on a masked class: +inf
    mask[4, (labels[4] + 1) % v] = True
    logits = logits.at[4, (labels[4] + 1) % v].set(-jnp.inf)  # smoothing mass on an unmasked -inf: +inf
    mask[5] = False
    mask[5, labels[5]] = True  # K = 1: the plain loss of a one-class softmax, 0
    logits = logits.at[6].set(logits[6] * 3000)  # |x| ~ 1e4: differences of logits, no cancellation
    g = rng.standard_normal(n)
    want_loss, want_grad = _class_mask_smoothing_float64(logits, labels, mask, g, label_smoothing=label_smoothing,
                                                         z_loss=z_loss)
    assert np.isposinf(want_loss[[3, 4]]).all() and want_loss[2] == 0 and np.isfinite(want_grad).all()
    fn = _xent(impl, jnp.asarray(labels, jnp.int32), where=jnp.asarray(mask), label_smoothing=label_smoothing,
               z_loss=z_loss)
    loss, dlogits = _loss_and_vjp(fn, logits, g)
    assert loss.dtype == dtype
    err = f"impl={impl}, a={label_smoothing}, s={z_loss}"
    np.testing.assert_array_equal(np.isposinf(loss), np.isposinf(want_loss), err_msg=err)
    finite = np.isfinite(want_loss)
    # Row 6 is ~1e4 times larger: compared on its own scale.
    rows = finite & (np.arange(n) != 6)
    assert_close(loss[rows], want_loss[rows], dtype, err_msg=err)
    assert_close(loss[6], want_loss[6], dtype, err_msg=err)
    assert_close(dlogits, want_grad, dtype, err_msg=err)


@pytest.mark.parametrize("impl", IMPLS)
def test_class_mask_smoothing_along_other_axes_and_broadcast(impl, rng):
    """A class mask that broadcasts ([1, V, 1] against [B, V, T]), classes on axis 1."""
    b, v, t = 3, 11, 4
    logits = randn(rng, (b, v, t), jnp.float32)
    mask = rng.random((1, v, 1)) < 0.5
    mask[0, :2, 0] = True
    labels = rng.integers(0, 2, (b, t))
    g = rng.standard_normal((b, t))
    fn = _xent(impl, jnp.asarray(labels), axis=1, where=jnp.asarray(mask), label_smoothing=0.2)
    loss, dlogits = _loss_and_vjp(fn, logits, g)
    rows = lambda a: np.moveaxis(np.asarray(a), 1, -1).reshape(b * t, v)  # noqa: E731
    want_loss, want_grad = _class_mask_smoothing_float64(
        rows(logits), labels.reshape(-1), rows(np.broadcast_to(mask, (b, v, t))), g.reshape(-1),
        label_smoothing=0.2, z_loss=0.0)
    assert_close(loss.reshape(-1), want_loss, jnp.float32)
    assert_close(rows(dlogits), want_grad, jnp.float32)
