"""layer_norm: what the registry's generic tests do not cover.

The generic tests (forward and VJP of every impl against float64, interpret mode,
check_grads, GPU/TPU lowering) come from the registry entry in ops/registry.py. Here:
argument checks, batch dims, eps, mixed precision, absent (None) scale and bias, and the
kernels of both backends in interpret mode with small tiles that force ragged row and
column blocks.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DTYPES, assert_close, assert_no_worse_than, float64_oracle, randn
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


@pytest.mark.parametrize("eps", [1e-50, 1e-40, 1e-30, 1e39],
                         ids=["zero-in-f32", "subnormal-in-f32", "inf-derivative", "inf-in-f32"])
@pytest.mark.parametrize("impl", IMPLS)
def test_eps_is_checked_in_the_compute_dtype(impl, eps):
    """eps = 1e-50 is > 0 in float64 but 0 in float32, where it is added: a constant row
    would give rsqrt(0) and NaN. 1e-40 is a float32 subnormal, flushed to 0 on CPU/GPU;
    with 1e-30, rsqrt's derivative (1e-30)**-1.5 is inf in float32."""
    with pytest.raises(ValueError, match=rf"eps={re.escape(repr(eps))} is .* in float32, the dtype it is added in"):
        ops.layer_norm(jnp.ones((2, 3), jnp.float32), jnp.ones(3), jnp.zeros(3), eps=eps, impl=impl)
    with pytest.raises(ValueError, match="float32"):
        kernels.layer_norm_fwd(jnp.ones((2, 3), jnp.float32), None, None, eps=eps)


@pytest.mark.parametrize("impl", IMPLS)
def test_smallest_accepted_eps_keeps_a_constant_row_finite(impl, rng):
    """The boundary of the check: the smallest accepted eps, (f32 max / 8)**(-2/3), is
    accepted, and a constant row (variance exactly 0) then has finite output and
    gradients on every impl (rstd = 3.5e12; the xla path's autodiff forms rstd**3)."""
    eps = (float(jnp.finfo(jnp.float32).max) / 8) ** (-2 / 3) * (1 + 1e-6)
    x = jnp.full((3, 7), 2.5, jnp.float32)
    _, scale, bias, g = _inputs(rng, 3, 7, jnp.float32)
    y, vjp = jax.vjp(lambda *a: ops.layer_norm(*a, eps=eps, impl=impl), x, scale, bias)
    np.testing.assert_array_equal(y, jnp.broadcast_to(bias, y.shape))
    for out in vjp(g):
        assert np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="eps="):
        ops.layer_norm(x, scale, bias, eps=eps / 2, impl=impl)


def test_eps_below_float32_is_accepted_for_float64_inputs(rng):
    """Under x64 a float64 x is computed in float64, where 1e-50 is far above the bound."""
    with jax.enable_x64(True):
        x = jnp.full((2, 5), 1.5, jnp.float64)
        for impl in ("xla", "jnp"):
            y = ops.layer_norm(x, None, None, eps=1e-50, impl=impl)
            np.testing.assert_array_equal(y, 0.0)
        with pytest.raises(ValueError, match="float64"):
            ops.layer_norm(x, eps=1e-250, impl="jnp")
        with pytest.raises(ValueError, match="float32"):  # f32 x is still computed in f32
            ops.layer_norm(x.astype(jnp.float32), eps=1e-50, impl="jnp")


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


# --- absent (None) scale and bias ------------------------------------------------------------

# (has scale, has bias): scale only, bias only, neither, both.
PRESENCE = [(True, False), (False, True), (False, False), (True, True)]
PRESENCE_IDS = ["scale-only", "bias-only", "neither", "both"]


def _drop_absent(scale, bias, present):
    has_scale, has_bias = present
    return (scale if has_scale else None), (bias if has_bias else None)


def _plain_bf16_vjp(x, scale, bias, g):
    """The plain bf16 computation (every op in bf16), the baseline of CCE's rule; a None
    parameter is left out, as in the op."""

    def f(x, scale, bias):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + 1e-6)
        y = y if scale is None else y * scale
        return y if bias is None else y + bias

    y, vjp = jax.vjp(f, x, scale, bias)
    return y, vjp(g)


