"""Cross-entropy ops against optax and float64 over the feature grid, plus edge semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (
    DTYPES,
    assert_bf16_elementwise,
    assert_close,
    bf16_elementwise_excess,
    float64_oracle,
    randn,
    softmax_cross_entropy_float64,
)
from fusedvjp import ops

IMPLS = ("xla", "jnp", "pallas")


def optax_int_loss(logits, labels, where, label_smoothing, z_loss):
    """The oracle: optax's cross-entropy on smoothed one-hot targets, plus the z-loss."""
    v = logits.shape[-1]
    x = logits.astype(jnp.float64 if logits.dtype == jnp.float64 else jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, v, dtype=x.dtype), label_smoothing)
    loss = optax.softmax_cross_entropy(x, targets) + z_loss * jax.nn.logsumexp(x, axis=-1) ** 2
    return jnp.where(where, loss, 0.0)


def _check_grad(got, want, terms, dtype, name):
    """f32: the tolerance table. bf16: entry by entry (conftest.assert_bf16_elementwise) --
    a tolerance scaled by the row's -1 entry cannot see the V - 1 entries of size ~1/V."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        assert_bf16_elementwise(got, want, terms, err_msg=name)
    else:
        assert_close(got, want, dtype, err_msg=name)


@pytest.mark.sample("v", "dname")  # every V and dtype per impl and option set
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("v", [10, 1000, 32003])
@pytest.mark.parametrize("label_smoothing,z_loss,masked", [(0.0, 0.0, False), (0.1, 1e-3, True)])
def test_integer_labels_match_optax(impl, dname, v, label_smoothing, z_loss, masked, rng):
    n = 3 if v == 32003 else 37
    dtype = DTYPES[dname]
    logits = randn(rng, (n, v), dtype, 2.0)
    labels = jnp.asarray(rng.integers(0, v, (n,)), jnp.int32)
    where = jnp.asarray(rng.random(n) < 0.7) if masked else jnp.ones((n,), bool)
    # The loss is in dtype, so its cotangent is rounded to dtype: draw one dtype holds exactly.
    g = randn(rng, (n,), dtype).astype(jnp.float32)

    def op(x):
        return ops.softmax_cross_entropy_with_integer_labels(
            x, labels, where=where if masked else None, label_smoothing=label_smoothing, z_loss=z_loss, impl=impl
        ).astype(jnp.float32)

    loss, vjp = jax.vjp(op, logits)
    (dlogits,) = vjp(g)

    def oracle(x, g):
        out, f = jax.vjp(lambda x: optax_int_loss(x, labels, where, label_smoothing, z_loss), x)
        return out, f(g)[0]

    want_loss, want_grad = float64_oracle(oracle, logits, g)
    exact = softmax_cross_entropy_float64(logits, labels, g, where=where, label_smoothing=label_smoothing,
                                          z_loss=z_loss)
    # The numpy oracle (used for the element-wise bf16 check) is optax's VJP in float64.
    np.testing.assert_allclose(exact.dlogits, want_grad, rtol=1e-9, atol=1e-12)
    assert_close(loss, want_loss, dtype)
    _check_grad(dlogits, exact.dlogits, exact.dlogits_terms, dtype, "dlogits")
    assert dlogits.dtype == dtype
    assert np.all(np.asarray(dlogits, np.float32)[~np.asarray(where)] == 0)


@pytest.mark.sample("v", "dname")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("v", [10, 1000])
def test_probability_labels_match_optax(impl, dname, v, rng):
    n, dtype = 37, DTYPES[dname]
    logits = randn(rng, (n, v), dtype, 2.0)
    t = rng.random((n, v)) ** 4
    labels = jnp.asarray(t / t.sum(-1, keepdims=True), dtype)
    where = jnp.asarray(rng.random(n) < 0.7)
    # The loss is in dtype, so its cotangent is rounded to dtype: draw one dtype holds exactly.
    g = randn(rng, (n,), dtype).astype(jnp.float32)

    def op(x, t):
        return ops.softmax_cross_entropy(x, t, where=where, impl=impl).astype(jnp.float32)

    loss, vjp = jax.vjp(op, logits, labels)
    grads = vjp(g)

    def oracle(x, t, g):
        out, f = jax.vjp(lambda x, t: jnp.where(where, optax.softmax_cross_entropy(x, t), 0.0), x, t)
        return out, f(g)

    want_loss, want_grads = float64_oracle(oracle, logits, labels, g)
    exact = softmax_cross_entropy_float64(logits, labels, g, where=where)
    assert_close(loss, want_loss, dtype)
    for name, got, want, exact_want, terms in zip(("dlogits", "dlabels"), grads, want_grads,
                                                  (exact.dlogits, exact.dlabels),
                                                  (exact.dlogits_terms, exact.dlabels_terms)):
        np.testing.assert_allclose(exact_want, want, rtol=1e-9, atol=1e-12, err_msg=f"numpy oracle: {name}")
        _check_grad(got, exact_want, terms, dtype, name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["integer_labels", "probability_labels"])
def test_bf16_check_catches_softmax_terms_50_percent_too_large(op, impl, rng):
    """The element-wise bf16 check bites where the old one could not: at V = 32003 a
    gradient g (1.5 c p - t) -- every softmax term 50% too large -- fails it, built on each
    impl's own bf16 gradient (which passes). With integer labels the old check
    (`assert_close`, atol 1.6e-2 * max|want|, ~1.6e-2 |g| since one entry per row is
    p_y - 1) let it through: the planted error 0.5 |g| p is ~2e-6 |g| for a typical
    p ~ 1/(V e^2)."""
    n, v = 2, 32003  # interpret-mode pallas at V = 32003: keep N small
    logits = randn(rng, (n, v), jnp.bfloat16, 2.0)
    g = randn(rng, (n,), jnp.bfloat16)
    if op == "integer_labels":
        labels = jnp.asarray(rng.integers(0, v, (n,)), jnp.int32)
        fn = ops.softmax_cross_entropy_with_integer_labels
    else:
        t = rng.random((n, v)) ** 4
        labels = jnp.asarray(t / t.sum(-1, keepdims=True), jnp.bfloat16)
        fn = ops.softmax_cross_entropy
    _, vjp = jax.vjp(lambda x: fn(x, labels, impl=impl), logits)
    (dlogits,) = vjp(g)
    exact = softmax_cross_entropy_float64(logits, labels, g)
    honest = bf16_elementwise_excess(dlogits, exact.dlogits, exact.dlogits_terms)
    assert honest <= 1.0, f"{impl}: the real gradient is {honest:.3g} x the bound"
    # The bug: every softmax term g c p 50% too large, on top of the impl's own result.
    planted = jnp.asarray(np.asarray(dlogits, np.float64) + 0.5 * exact.dlogits_softmax_part, jnp.bfloat16)
    excess = bf16_elementwise_excess(planted, exact.dlogits, exact.dlogits_terms)
    # Where t = 0 the error 0.5 |g c p| is 0.5 / (1.25 * 2**-8) = 102 x the bound.
    assert excess > 50, f"{impl}: planted error only {excess:.3g} x the bound"
    with pytest.raises(AssertionError, match="bf16 element-wise error"):
        assert_bf16_elementwise(planted, exact.dlogits, exact.dlogits_terms, err_msg="planted")


@pytest.mark.parametrize("impl", IMPLS)
def test_neg_inf_logits_are_masked_vocabulary(impl, rng):
    n, v = 9, 300
    logits = randn(rng, (n, v), jnp.float32, 2.0)
    masked = jnp.asarray(rng.random((n, v)) < 0.3)
    labels = jnp.asarray(rng.integers(0, v, (n,)), jnp.int32)
    masked = masked.at[jnp.arange(n), labels].set(False)
    logits = jnp.where(masked, -jnp.inf, logits)
    f = lambda x: ops.softmax_cross_entropy_with_integer_labels(x, labels, impl=impl)  # noqa: E731
    loss, vjp = jax.vjp(f, logits)
    (grad,) = vjp(jnp.ones((n,), jnp.float32))
    assert np.isfinite(loss).all()
    assert np.all(np.asarray(grad)[np.asarray(masked)] == 0)
    # Same as dropping the masked entries: the finite logits' loss is unchanged.
    want = [optax.softmax_cross_entropy_with_integer_labels(
        logits[i][~masked[i]], jnp.sum(~masked[i][: labels[i]])) for i in range(n)]
    assert_close(loss, jnp.stack(want), jnp.float32)
    t = jax.nn.one_hot(labels, v)
    lp = ops.softmax_cross_entropy(logits, t, impl=impl)
    assert_close(lp, loss, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_magnitudes_stay_exact(impl, rng):
    n, v = 6, 257
    logits = randn(rng, (n, v), jnp.float32, 1e4)
    labels = jnp.asarray(rng.integers(0, v, (n,)), jnp.int32)
    loss, grad = jax.value_and_grad(
        lambda x: ops.softmax_cross_entropy_with_integer_labels(x, labels, impl=impl).sum())(logits)
    want_loss, want_grad = float64_oracle(
        jax.value_and_grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels).sum()), logits)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert_close(loss, want_loss, jnp.float32)
    assert_close(grad, want_grad, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_near_1e4_keep_exact_gradients(impl, rng):
    # Every logit of a row near 1e4: unlike N(0, 1e4) logits (lse == max there), lse is
    # not a logit, and an f32 lse residual (rounded by up to 6e-4) would be a relative
    # error of 6e-4 in every p = exp(x - lse). The plain f32 tolerance catches that.
    n, v = 7, 300
    logits = jnp.asarray(1e4 + 3.0 * rng.standard_normal((n, v)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, (n,)), jnp.int32)
    t = rng.random((n, v)) ** 3
    probs = jnp.asarray(t / t.sum(-1, keepdims=True), jnp.float32)
    g = randn(rng, (n,), jnp.float32)

    def int_op(x):
        return ops.softmax_cross_entropy_with_integer_labels(x, labels, impl=impl)

    def prob_op(x, t):
        return ops.softmax_cross_entropy(x, t, impl=impl)

    def oracle(x, t, g):
        int_loss, int_vjp = jax.vjp(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels), x)
        prob_loss, prob_vjp = jax.vjp(optax.softmax_cross_entropy, x, t)
        return int_loss, int_vjp(g)[0], prob_loss, prob_vjp(g)

    want_int_loss, want_int_grad, want_prob_loss, want_prob_grads = float64_oracle(oracle, logits, probs, g)
    int_loss, int_vjp = jax.vjp(int_op, logits)
    prob_loss, prob_vjp = jax.vjp(prob_op, logits, probs)
    # Every path writes the loss around the row max (log_s + (m - x_y)), so it is exact
    # here too, where optax's own f32 lse - x_y cancels to ~2**-24 |lse|.
    assert_close(int_loss, want_int_loss, jnp.float32, err_msg="integer labels: loss")
    assert_close(int_vjp(g)[0], want_int_grad, jnp.float32, err_msg="integer labels: dlogits")
    assert_close(prob_loss, want_prob_loss, jnp.float32, err_msg="probability labels: loss")
    for got, want, name in zip(prob_vjp(g), want_prob_grads, ("dlogits", "dlabels")):
        assert_close(got, want, jnp.float32, err_msg=f"probability labels: {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_labels_give_nan_rows(impl, rng):
    n, v = 5, 40
    logits = randn(rng, (n, v), jnp.float32)
    labels = jnp.asarray([0, -1, v, 7, -1], jnp.int32)
    where = jnp.asarray([True, True, True, True, False])
    f = lambda x: ops.softmax_cross_entropy_with_integer_labels(x, labels, where=where, impl=impl)  # noqa: E731
    loss, vjp = jax.vjp(f, logits)
    (grad,) = vjp(jnp.ones((n,), jnp.float32))
    loss, grad = np.asarray(loss), np.asarray(grad)
    assert np.isfinite(loss[[0, 3]]).all() and np.isnan(loss[[1, 2]]).all()
    assert loss[4] == 0 and np.all(grad[4] == 0), "a where=False row with a padding label must be 0"
    assert np.isnan(grad[1]).all() and np.isnan(grad[2]).all()
    assert np.isfinite(grad[[0, 3]]).all()


@pytest.mark.parametrize(
    "fn,args,kwargs,exc,match",
    [
        ("int", ((4, 10), (4,)), {}, TypeError, r"labels must be an integer array"),
        ("int", ((4, 10), (5,)), {"int_labels": True}, ValueError, r"labels must have shape \(4,\)"),
        ("int", ((4, 10), (4,)), {"int_labels": True, "label_smoothing": 1.0}, ValueError, r"label_smoothing must be in \[0.0, 1.0\)"),
        ("int", ((4, 10), (4,)), {"int_labels": True, "z_loss": -1.0}, ValueError, r"z_loss must be in"),
        ("int", ((4, 10), (4,)), {"int_labels": True, "where": (3,)}, ValueError,
         r"where must have \(or broadcast to\) the batch shape \(4,\)"),
        ("prob", ((4, 10), (4, 10)), {"where": (4, 9)}, ValueError, r"\(a class mask\), got \(4, 9\)"),
        ("prob", ((4, 10), (4, 10)), {"axis": 2}, ValueError, r"axis 2 is out of range for logits of shape \(4, 10\)"),
        ("prob", ((4, 10), (4, 10)), {"axis": (1, -1)}, ValueError, r"axis \(1, -1\) repeats an axis"),
        ("int", ((4, 10), (4,)), {"int_labels": True, "axis": 1.0}, TypeError, r"axis must be an int or a non-empty tuple"),
        ("int", ((4, 10), (4,)), {"int_labels": True, "impl": "triton"}, ValueError, r"unknown impl"),
        ("prob", ((4, 10), (4, 9)), {}, ValueError, r"labels must have the shape of logits \(4, 10\)"),
    ],
)
def test_bad_input_errors(fn, args, kwargs, exc, match):
    kwargs = dict(kwargs)
    logits = jnp.ones(args[0], jnp.float32)
    labels = jnp.zeros(args[1], jnp.int32 if kwargs.pop("int_labels", False) else jnp.float32)
    if "where" in kwargs:
        kwargs["where"] = jnp.ones(kwargs["where"], bool)
    f = ops.softmax_cross_entropy_with_integer_labels if fn == "int" else ops.softmax_cross_entropy
    with pytest.raises(exc, match=match):
        f(logits, labels, **kwargs)


def test_integer_logits_are_rejected():
    with pytest.raises(TypeError, match=r"logits must be a floating-point array, got dtype int32"):
        ops.softmax_cross_entropy_with_integer_labels(jnp.ones((2, 3), jnp.int32), jnp.zeros((2,), jnp.int32))
