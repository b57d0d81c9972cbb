"""rms_norm: what the registry's generic tests do not cover.

The generic tests (forward and VJP of every impl against float64, interpret mode,
check_grads, GPU/TPU lowering) come from the registry entry in ops/registry.py. Here:
argument checks, batch dims, eps, an absent (None) scale, a flax-free jnp formula,
mixed precision, and the kernels of both backends in interpret mode with small tiles that
force ragged row and column blocks, f32 and bf16.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DTYPES, assert_close, assert_no_worse_than, float64_oracle, randn
from fusedvjp import ops
from fusedvjp.kernels import rms_norm as kernels
from fusedvjp.kernels.rms_norm import RmsNormBlockSizes

IMPLS = ("xla", "jnp", "pallas")
BACKENDS = ("triton", "mosaic_tpu")
# Legal for both backends when N >= 8: a power of two, a multiple of 8 rows.
SMALL = RmsNormBlockSizes(block_rows=8, block_cols=128)


def _inputs(rng, n, d, dtype, spread=1.0):
    """x with a per-row offset and magnitude (so normalization matters), scale ~ 1, g."""
    x = rng.standard_normal((n, 1)) + spread * rng.uniform(0.5, 2.0, (n, 1)) * rng.standard_normal((n, d))
    return jnp.asarray(x, dtype), jnp.asarray(1.0 + 0.1 * rng.standard_normal(d), dtype), randn(rng, (n, d), dtype)


def _reference_vjp(x, scale, g, eps):
    """(y, (dx, dscale)) of the xla reference; float64 under float64_oracle."""
    y, vjp = jax.vjp(lambda *a: ops.rms_norm_reference(*a, eps=eps), x, scale)
    return y, vjp(g)


def _rms_norm_numpy(x, scale, g, eps):
    """The formula and its VJP in float64 numpy, written from the math (no jax, no flax)."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    s = np.ones(x.shape[-1]) if scale is None else np.asarray(scale, np.float64)
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xhat = x * rstd
    dxhat = g * s
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return xhat * s, dx, (g * xhat).reshape(-1, x.shape[-1]).sum(0)


def _plain_bf16_vjp(x, scale, g):
    """The plain bf16 computation (every op in bf16), the baseline of CCE's rule."""

    def f(x, scale):
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return y if scale is None else y * scale

    y, vjp = jax.vjp(f, x, scale)
    return y, vjp(g)


# --- the public function -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=jnp.ones((2, 3), jnp.int32)), TypeError, r"x must be a floating-point array.*\(2, 3\)"),
        (dict(scale=jnp.ones(3, jnp.int32)), TypeError, "scale must be a floating-point array"),
        (dict(scale=jnp.ones(4)), ValueError, r"scale must have shape \(D,\) = \(3,\) to match x \(2, 3\), got \(4,\)"),
        (dict(x=jnp.ones(())), ValueError, r"x must have shape \[..., D\] with D >= 1, got \(\)"),
        (dict(x=jnp.ones((2, 0)), scale=jnp.ones(0)), ValueError, "D >= 1"),
        (dict(eps=0.0), ValueError, r"eps must be in \(0.0, inf\), got 0.0"),
        (dict(eps=-1e-5), ValueError, r"eps must be in \(0.0, inf\)"),
        (dict(eps=float("nan")), ValueError, "eps must be in"),
        (dict(eps=1e-50), ValueError, r"eps=1e-50 is 0.0 in float32, the dtype it is added in"),
        (dict(eps=1e-30), ValueError, r"eps=1e-30 is .* in float32"),
        (dict(impl="cuda"), ValueError, "unknown impl 'cuda'"),
    ],
    ids=["int-x", "int-scale", "scale-shape", "scalar-x", "D=0", "eps=0", "eps<0", "eps-nan", "eps-0-in-f32",
         "eps-inf-derivative", "impl"],
)
def test_bad_input_errors(kwargs, error, match):
    args = dict(x=jnp.ones((2, 3), jnp.float32), scale=jnp.ones(3))
    args.update(kwargs)
    options = {k: args.pop(k) for k in ("eps", "impl") if k in args}
    with pytest.raises(error, match=match):
        ops.rms_norm(args["x"], args["scale"], **options)


