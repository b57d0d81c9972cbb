"""layer_norm: what the registry's generic tests do not cover.

The generic tests (forward and VJP of every impl against float64, interpret mode,
check_grads, GPU/TPU lowering) come from the registry entry in ops/registry.py. Here:
argument checks, batch dims, eps, mixed precision, and the kernels of both backends in
interpret mode with small tiles that force ragged row and column blocks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, assert_no_worse_than, float64_oracle, randn
from fusedvjp import ops
from fusedvjp.kernels import layer_norm as kernels
from fusedvjp.kernels.layer_norm import LayerNormBlockSizes

IMPLS = ("xla", "jnp", "pallas")
BACKENDS = ("triton", "mosaic_tpu")
# Legal for both backends when N >= 8: a power of two, a multiple of 8 rows.
SMALL = LayerNormBlockSizes(block_rows=8, block_cols=128)


def _inputs(rng, n, d, dtype, spread=1.0):
    """x with a per-row offset and spread (so normalization matters), scale ~ 1, bias, g."""
    x = rng.standard_normal((n, 1)) * 2.0 + spread * rng.uniform(0.5, 2.0, (n, 1)) * rng.standard_normal((n, d))
    return (
        jnp.asarray(x, dtype),
        jnp.asarray(1.0 + 0.1 * rng.standard_normal(d), dtype),
        randn(rng, (d,), dtype),
        randn(rng, (n, d), dtype),
    )


def _reference_vjp(x, scale, bias, g, eps):
    """(y, (dx, dscale, dbias)) of the xla reference; float64 under float64_oracle."""
    y, vjp = jax.vjp(lambda *a: ops.layer_norm_reference(*a, eps=eps), x, scale, bias)
    return y, vjp(g)


# --- the public function -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=jnp.ones((2, 3), jnp.int32)), TypeError, r"x must be a floating-point array.*\(2, 3\)"),
        (dict(scale=jnp.ones(3, jnp.int32)), TypeError, "scale must be a floating-point array"),
        (dict(bias=jnp.ones(3, jnp.int32)), TypeError, "bias must be a floating-point array"),
        (dict(scale=jnp.ones(4)), ValueError, r"scale must have shape \(D,\) = \(3,\) to match x \(2, 3\), got \(4,\)"),
        (dict(bias=jnp.ones((1, 3))), ValueError, r"bias must have shape \(D,\) = \(3,\).*got \(1, 3\)"),
        (dict(x=jnp.ones(())), ValueError, r"x must have shape \[..., D\] with D >= 1, got \(\)"),
        (dict(x=jnp.ones((2, 0)), scale=jnp.ones(0), bias=jnp.ones(0)), ValueError, "D >= 1"),
        (dict(eps=0.0), ValueError, r"eps must be in \(0.0, inf\), got 0.0"),
        (dict(eps=-1e-5), ValueError, r"eps must be in \(0.0, inf\)"),
        (dict(eps=float("nan")), ValueError, "eps must be in"),
        (dict(impl="cuda"), ValueError, "unknown impl 'cuda'"),
    ],
    ids=["int-x", "int-scale", "int-bias", "scale-shape", "bias-rank", "scalar-x", "D=0", "eps=0", "eps<0",
         "eps-nan", "impl"],
)
def test_bad_input_errors(kwargs, error, match):
    args = dict(x=jnp.ones((2, 3)), scale=jnp.ones(3), bias=jnp.zeros(3))
    args.update(kwargs)
    options = {k: args.pop(k) for k in ("eps", "impl") if k in args}
    with pytest.raises(error, match=match):
        ops.layer_norm(args["x"], args["scale"], args["bias"], **options)


def test_traced_eps_is_rejected():
    with pytest.raises(TypeError, match="eps must be a concrete Python float"):
        jax.jit(lambda eps: ops.layer_norm(jnp.ones((2, 3)), jnp.ones(3), jnp.zeros(3), eps=eps))(1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_dims(impl, rng):
    x, scale, bias, g = _inputs(rng, 15, 33, jnp.float32)
    x, g = x.reshape(3, 5, 33), g.reshape(3, 5, 33)
    y, vjp = jax.vjp(lambda *a: ops.layer_norm(*a, impl=impl), x, scale, bias)
    assert y.shape == (3, 5, 33)
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, bias, g, 1e-6)
    assert_close(y, ref_y, jnp.float32)
    for got, want in zip(vjp(g), ref_grads):
        assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_eps(impl, rng):
    # Rows with variance ~1e-2: eps = 0.1 dominates it, so an ignored or misplaced eps
    # (e.g. added to the std) fails.
    eps = 0.1
    x, scale, bias, g = _inputs(rng, 9, 130, jnp.float32, spread=0.1)
    y, vjp = jax.vjp(lambda *a: ops.layer_norm(*a, eps=eps, impl=impl), x, scale, bias)
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, bias, g, eps)
    assert_close(y, ref_y, jnp.float32)
    for got, want in zip(vjp(g), ref_grads):
        assert_close(got, want, jnp.float32)
    default_y = float64_oracle(lambda *a: ops.layer_norm_reference(*a), x, scale, bias)
    assert np.max(np.abs(np.asarray(y) - default_y)) > 0.1, "eps had no visible effect"


def test_mixed_precision_params_get_cotangents_in_their_dtype(rng):
    x, _, _, _ = _inputs(rng, 4, 16, jnp.bfloat16)
    scale, bias = randn(rng, (16,), jnp.float32), randn(rng, (16,), jnp.float32)
    assert ops.layer_norm(x, scale, bias, impl="jnp").dtype == jnp.bfloat16
    loss = lambda s, b: ops.layer_norm(x, s, b, impl="jnp").astype(jnp.float32).sum()  # noqa: E731
    dscale, dbias = jax.grad(loss, (0, 1))(scale, bias)
    assert dscale.dtype == dbias.dtype == jnp.float32


# --- the kernels, both backends in interpret mode --------------------------------------------


@functools.partial(jax.jit, static_argnames=("eps", "backend", "block_sizes"))
def _kernel_fwd_bwd(x, scale, bias, g, *, eps, backend, block_sizes):
    y, (mean, rstd) = kernels.layer_norm_fwd(x, scale, bias, eps=eps, backend=backend, block_sizes=block_sizes)
    grads = kernels.layer_norm_bwd(x, scale, mean, rstd, g, backend=backend, block_sizes=block_sizes)
    return y, mean, rstd, grads


def _stats64(x, eps):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1)
    return mean, 1.0 / np.sqrt(((x - mean[:, None]) ** 2).mean(-1) + eps)


@pytest.mark.parametrize(
    "n, d, block_sizes",
    [
        (37, 784, SMALL),  # 5 row blocks (tail of 5), 7 column blocks (tail of 16)
        (13, 100, SMALL),  # D < block_cols: the one-tile path, ragged rows
        (1, 300, LayerNormBlockSizes(block_rows=1, block_cols=128)),  # one row
        (5, 8200, None),  # the defaults: Triton loops 33 column blocks (tail of 8)
    ],
    ids=["37x784", "13x100", "1x300", "5x8200-default"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_f32(backend, n, d, block_sizes, rng):
    eps = 1e-6
    x, scale, bias, g = _inputs(rng, n, d, jnp.float32)
    y, mean, rstd, grads = _kernel_fwd_bwd(x, scale, bias, g, eps=eps, backend=backend, block_sizes=block_sizes)
    assert y.shape == (n, d) and mean.shape == rstd.shape == (n,) and mean.dtype == rstd.dtype == jnp.float32
    for out in (y, mean, rstd, *grads):
        assert np.isfinite(np.asarray(out)).all(), "non-finite output: an unmasked tail or unwritten block"
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, bias, g, eps)
    ref_mean, ref_rstd = _stats64(x, eps)
    assert_close(y, ref_y, err_msg="y")
    assert_close(mean, ref_mean, err_msg="mean")
    assert_close(rstd, ref_rstd, err_msg="rstd")
    for name, got, want in zip(("dx", "dscale", "dbias"), grads, ref_grads):
        assert got.dtype == jnp.float32
        assert_close(got, want, err_msg=name)


@pytest.mark.parametrize("backend", [*BACKENDS, "jnp"])
def test_d_equals_1(backend, rng):
    """D = 1: x - mean = 0 exactly, so y = bias, dscale = 0 (exactly) and dx = 0.

    dx = rstd * (dxhat - mean(dxhat)) is 0 up to rounding, amplified by rstd = 1/sqrt(eps)
    = 1000: under jit, XLA (and Triton on a GPU) may contract g * scale - c2 into an FMA
    whose exact product differs from the rounded one in c2 by up to 2**-24 |g * scale|.
    The bound below is that, with a factor 8 of margin; a missing mean subtraction would
    give |dx| = 1000 |g * scale|.
    """
    eps = 1e-6
    x, scale, bias, g = _inputs(rng, 9, 1, jnp.float32)
    if backend == "jnp":
        fn = jax.jit(lambda *a: jax.vjp(lambda *p: ops.layer_norm(*p, eps=eps, impl="jnp"), *a[:3])[1](a[3]))
        dx, dscale, dbias = fn(x, scale, bias, g)
        y = ops.layer_norm(x, scale, bias, eps=eps, impl="jnp")
    else:
        y, _, _, (dx, dscale, dbias) = _kernel_fwd_bwd(x, scale, bias, g, eps=eps, backend=backend, block_sizes=SMALL)
    np.testing.assert_array_equal(y, jnp.broadcast_to(bias, y.shape))
    np.testing.assert_array_equal(dscale, 0.0)
    assert_close(dbias, np.asarray(g, np.float64).sum(0))
    bound = 2.0**-21 / np.sqrt(eps) * np.abs(np.asarray(g * scale, np.float64))
    assert (np.abs(np.asarray(dx, np.float64)) <= bound).all(), f"|dx| {np.abs(dx).max():.2e} for D = 1"


def _bf16_vjp(x, scale, bias, g):
    """The plain bf16 computation (every op in bf16), the baseline of CCE's rule."""

    def f(x, scale, bias):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        return xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + 1e-6) * scale + bias

    y, vjp = jax.vjp(f, x, scale, bias)
    return y, vjp(g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_bf16(backend, rng):
    x, scale, bias, g = _inputs(rng, 37, 784, jnp.bfloat16)
    y, _, _, grads = _kernel_fwd_bwd(x, scale, bias, g, eps=1e-6, backend=backend, block_sizes=SMALL)
    assert y.dtype == jnp.bfloat16 and all(a.dtype == jnp.bfloat16 for a in grads)
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, bias, g, 1e-6)
    bf16_y, bf16_grads = _bf16_vjp(x, scale, bias, g)
    # f32 math inside, one rounding at the store: within the table's bf16 tolerance, and
    # no worse than computing in bf16 plus half a bf16 ulp of the largest value.
    for name, got, base, want in zip(("y", "dx", "dscale", "dbias"), (y, *grads), (bf16_y, *bf16_grads),
                                     (ref_y, *ref_grads)):
        assert_close(got, want, jnp.bfloat16, err_msg=name)
        assert_no_worse_than(got, base, want, margin=2**-9, err_msg=name)


