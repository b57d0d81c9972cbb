"""The loss options LLM trainers use (issue 25, item 4): ``ignore_index`` and per-row
``weight`` on both integer-label cross-entropy ops, and the linear op's sum / mean in
float32 from bf16. Every impl against float64 numpy; ``ignore_index`` also against
optax (a ``where`` of the labels that are not ignored).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, randn, softmax_cross_entropy_float64

from fusedvjp import ops

IMPLS = ("xla", "jnp", "pallas")
LCE = ops.linear_softmax_cross_entropy_with_integer_labels


def _labels_with_ignored(rng, n, v, ignore_index):
    labels = rng.integers(0, v, n)
    labels[rng.random(n) < 0.4] = ignore_index
    labels[0], labels[-1] = ignore_index, 1  # at least one of each
    return labels


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index_rows_count_as_where_false(impl, rng):
    n, v = 11, 37
    logits = randn(rng, (n, v), jnp.float32, 2.0)
    labels = _labels_with_ignored(rng, n, v, -100)
    g = rng.standard_normal(n)
    keep = labels != -100
    want = softmax_cross_entropy_float64(logits, labels, g, where=keep, label_smoothing=0.1)
    fn = functools.partial(ops.softmax_cross_entropy_with_integer_labels, labels=jnp.asarray(labels),
                           ignore_index=-100, label_smoothing=0.1, impl=impl)
    loss, vjp = jax.vjp(fn, logits)
    (dlogits,) = vjp(jnp.asarray(g, jnp.float32))
    assert np.isfinite(loss).all()  # -100 is out of range: without ignore_index a NaN row
    np.testing.assert_array_equal(np.asarray(loss)[~keep], 0.0)
    np.testing.assert_array_equal(np.asarray(dlogits)[~keep], 0.0)
    assert_close(loss, want.loss, jnp.float32)
    assert_close(dlogits, want.dlogits, jnp.float32)
    # Together with a class mask: the ignored rows leave it too.
    mask = jnp.asarray(rng.random((n, v)) < 0.7).at[np.arange(n), np.maximum(labels, 0)].set(True)
    masked = fn(logits, where=mask)
    np.testing.assert_array_equal(np.asarray(masked)[~keep], 0.0)
    assert np.isfinite(masked).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ignore_index_matches_optax_with_a_row_where(impl, rng):
    optax = pytest.importorskip("optax")
    logits = randn(rng, (3, 5, 13), jnp.float32)
    labels = rng.integers(0, 13, (3, 5))
    labels[0, 1] = labels[2, 4] = 7
    got, got_grad = jax.value_and_grad(
        lambda x: ops.softmax_cross_entropy_with_integer_labels(x, labels, ignore_index=7, impl=impl).sum())(logits)
    want, want_grad = jax.value_and_grad(
        lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels, where=labels != 7).sum())(logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_ignore_index_outside_the_label_dtype_ignores_nothing(rng):
    logits = randn(rng, (4, 300), jnp.float32)
    labels = jnp.asarray([156, 3, 255, 0], jnp.uint8)  # -100 wraps to 156 in uint8
    for impl in IMPLS:
        got = ops.softmax_cross_entropy_with_integer_labels(logits, labels, ignore_index=-100, impl=impl)
        want = ops.softmax_cross_entropy_with_integer_labels(logits, labels, impl=impl)
        np.testing.assert_array_equal(got, want)
        assert (np.asarray(got) > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_scales_each_rows_loss_and_gradient(impl, rng):
    n, v = 9, 29
    logits = randn(rng, (n, v), jnp.float32, 2.0)
    labels = rng.integers(0, v, n)
    where = rng.random(n) < 0.7
    weight = rng.random(n) * 2
    weight[~where] = np.nan  # an uncounted row stays 0 whatever its weight holds
    g = rng.standard_normal(n)
    want = softmax_cross_entropy_float64(logits, labels, g * np.where(where, weight, 0), where=where, z_loss=1e-3)
    plain = softmax_cross_entropy_float64(logits, labels, g, where=where, z_loss=1e-3)
    fn = functools.partial(ops.softmax_cross_entropy_with_integer_labels, labels=jnp.asarray(labels),
                           where=jnp.asarray(where), z_loss=1e-3, impl=impl)
    loss, vjp = jax.vjp(lambda x, wt: fn(x, weight=wt), logits, jnp.asarray(weight, jnp.float32))
    dlogits, dweight = vjp(jnp.asarray(g, jnp.float32))
    assert_close(loss, np.where(where, weight, 0) * plain.loss, jnp.float32)
    assert_close(dlogits, want.dlogits, jnp.float32)
    assert_close(dweight, g * plain.loss, jnp.float32)  # d(w l)/dw = l; 0 on uncounted rows


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_op_ignore_index_and_weight(reduction, impl, rng):
    n, d, v = 10, 16, 45
    x = randn(rng, (n, d), jnp.float32)
    w = randn(rng, (d, v), jnp.float32, 0.5)
    labels = _labels_with_ignored(rng, n, v, -100)
    keep = labels != -100
    weight = rng.random(n) + 0.5
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    g = rng.standard_normal(n)
    if reduction != "none":  # the reduction's cotangent per row
        g = np.full(n, rng.standard_normal()) / (keep.sum() if reduction == "mean" else 1)
    want = softmax_cross_entropy_float64(z, labels, g * weight, where=keep)
    loss_rows = weight * softmax_cross_entropy_float64(z, labels, g, where=keep).loss
    fn = functools.partial(LCE, labels=jnp.asarray(labels), ignore_index=-100, weight=jnp.asarray(weight),
                           reduction=reduction, impl=impl)
    loss, vjp = jax.vjp(lambda x, w: fn(x, w), x, w)
    cot = g if reduction == "none" else g[0] * (keep.sum() if reduction == "mean" else 1)
    dx, dw = vjp(jnp.asarray(cot, jnp.float32))
    want_loss = {"none": loss_rows, "sum": loss_rows.sum(), "mean": loss_rows.sum() / keep.sum()}[reduction]
    assert_close(loss, want_loss, jnp.float32)
    assert_close(dx, want.dlogits @ np.asarray(w, np.float64).T, jnp.float32)
    assert_close(dw, np.asarray(x, np.float64).T @ want.dlogits, jnp.float32)
    np.testing.assert_array_equal(np.asarray(dx)[~keep], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_linear_op_reduces_bf16_in_float32(reduction, impl, rng):
    n, d, v = 37, 32, 300
    x = randn(rng, (n, d), jnp.bfloat16)
    w = randn(rng, (d, v), jnp.bfloat16, 0.5)
    labels = rng.integers(0, v, n)
    rows = LCE(x, w, labels, impl=impl)  # per-row losses, bf16
    got = LCE(x, w, labels, reduction=reduction, impl=impl)
    assert rows.dtype == jnp.bfloat16 and got.dtype == jnp.float32
    # The fused paths keep the logits in f32: their sum / mean is f32-accurate against the
    # float64 loss of the bf16 inputs (a bf16-rounded mean would be off by up to 2**-9
    # relative). The xla baseline rounds its logits to bf16 (x @ w in bf16) first.
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    want = softmax_cross_entropy_float64(z, labels, np.ones(n)).loss
    want = want.sum() if reduction == "sum" else want.mean()
    rtol = 2e-2 if impl == "xla" else 1e-5
    np.testing.assert_allclose(got, want, rtol=rtol)


def test_option_errors_name_the_argument(rng):
    logits = randn(rng, (4, 7), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3])
    fn = ops.softmax_cross_entropy_with_integer_labels
    with pytest.raises(TypeError, match="ignore_index must be None or a Python int"):
        fn(logits, labels, ignore_index=1.5)
    with pytest.raises(TypeError, match="weight must be a floating-point array"):
        fn(logits, labels, weight=jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match=r"weight must have \(or broadcast to\) the labels' shape \(4,\)"):
        LCE(logits, jnp.eye(7), labels, weight=jnp.ones(3))
