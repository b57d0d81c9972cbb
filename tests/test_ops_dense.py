"""dense / dense_tanh: what the registry's generic tests do not cover."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, float64_oracle, randn
from fusedvjp import ops

IMPLS = ("xla", "jnp", "pallas")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_batch_dims_and_no_bias(impl, with_bias, rng):
    x = randn(rng, (3, 5, 33), jnp.float32)
    w = randn(rng, (33, 17), jnp.float32, 0.2)
    b = randn(rng, (17,), jnp.float32) if with_bias else None
    args = (x, w) if b is None else (x, w, b)

    def op(*a):
        return ops.dense_tanh(*a, impl=impl)

    out, vjp = jax.vjp(op, *args)
    assert out.shape == (3, 5, 17)
    g = randn(rng, out.shape, jnp.float32)
    ref_out, ref_grads = float64_oracle(
        lambda a, g: (lambda o, f: (o, f(g)))(*jax.vjp(lambda *a: ops.dense_reference(*a, activation="tanh"), *a)),
        args, g)
    assert_close(out, ref_out, jnp.float32)
    for got, want in zip(vjp(g), ref_grads):
        assert_close(got, want, jnp.float32)


def test_dense_tanh_is_dense_with_tanh(rng):
    x, w, b = randn(rng, (7, 9), jnp.float32), randn(rng, (9, 4), jnp.float32), randn(rng, (4,), jnp.float32)
    np.testing.assert_array_equal(ops.dense_tanh(x, w, b, impl="jnp"), ops.dense(x, w, b, activation="tanh", impl="jnp"))


def test_mixed_precision_params_get_cotangents_in_their_dtype(rng):
    x = randn(rng, (8, 16), jnp.bfloat16)
    w, b = randn(rng, (16, 4), jnp.float32), randn(rng, (4,), jnp.float32)
    out = ops.dense_tanh(x, w, b, impl="jnp")
    assert out.dtype == jnp.bfloat16
    gw, gb = jax.grad(lambda w, b: ops.dense_tanh(x, w, b, impl="jnp").astype(jnp.float32).sum(), (0, 1))(w, b)
    assert gw.dtype == jnp.float32 and gb.dtype == jnp.float32


def test_hand_written_vjp_is_used_not_autodiff(rng):
    """impl="jnp" differentiates through the custom_vjp: its jaxpr has the custom rule."""
    x, w = randn(rng, (4, 3), jnp.float32), randn(rng, (3, 2), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x, w: ops.dense_tanh(x, w, impl="jnp"))(x, w))
    assert "custom_vjp_call" in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda x, w: ops.dense_tanh(x, w, impl="xla"))(x, w))
    assert "custom_vjp_call" not in jaxpr


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (((4, 3), (5, 2)), {}, ValueError, r"K=3 does not match w's first dim 5"),
        (((4, 3), (3,)), {}, ValueError, r"w must have rank 2"),
        (((), (3, 2)), {}, ValueError, r"x must have rank >= 1"),
        (((4, 3), (3, 2), (3,)), {}, ValueError, r"b must have shape \(N,\) = \(2,\)"),
        (((4, 3), (3, 2)), {"impl": "cuda"}, ValueError, r"unknown impl 'cuda'"),
        (((4, 3), (3, 2)), {"activation": "relu"}, ValueError, r"unknown activation 'relu'"),
    ],
)
def test_bad_input_errors(args, kwargs, exc, match):
    arrays = [jnp.ones(s, jnp.float32) for s in args]
    with pytest.raises(exc, match=match):
        ops.dense(*arrays, **kwargs)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match=r"x must be a floating-point array, got dtype int32"):
        ops.dense(jnp.ones((2, 3), jnp.int32), jnp.ones((3, 2)))