# --- block sizes ---------------------------------------------------------------------------


def test_block_size_validation():
    with pytest.raises(ValueError, match=r"block_rows must be a positive int, got 0"):
        LayerNormBlockSizes(block_rows=0, block_cols=128)
    with pytest.raises(ValueError, match="num_warps must be a power of two, got 3"):
        LayerNormBlockSizes(block_rows=8, block_cols=128, num_warps=3)
    with pytest.raises(ValueError, match="unknown backend"):
        LayerNormBlockSizes.default(8, 128, jnp.float32, "cuda")
    x, scale, bias = jnp.ones((16, 128), jnp.float32), jnp.ones(128, jnp.float32), jnp.zeros(128, jnp.float32)
    with pytest.raises(ValueError, match=r"triton: LayerNormBlockSizes.block_cols=100 must be a power of two"):
        kernels.layer_norm_fwd(x, scale, bias, eps=1e-6, backend="triton", block_sizes=LayerNormBlockSizes(8, 100))
    with pytest.raises(ValueError, match=r"mosaic_tpu: LayerNormBlockSizes.block_rows=4 must be a multiple of 8"):
        kernels.layer_norm_fwd(x, scale, bias, eps=1e-6, backend="mosaic_tpu", block_sizes=LayerNormBlockSizes(4, 128))
    # backend=None traces every backend's kernel, so the tile must suit both.
    with pytest.raises(ValueError, match="mosaic_tpu"):
        kernels.layer_norm_fwd(x, scale, bias, eps=1e-6, block_sizes=LayerNormBlockSizes(4, 128))


@pytest.mark.parametrize("rows, cols", [(1, 1), (37, 784), (8192, 4096), (3, 100_000)])
def test_default_block_sizes_are_legal(rows, cols):
    for backend in BACKENDS:
        LayerNormBlockSizes.default(rows, cols, jnp.bfloat16, backend).check(rows, cols, backend)


def test_tpu_refuses_rows_too_long_for_vmem():
    """Whole rows of D = 65536 f32 exceed the VMEM budget even at 8 rows: NotImplementedError."""
    x = jax.ShapeDtypeStruct((16, 65536), jnp.float32)
    p = jax.ShapeDtypeStruct((65536,), jnp.float32)
    fwd = functools.partial(kernels.layer_norm_fwd, eps=1e-6, backend="mosaic_tpu")
    with pytest.raises(NotImplementedError, match="VMEM"):
        jax.eval_shape(fwd, x, p, p)
