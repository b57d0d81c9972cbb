"""The benchmark's user baselines (bench/baselines.py) compute each op: a fast opponent that
computed something else would make every speedup meaningless.

Forward and ``jax.vjp`` with a random cotangent of each baseline against the op's float64
reference, at the registry's option sets and test shapes (odd sizes and 1; bf16 at the first),
plus the options optax lacks (``where``, reductions) and the MNIST step. A baseline runs at
its users' precision: in bf16 optax computes in bf16 (its max, its loss), so the bf16
comparison allows that plain bf16 computation's error (``BF16_USER``).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DTYPES, assert_close, float64_oracle

from fusedvjp.bench import baselines, cases as cases_lib
from fusedvjp.model import mlp
from fusedvjp.ops import registry

pytest.importorskip("optax")

# bf16: optax keeps the logits (and so the row max, x - max, the loss) in bf16, and
# jnp.tanh(x @ w + b) rounds z to bf16 before the tanh: each value carries a few bf16
# roundings (2**-8 relative each) of the row's magnitudes, more than the table's two.
BF16_USER = dict(rtol=3e-2, atol=3e-2)
SPECS = [registry.get(op) for op in baselines.BASELINES]


def _check(spec, args, options, dtype, label):
    fn = functools.partial(baselines.get(spec.name).fn, **options)
    ref = functools.partial(spec.reference, **options)
    out, vjp = registry.vjp_wrt(fn, args, spec.diff_argnums)
    g = jnp.asarray(np.random.default_rng(len(label)).standard_normal(out.shape), out.dtype)
    grads = vjp(g)

    def oracle(*a):
        *a, g64 = a
        o, f = registry.vjp_wrt(ref, a, spec.diff_argnums)
        return o, f(g64.astype(o.dtype))

    want_out, want_grads = float64_oracle(oracle, *args, g)
    kw = BF16_USER if dtype == jnp.bfloat16 else {}
    assert out.dtype == jnp.dtype(dtype) or spec.name == "linear_softmax_cross_entropy_with_integer_labels", out.dtype
    assert_close(out, want_out, dtype, err_msg=f"{label}: forward", **kw)
    for i, (got, want) in zip(spec.diff_argnums, zip(grads, want_grads)):
        assert_close(got, want, dtype, err_msg=f"{label}: gradient of argument {i}", **kw)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_baseline_matches_the_reference(spec, dtype, rng):
    # f32 at every test shape (odd sizes, 1); bf16, a question of precision, at the first.
    for shape in spec.test_shapes if dtype == jnp.float32 else spec.test_shapes[:1]:
        for options in spec.options:
            args = spec.make_inputs(rng, shape, dtype)
            _check(spec, args, options, dtype, f"{spec.name} {shape} {dtype.__name__} {options}")


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_linear_xent_where_and_reductions(reduction, rng):
    spec = registry.get("linear_softmax_cross_entropy_with_integer_labels")
    args = spec.make_inputs(rng, (37, 129, 1000), jnp.float32)
    where = jnp.asarray(rng.random(37) < 0.7)
    _check(spec, args, dict(where=where, reduction=reduction, label_smoothing=0.1), jnp.float32, reduction)


def test_integer_xent_where(rng):
    spec = registry.get("softmax_cross_entropy_with_integer_labels")
    args = spec.make_inputs(rng, (37, 1000), jnp.float32)
    where = jnp.asarray(rng.random(37) < 0.7)
    _check(spec, args, dict(where=where, z_loss=1e-3), jnp.float32, "where")


def test_mnist_step_matches_the_models(rng):
    b, d, h, c = 37, 784, 64, 10
    params = {"w1": jnp.asarray(rng.standard_normal((d, h)) / np.sqrt(d), jnp.float32),
              "b1": jnp.asarray(rng.standard_normal(h) * 0.1, jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((h, c)) / np.sqrt(h), jnp.float32),
              "b2": jnp.asarray(rng.standard_normal(c) * 0.1, jnp.float32)}
    x = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, c, b), jnp.int32)
    got_params, got_loss = jax.jit(baselines.sgd_step)(params, x, y, cases_lib.TRAIN_STEP_LR)
    want_params, want_loss = mlp.sgd_step(dict(params), x, y, cases_lib.TRAIN_STEP_LR, "xla")
    assert_close(got_loss, want_loss, jnp.float32)
    for k in params:
        assert_close(got_params[k], want_params[k], jnp.float32, err_msg=k)


@pytest.mark.parametrize("op, math", [("layer_norm", baselines.flax_layer_norm_math),
                                      ("rms_norm", baselines.flax_rms_norm_math)])
def test_flax_math_is_flax(op, math, rng):
    """Without Flax the norms' baselines are their math; with Flax installed, the two agree."""
    nnx = pytest.importorskip("flax.nnx")
    del nnx
    args = registry.get(op).make_inputs(rng, (37, 784), jnp.float32)
    assert_close(getattr(baselines, op)(*args), math(*args), jnp.float32)


def test_without_optax_the_user_row_says_what_to_install(monkeypatch, rng):
    monkeypatch.setitem(sys.modules, "optax", None)  # import optax now raises ImportError
    spec = registry.get("softmax_cross_entropy_with_integer_labels")
    with pytest.raises(ImportError, match=r"pip install optax"):
        baselines.get(spec.name).fn(*spec.make_inputs(rng, (5, 10), jnp.float32))