@pytest.mark.parametrize("n, d", [(37, 784), (3, 1000), (1, 5)], ids=["37x784", "3x1000", "1x5"])
@pytest.mark.parametrize("dname", ["f32", "bf16"])
@pytest.mark.parametrize("present", PRESENCE, ids=PRESENCE_IDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_absent_parameters(impl, present, dname, n, d, rng):
    """A None scale or bias is left out of y, and no cotangent comes back for it; the rest
    matches the float64 oracle of the same formula, forward and VJP (random cotangent)."""
    dtype = DTYPES[dname]
    x, scale, bias, g = _inputs(rng, n, d, dtype)
    scale, bias = _drop_absent(scale, bias, present)
    y, vjp = jax.vjp(lambda *a: ops.layer_norm(*a, impl=impl), x, scale, bias)
    dx, dscale, dbias = vjp(g)
    assert y.dtype == dx.dtype == dtype
    assert (dscale is None) == (scale is None) and (dbias is None) == (bias is None)
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, bias, g, 1e-6)
    got = (y, dx, dscale, dbias)
    names = ("y", "dx", "dscale", "dbias")
    for name, a, want in zip(names, got, (ref_y, *ref_grads)):
        if a is not None:
            assert_close(a, want, dtype, err_msg=name)
    if dtype == jnp.bfloat16:
        base_y, base_grads = _plain_bf16_vjp(x, scale, bias, g)
        for name, a, base, want in zip(names, got, (base_y, *base_grads), (ref_y, *ref_grads)):
            if a is not None:
                assert_no_worse_than(a, base, want, margin=2**-9, err_msg=name)


def test_absent_parameters_match_explicit_identity_ones_and_zeros(rng):
    """None is the identity of its place: scale=None is scale=1 and bias=None is bias=0,
    so the forward and dx agree (to f32 rounding) with those explicit parameters."""
    x, _, _, g = _inputs(rng, 9, 130, jnp.float32)
    ones, zeros = jnp.ones(130, jnp.float32), jnp.zeros(130, jnp.float32)
    y, vjp = jax.vjp(lambda x: ops.layer_norm(x, impl="pallas"), x)
    want_y, want_vjp = jax.vjp(lambda x: ops.layer_norm(x, ones, zeros, impl="pallas"), x)
    assert_close(y, want_y)
    assert_close(vjp(g)[0], want_vjp(g)[0])


def _pallas_operand_counts(jaxpr) -> list[tuple[int, int]]:
    """(inputs, outputs) of every pallas_call in ``jaxpr``, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append((len(eqn.invars), len(eqn.outvars)))
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(item, "jaxpr", item)
                if hasattr(sub, "eqns"):
                    found.extend(_pallas_operand_counts(sub))
    return found


@pytest.mark.parametrize("present", PRESENCE, ids=PRESENCE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_are_specialised_for_absent_parameters(backend, present, rng):
    """An absent parameter is not an operand of the kernel (no vector of ones is loaded)
    and its column-sum partials are not outputs; the kernels match float64."""
    has_scale, has_bias = present
    x, scale, bias, g = _inputs(rng, 37, 784, jnp.float32)
    scale, bias = _drop_absent(scale, bias, present)

    def run(x, scale, bias, g):
        y, (mean, rstd) = kernels.layer_norm_fwd(x, scale, bias, eps=1e-6, backend=backend, block_sizes=SMALL)
        return y, kernels.layer_norm_bwd(x, scale, mean, rstd, g, has_bias=has_bias, backend=backend,
                                         block_sizes=SMALL)

    counts = set(_pallas_operand_counts(jax.make_jaxpr(run)(x, scale, bias, g).jaxpr))
    # forward: x (+ scale, bias) -> y, mean, rstd; backward: x (+ scale), mean, rstd, g -> dx (+ partials).
    assert counts == {(1 + has_scale + has_bias, 3), (4 + has_scale, 1 + has_scale + has_bias)}, counts
    y, (dx, dscale, dbias) = jax.jit(run)(x, scale, bias, g)
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, bias, g, 1e-6)
    for name, a, want in zip(("y", "dx", "dscale", "dbias"), (y, dx, dscale, dbias), (ref_y, *ref_grads)):
        assert (a is None) == (want is None), name
        if a is not None:
            assert_close(a, want, err_msg=name)


# --- the kernels, both backends in interpret mode --------------------------------------------


@functools.partial(jax.jit, static_argnames=("eps", "backend", "block_sizes"))
def _kernel_fwd_bwd(x, scale, bias, g, *, eps, backend, block_sizes):
    y, (mean, rstd) = kernels.layer_norm_fwd(x, scale, bias, eps=eps, backend=backend, block_sizes=block_sizes)
    grads = kernels.layer_norm_bwd(x, scale, mean, rstd, g, has_bias=True, backend=backend, block_sizes=block_sizes)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_bf16(backend, rng):
    x, scale, bias, g = _inputs(rng, 37, 784, jnp.bfloat16)
    y, _, _, grads = _kernel_fwd_bwd(x, scale, bias, g, eps=1e-6, backend=backend, block_sizes=SMALL)
    assert y.dtype == jnp.bfloat16 and all(a.dtype == jnp.bfloat16 for a in grads)
    ref_y, ref_grads = float64_oracle(_reference_vjp, x, scale, bias, g, 1e-6)
    bf16_y, bf16_grads = _plain_bf16_vjp(x, scale, bias, g)
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