def test_traced_eps_is_rejected():
    with pytest.raises(TypeError, match="eps must be a concrete Python float"):
        jax.jit(lambda eps: ops.rms_norm(jnp.ones((2, 3)), jnp.ones(3), eps=eps))(1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_row_with_smallest_eps_is_finite(impl, rng):
    """A row of zeros (mean square 0) at the smallest accepted eps: y = 0 and every
    gradient finite (rstd = 3.5e12; the xla path's autodiff forms rstd**3)."""
    eps = (float(jnp.finfo(jnp.float32).max) / 8) ** (-2 / 3) * (1 + 1e-6)
    x, scale, g = _inputs(rng, 3, 7, jnp.float32)
    x = x.at[1].set(0.0)
    y, vjp = jax.vjp(lambda *a: ops.rms_norm(*a, eps=eps, impl=impl), x, scale)
    np.testing.assert_array_equal(y[1], 0.0)
    for out in (y, *vjp(g)):
        assert np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match=re.escape(f"eps={eps / 2!r}")):
        ops.rms_norm(x, scale, eps=eps / 2, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_dims(impl, rng):
    x, scale, g = _inputs(rng, 15, 33, jnp.float32)
    x, g = x.reshape(3, 5, 33), g.reshape(3, 5, 33)
    y, vjp = jax.vjp(lambda *a: ops.rms_norm(*a, impl=impl), x, scale)
    assert y.shape == (3, 5, 33)
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, g, 1e-6)
    assert_close(y, ref_y, jnp.float32)
    for got, want in zip(vjp(g), ref_grads):
        assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_eps(impl, rng):
    # Rows with mean square ~1e-2: eps = 0.1 dominates it, so an ignored or misplaced eps
    # (e.g. added to the rms) fails.
    eps = 0.1
    x, scale, g = _inputs(rng, 9, 130, jnp.float32, spread=0.1)
    x = x - x.mean(-1, keepdims=True)
    y, vjp = jax.vjp(lambda *a: ops.rms_norm(*a, eps=eps, impl=impl), x, scale)
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, g, eps)
    assert_close(y, ref_y, jnp.float32)
    for got, want in zip(vjp(g), ref_grads):
        assert_close(got, want, jnp.float32)
    default_y = float64_oracle(lambda *a: ops.rms_norm_reference(*a), x, scale)
    assert np.max(np.abs(np.asarray(y) - default_y)) > 0.1, "eps had no visible effect"


@pytest.mark.parametrize("n, d", [(37, 784), (3, 1000), (1, 5)], ids=["37x784", "3x1000", "1x5"])
@pytest.mark.parametrize("dname", ["f32", "bf16"])
@pytest.mark.parametrize("has_scale", [True, False], ids=["scale", "no-scale"])
@pytest.mark.parametrize("impl", IMPLS)
def test_against_numpy_formula(impl, has_scale, dname, n, d, rng):
    """Every impl against the float64 numpy formula written from the math (not the jnp
    reference), forward and VJP with a random cotangent; scale=None returns no dscale.
    bf16 also obeys CCE's rule against the plain bf16 computation."""
    dtype = DTYPES[dname]
    x, scale, g = _inputs(rng, n, d, dtype)
    scale = scale if has_scale else None
    y, vjp = jax.vjp(lambda *a: ops.rms_norm(*a, impl=impl), x, scale)
    dx, dscale = vjp(g)
    assert y.dtype == dx.dtype == dtype and (dscale is None) == (scale is None)
    want_y, want_dx, want_dscale = _rms_norm_numpy(x, scale, g, 1e-6)
    got = [("y", y, want_y), ("dx", dx, want_dx)] + ([("dscale", dscale, want_dscale)] if has_scale else [])
    for name, a, want in got:
        assert_close(a, want, dtype, err_msg=name)
    if dtype == jnp.bfloat16:
        base_y, base_grads = _plain_bf16_vjp(x, scale, g)
        for (name, a, want), base in zip(got, (base_y, *base_grads)):
            assert_no_worse_than(a, base, want, margin=2**-9, err_msg=name)


def test_mixed_precision_scale_gets_its_cotangent_in_its_dtype(rng):
    x, _, _ = _inputs(rng, 4, 16, jnp.bfloat16)
    scale = randn(rng, (16,), jnp.float32)
    assert ops.rms_norm(x, scale, impl="jnp").dtype == jnp.bfloat16
    dscale = jax.grad(lambda s: ops.rms_norm(x, s, impl="jnp").astype(jnp.float32).sum())(scale)
    assert dscale.dtype == jnp.float32


def test_float64_is_computed_in_float64(rng):
    with jax.enable_x64(True):
        x, scale, g = (a.astype(jnp.float64) for a in _inputs(rng, 5, 7, jnp.float32))
        want_y, want_dx, want_dscale = _rms_norm_numpy(x, scale, g, 1e-50)  # 1e-50 is fine in float64
        for impl in ("xla", "jnp"):
            y, vjp = jax.vjp(lambda *a: ops.rms_norm(*a, eps=1e-50, impl=impl), x, scale)
            assert y.dtype == jnp.float64
            for got, want in zip((y, *vjp(g)), (want_y, want_dx, want_dscale)):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# --- the kernels, both backends in interpret mode --------------------------------------------


