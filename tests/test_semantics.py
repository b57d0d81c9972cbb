"""The documented edge semantics, the same on every impl (README, "Semantics").

Masked rows that hold NaN or inf, ``+inf`` logits, out-of-range and int64 labels, float64
inputs under x64, empty batches, second-order and forward-mode differentiation. Each test
here failed on the code before the fix it guards (the issue's items 1 and 3-7).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randn
from fusedvjp import ops
from fusedvjp.ops import registry

IMPLS = ("xla", "jnp", "pallas")
XENT_OPS = ("softmax_cross_entropy_with_integer_labels", "softmax_cross_entropy")


def _xent_loss_and_grad(op, logits, labels, where, impl):
    """(loss, dloss/dlogits) of the cross-entropy op with a random-free cotangent of ones."""
    fn = getattr(ops, op)
    loss, vjp = jax.vjp(lambda x: fn(x, labels, where=where, impl=impl), logits)
    (dlogits,) = vjp(jnp.ones_like(loss))
    return np.asarray(loss), np.asarray(dlogits)


def _labels(op, rng, n, v):
    if op == "softmax_cross_entropy":
        t = rng.random((n, v))
        return jnp.asarray(t / t.sum(-1, keepdims=True), jnp.float32)
    return jnp.asarray(rng.integers(0, v, (n,)), jnp.int32)


# --- 1. where=False rows: loss 0 and gradient 0 whatever they hold -------------------------


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", XENT_OPS)
def test_masked_rows_whatever_they_hold_give_zero_loss_and_gradient(op, impl, poison, rng):
    n, v = 6, 37
    logits = randn(rng, (n, v), jnp.float32, 2.0)
    # Rows 1 and 4 are padding, masked additively (-inf) or holding garbage (nan, inf).
    logits = logits.at[1].set(poison).at[4, ::3].set(poison)
    where = jnp.asarray([True, False, True, True, False, True])
    labels = _labels(op, rng, n, v)
    loss, dlogits = _xent_loss_and_grad(op, logits, labels, where, impl)
    np.testing.assert_array_equal(loss[[1, 4]], 0.0)
    np.testing.assert_array_equal(dlogits[[1, 4]], 0.0)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(dlogits))


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_padding_row_keeps_the_previous_layers_gradient_finite(impl, rng):
    """The NaN of a masked row must not spread into dW of the layer before the loss."""
    x, w = randn(rng, (5, 8), jnp.float32), randn(rng, (8, 10), jnp.float32, 0.3)
    labels = jnp.asarray(rng.integers(0, 10, (5,)), jnp.int32)
    where = jnp.asarray([True, True, False, True, False])
    pad = jnp.asarray([0.0, 0.0, -jnp.inf, 0.0, jnp.nan], jnp.float32)[:, None]

    def loss(w):
        logits = ops.dense(x, w, impl=impl) + pad
        return ops.softmax_cross_entropy_with_integer_labels(logits, labels, where=where, impl=impl).sum()

    dw = jax.grad(loss)(w)
    assert np.all(np.isfinite(np.asarray(dw)))
    want = jax.grad(lambda w: ops.softmax_cross_entropy_with_integer_labels(
        ops.dense(x[where], w, impl="xla"), labels[where], impl="xla").sum())(w)
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-6)


# --- 4. +inf and NaN logits on a counted row: NaN loss, NaN gradient row ---------------------


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", XENT_OPS)
def test_posinf_or_nan_logit_gives_a_nan_row(op, impl, bad, rng):
    n, v = 4, 10
    logits = randn(rng, (n, v), jnp.float32).at[2, 3].set(bad)
    labels = _labels(op, rng, n, v)
    loss, dlogits = _xent_loss_and_grad(op, logits, labels, None, impl)
    assert np.isnan(loss[2]) and np.all(np.isnan(dlogits[2])), (loss[2], dlogits[2])
    ok = [0, 1, 3]
    assert np.all(np.isfinite(loss[ok])) and np.all(np.isfinite(dlogits[ok]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", XENT_OPS)
def test_rows_of_very_negative_logits_stay_finite(op, impl, rng):
    """Logits all below -88 (exp underflows, exp(-x) overflows in f32) on long rows that
    span several vocabulary blocks: the kernels' running sum once rescaled its empty
    start by exp(0 - max) = inf, and 0 * inf gave a NaN row."""
    n, v = 3, 1000
    logits = randn(rng, (n, v), jnp.float32) - jnp.asarray([[150.0], [1000.0], [0.0]], jnp.float32)
    labels = _labels(op, rng, n, v)
    loss, dlogits = _xent_loss_and_grad(op, logits, labels, None, impl)
    want_loss, want_d = _xent_loss_and_grad(op, logits, labels, None, "xla")
    np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
    np.testing.assert_allclose(dlogits, want_d, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_options_keep_the_nan_row_rule(impl, rng):
    logits = randn(rng, (3, 10), jnp.float32).at[0, 0].set(jnp.inf)
    labels = jnp.asarray([1, 2, 3], jnp.int32)
    fn = functools.partial(ops.softmax_cross_entropy_with_integer_labels, label_smoothing=0.1, z_loss=1e-3, impl=impl)
    loss, vjp = jax.vjp(lambda x: fn(x, labels), logits)
    (d,) = vjp(jnp.ones_like(loss))
    assert np.isnan(loss[0]) and np.all(np.isnan(d[0])) and np.all(np.isfinite(d[1:]))


# --- 3. x64 mode ----------------------------------------------------------------------------


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_runs_under_x64(impl, rng, x64):
    """The Triton kernel mixed int32 program ids with int64 Python-int column starts."""
    spec = registry.get("layer_norm")
    for shape in ((5, 7), (3, 5000)):  # one column block and the looped path
        args = spec.make_inputs(rng, shape, jnp.float32)
        out, vjp = registry.vjp_wrt(functools.partial(spec.fn, impl=impl), args, spec.diff_argnums)
        want, want_vjp = registry.vjp_wrt(functools.partial(spec.fn, impl="xla"), args, spec.diff_argnums)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
        for got, exp in zip(vjp(out), want_vjp(out)):
            np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_int64_labels_past_2_32_are_out_of_range_not_wrapped(impl, rng, x64):
    logits = randn(rng, (4, 7), jnp.float32)
    labels = jnp.asarray([0, 2**32 + 1, -(2**32) + 3, 6], jnp.int64)  # would wrap to 1 and 3
    loss, dlogits = _xent_loss_and_grad(
        "softmax_cross_entropy_with_integer_labels", logits, labels, None, impl)
    assert np.all(np.isnan(loss[1:3])) and np.all(np.isnan(dlogits[1:3]))
    assert np.all(np.isfinite(loss[[0, 3]])) and np.all(np.isfinite(dlogits[[0, 3]]))


def _f64_cases(rng):
    """(name, fn(impl) -> (out, grads), float64 numpy oracle (out, grads))."""
    x = rng.standard_normal((5, 7))
    w = rng.standard_normal((7, 3)) / np.sqrt(7)
    b = rng.standard_normal(3)
    labels = rng.integers(0, 7, 5)
    g = rng.standard_normal(5)

    def dense(impl):
        out, vjp = jax.vjp(lambda *a: ops.dense_tanh(*a, impl=impl), jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
        return out, vjp(jnp.ones_like(out))

    a = np.tanh(x @ w + b)
    dz = 1 - a * a
    dense_want = (a, (dz @ w.T, x.T @ dz, dz.sum(0)))

    def xent(impl):
        fn = functools.partial(ops.softmax_cross_entropy_with_integer_labels, impl=impl)
        out, vjp = jax.vjp(lambda x: fn(x, jnp.asarray(labels)), jnp.asarray(x))
        return out, vjp(jnp.asarray(g))

    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    p = np.exp(x - lse[:, None])
    onehot = np.eye(7)[labels]
    xent_want = (lse - x[np.arange(5), labels], (g[:, None] * (p - onehot),))

    def layer_norm(impl):
        scale, bias = jnp.asarray(1 + 0.1 * x[0]), jnp.asarray(x[1])
        out, vjp = jax.vjp(lambda x: ops.layer_norm(x, scale, bias, eps=1e-6, impl=impl), jnp.asarray(x))
        return out, vjp(jnp.asarray(x[::-1]))

    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    rstd = 1 / np.sqrt(var + 1e-6)
    xhat = (x - mu) * rstd
    dxhat = x[::-1] * (1 + 0.1 * x[0])
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    ln_want = (xhat * (1 + 0.1 * x[0]) + x[1], (dx,))
    return [("dense_tanh", dense, dense_want), ("xent", xent, xent_want), ("layer_norm", layer_norm, ln_want)]


@pytest.mark.parametrize("impl", ("xla", "jnp", "auto"))
def test_float64_is_computed_in_float64(impl, rng, x64):
    """f64 in, f64 out, at f64 accuracy (f32 math would be off by ~1e-7 relative)."""
    for name, fn, (want_out, want_grads) in _f64_cases(rng):
        out, grads = fn(impl)
        assert out.dtype == jnp.float64, name
        np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12, err_msg=name)
        for got, exp in zip(grads, want_grads):
            assert got.dtype == jnp.float64, name
            np.testing.assert_allclose(got, exp, rtol=1e-11, atol=1e-12, err_msg=name)


def test_float64_pallas_refuses_and_auto_on_an_accelerator_falls_back(monkeypatch, rng, x64):
    cases = _f64_cases(rng)
    for name, fn, _ in cases:
        with pytest.raises(NotImplementedError, match="float64"):
            fn("pallas")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for name, fn, (want_out, _) in cases:
        with pytest.warns(ops.UnsupportedCaseWarning, match="using the jnp implementation"):
            out, _ = fn("auto")
        np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-12, err_msg=name)


# --- 5. empty batches -----------------------------------------------------------------------


@pytest.mark.parametrize("impl", (*IMPLS, "auto-on-gpu"))
@pytest.mark.parametrize("spec", list(registry.REGISTRY.values()), ids=lambda s: s.name)
def test_empty_batch_gives_empty_outputs_and_gradients(spec, impl, rng, monkeypatch):
    if impl == "auto-on-gpu":
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        impl = "auto"
    shape = (0, *spec.test_shapes[0][1:])
    args = spec.make_inputs(rng, shape, jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.UnsupportedCaseWarning)  # no refusal, no fallback warning
        out, vjp = registry.vjp_wrt(functools.partial(spec.fn, impl=impl), args, spec.diff_argnums)
        grads = vjp(jnp.ones_like(out))
    assert out.shape[0] == 0
    for arg_index, grad in zip(spec.diff_argnums, grads):
        assert grad.shape == args[arg_index].shape
        np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_leading_batch_dims_keep_the_callers_shape(impl):
    loss = ops.softmax_cross_entropy_with_integer_labels(
        jnp.ones((2, 0, 5)), jnp.zeros((2, 0), jnp.int32), impl=impl)
    assert loss.shape == (2, 0)
    y = ops.layer_norm(jnp.ones((0, 3, 4)), jnp.ones(4), jnp.zeros(4), impl=impl)
    assert y.shape == (0, 3, 4)


# --- 6. second order: hessian, grad of grad ---------------------------------------------------


def _scalar_fns(rng):
    x = randn(rng, (4, 6), jnp.float32)
    w, b = randn(rng, (6, 3), jnp.float32, 0.4), randn(rng, (3,), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 6, (4,)), jnp.int32)
    t = jax.nn.softmax(randn(rng, (4, 6), jnp.float32))
    scale, bias = 1 + 0.1 * randn(rng, (6,), jnp.float32), randn(rng, (6,), jnp.float32)
    return x, {
        "dense_tanh": lambda x, impl: jnp.sum(ops.dense_tanh(x, w, b, impl=impl) ** 2),
        "xent_int": lambda x, impl: jnp.sum(ops.softmax_cross_entropy_with_integer_labels(
            x, labels, label_smoothing=0.1, z_loss=1e-2, impl=impl) ** 2),
        "xent_prob": lambda x, impl: jnp.sum(ops.softmax_cross_entropy(x, t, impl=impl) ** 2),
        "layer_norm": lambda x, impl: jnp.sum(ops.layer_norm(x, scale, bias, impl=impl) ** 3),
        "layer_norm_no_params": lambda x, impl: jnp.sum(ops.layer_norm(x, impl=impl) ** 3),
        "rms_norm": lambda x, impl: jnp.sum(ops.rms_norm(x, scale, impl=impl) ** 3),
    }


@pytest.mark.parametrize("impl", ("jnp", "pallas"))
def test_second_order_matches_autodiff(impl, rng):
    x, fns = _scalar_fns(rng)
    for name, f in fns.items():
        # Under jit: one compile each instead of hundreds of eagerly dispatched ops.
        want = jax.jit(jax.hessian(functools.partial(f, impl="xla")))(x)
        got = jax.jit(jax.hessian(functools.partial(f, impl=impl)))(x)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(want))), err_msg=name)
        gg = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(jax.grad(functools.partial(f, impl=impl))(x)))))(x)
        gg_want = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(jax.grad(functools.partial(f, impl="xla"))(x)))))(x)
        np.testing.assert_allclose(gg, gg_want, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(gg_want))),
                                   err_msg=name)


# --- 7. forward mode: a clear error ------------------------------------------


@pytest.mark.parametrize("impl", ("jnp", "pallas"))
def test_forward_mode_names_the_op_and_the_alternative(impl, rng):
    x, fns = _scalar_fns(rng)
    names = {"dense_tanh": "dense_tanh", "xent_int": "softmax_cross_entropy_with_integer_labels",
             "xent_prob": "softmax_cross_entropy", "layer_norm": "layer_norm", "layer_norm_no_params": "layer_norm",
             "rms_norm": "rms_norm"}
    for key, f in fns.items():
        f = functools.partial(f, impl=impl)
        msg = rf"ops\.{names[key]}\(impl='{impl}'\).*reverse-mode.*impl=\"xla\""
        with pytest.raises(TypeError, match=msg):
            jax.jvp(f, (x,), (x,))
        with pytest.raises(TypeError, match=msg):
            jax.jacfwd(f)(x)
        # jax.linearize traces (it is how jax.vjp works), but its linear map is forward mode:
        # applying it raises JAX's own message, at a point the op no longer sees (README).
        y, f_lin = jax.linearize(f, x)
        np.testing.assert_allclose(y, fns[key](x, impl="xla"), rtol=1e-5)
        with pytest.raises(TypeError, match="forward-mode"):
            f_lin(x)


def test_forward_mode_works_with_xla(rng):
    x, fns = _scalar_fns(rng)
    for f in fns.values():
        jax.jvp(functools.partial(f, impl="xla"), (x,), (x,))


# --- optax's where: per class (the logits' rank) and per row (the labels' rank) ------------


@pytest.mark.parametrize("impl", IMPLS)
def test_class_mask_matches_optax(impl, rng):
    optax = pytest.importorskip("optax")
    n, v = 6, 12
    logits = randn(rng, (n, v), jnp.float32, 2.0)
    mask = jnp.asarray(rng.random((n, v)) < 0.6).at[:, 0].set(True).at[3].set(False)  # row 3: no class left
    labels = jnp.asarray(rng.integers(0, v, (n,)), jnp.int32)
    labels = jnp.where(jnp.take_along_axis(mask, labels[:, None], 1)[:, 0], labels, 0)  # labels on kept classes
    t = jnp.where(mask, jnp.asarray(rng.random((n, v)), jnp.float32), 0.0)
    t = t / jnp.maximum(t.sum(-1, keepdims=True), 1e-9)
    for fn, optax_fn, lab in ((ops.softmax_cross_entropy_with_integer_labels,
                               optax.softmax_cross_entropy_with_integer_labels, labels),
                              (ops.softmax_cross_entropy, optax.softmax_cross_entropy, t)):
        got, got_grad = jax.value_and_grad(lambda x: fn(x, lab, where=mask, impl=impl).sum())(logits)
        want, want_grad = jax.value_and_grad(lambda x: optax_fn(x, lab, where=mask).sum())(logits)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(fn(logits, lab, where=mask, impl=impl)[3], 0.0)
    # A label on a masked class: +inf (optax would subtract the masked class's raw logit).
    bad = jnp.asarray([0, 1, 2, 3, 4, 5], jnp.int32)
    mask2 = jnp.ones((n, v), bool).at[1, 1].set(False)
    loss = ops.softmax_cross_entropy_with_integer_labels(logits, bad, where=mask2, impl=impl)
    assert np.isposinf(loss[1]) and np.all(np.isfinite(np.delete(np.asarray(loss), 1)))


@pytest.mark.parametrize("impl", IMPLS)
def test_axis_and_broadcast_row_mask(impl, rng):
    logits = randn(rng, (3, 5, 4), jnp.float32)  # classes on axis 1
    labels = jnp.asarray(rng.integers(0, 5, (3, 4)), jnp.int32)
    row_mask = jnp.asarray([[True], [False], [True]])  # [3, 1] broadcasts to the labels' [3, 4]
    got = ops.softmax_cross_entropy_with_integer_labels(logits, labels, axis=1, where=row_mask, impl=impl)
    want = ops.softmax_cross_entropy_with_integer_labels(
        jnp.moveaxis(logits, 1, -1), labels, where=jnp.broadcast_to(row_mask, (3, 4)), impl="xla")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], 0.0)