@functools.partial(jax.jit, static_argnames=("backend", "block_sizes"))
def _kernel_fwd_bwd(x, scale, g, *, backend, block_sizes):
    y, rstd = kernels.rms_norm_fwd(x, scale, eps=1e-6, backend=backend, block_sizes=block_sizes)
    return y, rstd, kernels.rms_norm_bwd(x, scale, rstd, g, backend=backend, block_sizes=block_sizes)


@pytest.mark.parametrize(
    "n, d, block_sizes",
    [
        (37, 784, SMALL),  # 5 row blocks (tail of 5), 7 column blocks (tail of 16)
        (13, 100, SMALL),  # D < block_cols: the one-tile path, ragged rows
        (1, 300, RmsNormBlockSizes(block_rows=1, block_cols=128)),  # one row
        (5, 8200, None),  # the defaults: Triton loops 65 column blocks (tail of 8)
    ],
    ids=["37x784", "13x100", "1x300", "5x8200-default"],
)
@pytest.mark.parametrize("has_scale", [True, False], ids=["scale", "no-scale"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_f32(backend, has_scale, n, d, block_sizes, rng):
    x, scale, g = _inputs(rng, n, d, jnp.float32)
    scale = scale if has_scale else None
    y, rstd, (dx, dscale) = _kernel_fwd_bwd(x, scale, g, backend=backend, block_sizes=block_sizes)
    assert rstd.shape == (n,) and rstd.dtype == jnp.float32 and (dscale is None) == (not has_scale)
    for out in (y, rstd, dx, dscale):
        assert out is None or np.isfinite(np.asarray(out)).all(), "non-finite output: an unmasked tail"
    want_y, want_dx, want_dscale = _rms_norm_numpy(x, scale, g, 1e-6)
    assert_close(rstd, 1.0 / np.sqrt((np.asarray(x, np.float64) ** 2).mean(-1) + 1e-6), err_msg="rstd")
    assert_close(y, want_y, err_msg="y")
    assert_close(dx, want_dx, err_msg="dx")
    if has_scale:
        assert_close(dscale, want_dscale, err_msg="dscale")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_bf16(backend, rng):
    x, scale, g = _inputs(rng, 37, 784, jnp.bfloat16)
    y, _, grads = _kernel_fwd_bwd(x, scale, g, backend=backend, block_sizes=SMALL)
    assert y.dtype == jnp.bfloat16 and all(a.dtype == jnp.bfloat16 for a in grads)
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, g, 1e-6)
    bf16_y, bf16_grads = _plain_bf16_vjp(x, scale, g)
    for name, got, base, want in zip(("y", "dx", "dscale"), (y, *grads), (bf16_y, *bf16_grads), (ref_y, *ref_grads)):
        assert_close(got, want, jnp.bfloat16, err_msg=name)
        assert_no_worse_than(got, base, want, margin=2**-9, err_msg=name)


def test_block_size_validation():
    with pytest.raises(ValueError, match=r"block_rows must be a positive int, got 0"):
        RmsNormBlockSizes(block_rows=0, block_cols=128)
    x, scale = jnp.ones((16, 128), jnp.float32), jnp.ones(128, jnp.float32)
    with pytest.raises(ValueError, match=r"triton: RmsNormBlockSizes.block_cols=100 must be a power of two"):
        kernels.rms_norm_fwd(x, scale, eps=1e-6, backend="triton", block_sizes=RmsNormBlockSizes(8, 100))
    with pytest.raises(ValueError, match=r"mosaic_tpu: RmsNormBlockSizes.block_rows=4 must be a multiple of 8"):
        kernels.rms_norm_fwd(x, scale, eps=1e-6, backend="mosaic_tpu", block_sizes=RmsNormBlockSizes(4, 128))


@pytest.mark.parametrize("rows, cols", [(1, 1), (37, 784), (8192, 4096), (3, 100_000)])
def test_default_block_sizes_are_legal(rows, cols):
    for backend in BACKENDS:
        RmsNormBlockSizes.default(rows, cols, jnp.bfloat16, backend).check(rows, cols, backend)


def test_tpu_refuses_rows_too_long_for_vmem():
    x = jax.ShapeDtypeStruct((16, 65536), jnp.float32)
    p = jax.ShapeDtypeStruct((65536,), jnp.float32)
    with pytest.raises(NotImplementedError, match="VMEM"):
        jax.eval_shape(functools.partial(kernels.rms_norm_fwd, eps=1e-6, backend="mosaic_tpu"), x, p)
