"""The fused dense(+activation) Pallas kernels: interpret-mode numerics on CPU for both
backends, block-size rules, and lowering for an abstract H100 and TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from conftest import (
    DTYPES,
    KERNEL_CUSTOM_CALL,
    assert_close,
    assert_kernels_lowered,
    assert_no_worse_than,
    float64_oracle,
    lower_for,
    lowered_kernel_names,
    randn,
)
from fusedvjp.kernels import _common
from fusedvjp.kernels.dense import DenseBackwardBlockSizes, DenseBlockSizes, dense_bwd, dense_fwd
from fusedvjp.kernels.dense import mosaic_tpu as kd_tpu
from fusedvjp.kernels.dense import triton as kd_triton

BACKENDS = ("triton", "mosaic_tpu")
# (M, K, N): the MNIST MLP's two layers, then shapes no block divides.
SHAPES = {
    "mnist_hidden": (128, 784, 512),
    "mnist_logits": (128, 512, 10),
    "odd": (37, 784, 10),
    "one": (1, 1, 1),
    "ragged_all": (37, 130, 300),
}
# Small tiles so most shapes have several blocks per axis. Tails then exercised:
#   triton (16, 64, 64): M 37 % 16; N 10 < 16 and 300 % 64; K 784 % 64 and 130 % 64.
#   mosaic_tpu (32, 128, 256): M 37 % 32; N 300 % 128; K 784 % 256 (a TPU block
#   narrower than 128 must be the whole dimension, so N=10 and K=130 are one block).
# TPU interpret mode simulates every grid step's DMAs, so its tiles are larger.
TEST_TILES = {"triton": (16, 64, 64), "mosaic_tpu": (32, 128, 256)}
# CCE's bf16 rule: no worse than the plain bf16 computation plus two bf16 roundings
# (unit roundoff 2**-8 each) of the output scale. The backward kernels round dz to bf16
# for the MXU/tensor cores and round the result; on a single element (M=K=N=1) both can
# land near half an ulp while the plain computation happens to be exact.
# Seen: 6.1e-3 (dx, 1x1x1, tanh, worst of 60 seeds); on the larger shapes < 5e-4.
BF16_MARGIN = 2**-7


def _test_blocks(backend: str, m: int, n: int, k: int) -> DenseBlockSizes:
    bm, bn, bk = TEST_TILES[backend]
    if backend == "mosaic_tpu":  # a dimension smaller than the tile is one whole block
        bm, bn, bk = min(bm, m), min(bn, n), min(bk, k)
    return DenseBlockSizes(bm, bn, bk)


def _activate(z, activation):
    if activation in ("gelu", "gelu_exact"):
        return jax.nn.gelu(z, approximate=activation == "gelu")
    return jnp.tanh(z) if activation == "tanh" else z


def _preactivation(x, w, b):
    z = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
    return z if b is None else z + b


def _dense_reference(x, w, b, activation):
    return _activate(_preactivation(x, w, b), activation)


def _dense_bwd_reference(x, w, r, g, has_bias, activation):
    """The backward formulas from a given residual r (a for tanh, z for gelu), in the
    inputs' dtype. gelu's derivative is JAX's autodiff of jax.nn.gelu, not the kernels' formula."""
    if activation == "tanh":
        dz = g * (1 - r * r)
    elif activation in ("gelu", "gelu_exact"):
        dz = g * jax.jvp(lambda z: _activate(z, activation), (r,), (jnp.ones_like(r),))[1]
    else:
        dz = g
    hi = jax.lax.Precision.HIGHEST
    return jnp.dot(dz, w.T, precision=hi), jnp.dot(x.T, dz, precision=hi), (dz.sum(0) if has_bias else None)


def _reference_vjp(x, w, b, g, activation):
    """(dx, dw, db) by JAX's autodiff of the reference, in the inputs' dtype."""
    if b is None:
        _, vjp = jax.vjp(lambda x, w: _dense_reference(x, w, None, activation), x, w)
        return (*vjp(g), None)
    _, vjp = jax.vjp(lambda x, w, b: _dense_reference(x, w, b, activation), x, w, b)
    return vjp(g)


def _inputs(rng, m, k, n, dtype, has_bias):
    # z = x w + b of order 1: tanh neither linear nor saturated everywhere; gelu on both
    # sides of its minimum (z = -0.75).
    x = randn(rng, (m, k), dtype)
    w = randn(rng, (k, n), dtype, scale=1.0 / np.sqrt(k))
    b = randn(rng, (n,), dtype, scale=0.5) if has_bias else None
    g = randn(rng, (m, n), dtype)
    return x, w, b, g


def _run_kernels(x, w, b, g, activation, backend, block_sizes):
    @jax.jit
    def run(x, w, b, g):
        a, r = dense_fwd(x, w, b, activation=activation, backend=backend, block_sizes=block_sizes,
                         return_residual=True)
        dx, dw, db = dense_bwd(
            x, w, r, g, has_bias=b is not None, activation=activation, backend=backend, block_sizes=block_sizes
        )
        return a, r, (dx, dw, db)

    return run(x, w, b, g)


def _compare(name, got, want, plain, like, dtype):
    if want is None:
        assert got is None, f"{name} should be None without a bias"
        return
    assert got.shape == want.shape and got.dtype == like.dtype, (name, got.shape, got.dtype)
    # Interpret mode leaves an unwritten output block NaN (see
    # test_interpret_mode_poisons_unwritten_blocks) and reads NaN past every edge, so a
    # skipped block or an unmasked tail shows up here.
    assert np.isfinite(np.asarray(got, np.float64)).all(), f"{name} has non-finite entries"
    assert_close(got, want, dtype, err_msg=name)
    # CCE's rule compares maxima over many elements; on a single element (the 1 x 1 x 1
    # shape) near gelu's minimum it compares two roundings of z, which is luck (see
    # tests/test_ops_dense.py's gelu test): assert_close above covers that case.
    if dtype == jnp.bfloat16 and plain is not None and want.size > 1:
        assert_no_worse_than(got, plain, want, margin=BF16_MARGIN, err_msg=name)


def _check_against_oracle(got, x, w, b, g, activation, dtype):
    """Forward (and gelu's residual z) and backward each against float64 (and, in bf16,
    against plain bf16 jnp), then the gradients end to end against float64 autodiff of
    the reference."""
    a, r, grads = got
    has_bias = b is not None
    want, plain = float64_oracle(_dense_reference, x, w, b, activation), _dense_reference(x, w, b, activation)
    _compare("a", a, want, plain, x, dtype)
    if activation in ("gelu", "gelu_exact"):
        _compare("z", r, float64_oracle(_preactivation, x, w, b), _preactivation(x, w, b), x, dtype)
    else:
        np.testing.assert_array_equal(r, a, err_msg="tanh's and no activation's residual is the output itself")
    # The backward from the kernel's own residual: its error is the backward's alone.
    want = float64_oracle(_dense_bwd_reference, x, w, r, g, has_bias, activation)
    plain = _dense_bwd_reference(x, w, r, g, has_bias, activation)
    for name, got_i, want_i, plain_i, like in zip(("dx", "dw", "db"), grads, want, plain, (x, w, w)):
        _compare(name, got_i, want_i, plain_i, like, dtype)
    # End to end, the residual's rounding included (tanh' = 1 - a**2 amplifies it where |a| -> 1).
    want = float64_oracle(_reference_vjp, x, w, b, g, activation)
    for name, got_i, want_i, like in zip(("dx", "dw", "db"), grads, want, (x, w, w)):
        _compare(f"{name} (end to end)", got_i, want_i, None, like, dtype)


# --- numerics in interpret mode ---------------------------------------------------------


@pytest.mark.sample("shape", "dtype_name")  # every shape and dtype per backend and epilogue
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("has_bias", "activation"),
    [(True, "tanh"), (False, None), (True, "gelu"), (False, "gelu_exact")],
    ids=["bias_tanh", "plain", "bias_gelu", "gelu_exact"],
)
def test_dense_matches_float64_oracle(rng, backend, shape, dtype_name, has_bias, activation):
    m, k, n = shape
    dtype = DTYPES[dtype_name]
    x, w, b, g = _inputs(rng, m, k, n, dtype, has_bias)
    if backend == "triton" and activation == "gelu_exact":
        # The Pallas Triton lowering has no erf: refused at trace time, in interpret mode too.
        with pytest.raises(NotImplementedError, match="no rule for lax.erf"):
            _run_kernels(x, w, b, g, activation, backend, _test_blocks(backend, m, n, k))
        return
    got = _run_kernels(x, w, b, g, activation, backend, _test_blocks(backend, m, n, k))
    _check_against_oracle(got, x, w, b, g, activation, dtype)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("has_bias", "activation"),
    [(True, None), (False, "tanh"), (False, "gelu"), (True, "gelu_exact")],
    ids=["bias_plain", "tanh", "gelu", "bias_gelu_exact"],
)
def test_dense_other_bias_activation_pairs(rng, backend, dtype_name, has_bias, activation):
    if backend == "triton" and activation == "gelu_exact":
        pytest.skip("refused by Triton (test_dense_matches_float64_oracle checks the refusal)")
    m, k, n = SHAPES["ragged_all"]
    dtype = DTYPES[dtype_name]
    x, w, b, g = _inputs(rng, m, k, n, dtype, has_bias)
    got = _run_kernels(x, w, b, g, activation, backend, _test_blocks(backend, m, n, k))
    _check_against_oracle(got, x, w, b, g, activation, dtype)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("backend", [*BACKENDS, None])
def test_dense_default_block_sizes(rng, backend, dtype_name):
    # backend=None on CPU interprets the Triton kernels (_common.DEFAULT_INTERPRET_BACKEND).
    m, k, n = SHAPES["odd"]
    dtype = DTYPES[dtype_name]
    x, w, b, g = _inputs(rng, m, k, n, dtype, has_bias=True)
    got = _run_kernels(x, w, b, g, "tanh", backend, None)
    _check_against_oracle(got, x, w, b, g, "tanh", dtype)


@pytest.mark.parametrize(
    "interpret",
    [True, pltpu.InterpretParams()],
    ids=["triton_interpret", "tpu_interpret"],
)
def test_interpret_mode_poisons_unwritten_blocks(interpret):
    # The premise of the all-finite checks above: a kernel that skips an output block
    # leaves NaN there in both interpret modes the dense kernels use. (In TPU interpret
    # mode, as on a TPU, a skipped block that follows a written one gets the stale VMEM
    # buffer instead -- wrong values, which the comparison with the oracle catches.)
    def copy_second_block(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 1)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((16, 128), jnp.float32)
    out = pl.pallas_call(
        copy_second_block,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        interpret=interpret,
    )(x)
    assert np.isnan(np.asarray(out[:8])).all()
    assert np.all(np.asarray(out[8:]) == 1.0)


# --- block sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(block_m=0, block_n=16, block_k=16), "block_m must be a positive int, got 0"),
        (dict(block_m=16, block_n=-32, block_k=16), "block_n must be a positive int, got -32"),
        (dict(block_m=16, block_n=16, block_k=16.0), "block_k must be a positive int, got 16.0"),
        (dict(block_m=16, block_n=16, block_k=16, num_warps=3), "num_warps must be a power of two, got 3"),
        (dict(block_m=16, block_n=16, block_k=16, num_stages=0), "num_stages must be a positive int, got 0"),
    ],
)
def test_block_sizes_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenseBlockSizes(**kwargs)


def _args(m=37, k=784, n=10, dtype=jnp.float32):
    return jnp.ones((m, k), dtype), jnp.ones((k, n), dtype), jnp.ones((n,), dtype)


@pytest.mark.parametrize(
    ("block_sizes", "message"),
    [
        (DenseBlockSizes(24, 16, 16), r"powers of two >= 16; got block_m=24"),
        (DenseBlockSizes(16, 8, 16), r"powers of two >= 16; got block_n=8"),
        (DenseBlockSizes(16, 16, 48), r"powers of two >= 16; got block_k=48"),
        (
            DenseBlockSizes(256, 256, 256, num_stages=4),
            r"block_m=256, block_n=256, block_k=256, num_stages=4, float32\) need ~\d+ bytes",
        ),
    ],
)
def test_triton_rejects_illegal_blocks(block_sizes, message):
    x, w, b = _args()
    with pytest.raises(ValueError, match=message):
        dense_fwd(x, w, b, activation="tanh", backend="triton", block_sizes=block_sizes)


@pytest.mark.parametrize(
    ("block_sizes", "message"),
    [
        (DenseBlockSizes(12, 10, 128), r"got block_m=12 \(dimension 37\)"),
        (DenseBlockSizes(8, 16, 128), r"got block_n=16 \(dimension 10\)"),
        (DenseBlockSizes(8, 10, 100), r"got block_k=100 \(dimension 784\)"),
        (DenseBlockSizes(8, 10, 1024), r"got block_k=1024 \(dimension 784\)"),
    ],
)
def test_tpu_rejects_illegal_blocks(block_sizes, message):
    x, w, b = _args()
    a, g = jnp.ones((37, 10), jnp.float32), jnp.ones((37, 10), jnp.float32)
    with pytest.raises(ValueError, match=message):
        dense_bwd(x, w, a, g, has_bias=True, activation="tanh", backend="mosaic_tpu", block_sizes=block_sizes)


def test_launchers_reject_bad_arguments():
    x, w, b = _args()
    with pytest.raises(ValueError, match="unknown dense activation 'relu'"):
        dense_fwd(x, w, b, activation="relu")
    with pytest.raises(ValueError, match=r"x \(37, 784\), w \(783, 10\)"):
        dense_fwd(x, w[1:], b, activation=None)
    with pytest.raises(ValueError, match=r"one dtype; got \['bfloat16', 'float32'\]"):
        dense_fwd(x, w.astype(jnp.bfloat16), b, activation=None)
    with pytest.raises(NotImplementedError, match="not float16"):
        dense_fwd(*_args(dtype=jnp.float16), activation=None)
    with pytest.raises(ValueError, match="no dense block-size default for backend 'cuda'"):
        DenseBlockSizes.default(8, 8, 8, jnp.float32, "cuda")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES.values(), (8192, 4096, 4096)])
@pytest.mark.parametrize("kernel", ["fwd", "dx", "dw"])
def test_default_block_sizes_are_legal(shape, dtype_name, kernel):
    m, k, n = shape
    dtype = DTYPES[dtype_name]
    triton = DenseBlockSizes.default(m, n, k, dtype, "triton", kernel)
    # powers of two >= 16, within H100 shared memory on either backward path
    kd_triton.check_block_sizes(triton, dtype, kernel, prologue=kernel != "fwd")
    for block, size in ((triton.block_m, m), (triton.block_n, n), (triton.block_k, k)):
        assert block <= max(kd_triton.MIN_BLOCK, 2 * size), (triton, shape)  # clamped to the problem
    tpu = DenseBlockSizes.default(m, n, k, dtype, "mosaic_tpu", kernel)
    kd_tpu.check_block_sizes(tpu, m, n, k)


def test_explicit_blocks_must_suit_every_backend_when_unforced():
    # With backend=None a branch is traced per platform, so Triton-only tiles are refused
    # by the TPU branch; naming the backend accepts them.
    x, w, b = _args()
    triton_only = DenseBlockSizes(16, 16, 16)
    with pytest.raises(ValueError, match="Mosaic TPU dense blocks"):
        jax.eval_shape(lambda x, w, b: dense_fwd(x, w, b, activation=None, block_sizes=triton_only), x, w, b)
    out = jax.eval_shape(
        lambda x, w, b: dense_fwd(x, w, b, activation=None, backend="triton", block_sizes=triton_only), x, w, b
    )
    assert out.shape == (37, 10)


# --- lowering for an abstract H100 and TPU ----------------------------------------------

# Every kernel a forward + backward must call, by its `name=`.
DENSE_KERNELS = ("fusedvjp_dense_fwd", "fusedvjp_dense_bwd_dx", "fusedvjp_dense_bwd_dw")
# The Triton backward writes dz once at these shapes (triton.use_dz_pass); TPU recomputes it.
DZ_PASS_KERNEL = {"cuda": ("fusedvjp_dense_bwd_dz",), "tpu": ()}
LOWERING_CASES = {
    "mnist_hidden_f32": ((128, 784, 512), jnp.float32, True, "tanh", None),
    "mnist_logits_f32": ((128, 512, 10), jnp.float32, False, None, None),
    "llm_bf16": ((8192, 4096, 4096), jnp.bfloat16, True, "tanh", None),
    "llm_bf16_triton": ((8192, 4096, 4096), jnp.bfloat16, True, "tanh", "triton"),
    "mnist_hidden_f32_gelu": ((128, 784, 512), jnp.float32, True, "gelu", None),
    "llm_bf16_gelu": ((8192, 4096, 4096), jnp.bfloat16, True, "gelu", None),
    "llm_bf16_gelu_triton": ((8192, 4096, 4096), jnp.bfloat16, True, "gelu", "triton"),
    "llm_bf16_gelu_exact": ((8192, 4096, 4096), jnp.bfloat16, True, "gelu_exact", None),
}
# On an H100, bf16 shapes of whole TMA tiles go to the Mosaic GPU kernels (first in
# _common.BACKENDS); their dz pass is an XLA fusion.
MGPU_KERNELS = ("fusedvjp_dense_fwd_mgpu", "fusedvjp_dense_bwd_dx_mgpu", "fusedvjp_dense_bwd_dw_mgpu")


@pytest.mark.parametrize("case", LOWERING_CASES.values(), ids=LOWERING_CASES.keys())
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_to_compiled_kernels(platform, case, monkeypatch):
    (m, k, n), dtype, has_bias, activation, backend = case
    if backend is not None and platform != "cuda":
        pytest.skip("a GPU backend")

    def fwd_and_bwd(x, w, b, g):
        a, r = dense_fwd(x, w, b if has_bias else None, activation=activation, backend=backend, return_residual=True)
        return a, dense_bwd(x, w, r, g, has_bias=has_bias, activation=activation, backend=backend)

    spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    args = spec(m, k), spec(k, n), spec(n), spec(m, n)
    if platform == "cuda" and activation == "gelu_exact":
        # No GPU forward kernel lowers erf (Triton, Mosaic GPU): the ops layer falls back.
        with pytest.raises(NotImplementedError, match="no rule for lax.erf"):
            lower_for(platform, fwd_and_bwd, *args)
        return
    if activation == "gelu_exact":
        # The CPU branch (Triton interpreted) refuses erf, which blocks a trace on this CPU
        # host; on a TPU host (default backend TPU) only the TPU branch counts.
        monkeypatch.setattr(_common, "target_platforms", lambda: {platform})
    text = lower_for(platform, fwd_and_bwd, *args)
    if platform == "cuda" and dtype == jnp.bfloat16 and backend is None:
        assert lowered_kernel_names(text, platform) == [], "no Triton kernel when Mosaic GPU serves the case"
        assert text.count("mosaic_gpu_v2") == 3 and all(name in text for name in MGPU_KERNELS)
        return
    assert_kernels_lowered(text, platform, DENSE_KERNELS + (DZ_PASS_KERNEL[platform] if has_bias or activation else ()))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering_check_names_each_kernel(platform):
    """Three custom calls are not three kernels: a module with three forwards and no
    backward passes a count of custom calls (the old check) and fails the by-name check.
    (A bare `name in text` is no better: the name is also inside the serialized kernel IR.)"""

    def three_forwards(x, w, b):
        return [dense_fwd(s * x, w, b, activation="tanh") for s in (1.0, 2.0, 3.0)]

    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    text = lower_for(platform, three_forwards, spec(128, 784), spec(784, 512), spec(512))
    assert text.count(KERNEL_CUSTOM_CALL[platform]) >= 3  # what the old check counted
    assert lowered_kernel_names(text, platform) == ["fusedvjp_dense_fwd"] * 3
    with pytest.raises(AssertionError, match=r"missing \['fusedvjp_dense_bwd_dx', 'fusedvjp_dense_bwd_dw'\]"):
        assert_kernels_lowered(text, platform, DENSE_KERNELS)


# --- the Triton backward's two ways to form dz ------------------------------------------


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize(("has_bias", "activation"), [(True, "tanh"), (True, None), (False, "tanh"), (True, "gelu")],
                         ids=["bias_tanh", "bias_plain", "tanh", "bias_gelu"])
@pytest.mark.parametrize("block_k", [16, 256], ids=["dz_pass", "recompute"])
def test_triton_backward_both_dz_paths(rng, dtype_name, has_bias, activation, block_k):
    # K = 130 in 16-wide steps: 9 + 9 programs per slab, so dz (and db) is written once
    # by the pass; in one 256-wide step the dx and dW kernels recompute it in their
    # prologue (and the dW kernel sums db). Per-kernel tiles differ on purpose.
    m, k, n = SHAPES["ragged_all"]
    dtype = DTYPES[dtype_name]
    bwd = DenseBackwardBlockSizes(DenseBlockSizes(16, 64, block_k), DenseBlockSizes(32, 32, block_k))
    assert kd_triton.use_dz_pass(m, n, k, bwd, activation is not None, has_bias) == (block_k == 16)
    x, w, b, g = _inputs(rng, m, k, n, dtype, has_bias)

    @jax.jit
    def run(x, w, b, g):
        a, r = dense_fwd(x, w, b, activation=activation, backend="triton", block_sizes=DenseBlockSizes(32, 16, 64),
                         return_residual=True)
        return a, r, dense_bwd(x, w, r, g, has_bias=b is not None, activation=activation, backend="triton",
                               block_sizes=bwd)

    _check_against_oracle(run(x, w, b, g), x, w, b, g, activation, dtype)


def test_dz_pass_choice_counts_programs():
    tiles = lambda bk: DenseBackwardBlockSizes(DenseBlockSizes(64, 64, bk), DenseBlockSizes(64, 64, bk))  # noqa: E731
    # tanh: the pass when the dx and dW kernels have more than 3 programs per slab in all.
    assert kd_triton.use_dz_pass(128, 512, 784, tiles(64), has_act=True, has_bias=True)  # 13 + 13
    assert kd_triton.use_dz_pass(128, 512, 100, tiles(64), has_act=True, has_bias=True)  # 2 + 2 > 3
    assert not kd_triton.use_dz_pass(128, 512, 64, tiles(64), has_act=True, has_bias=False)  # 1 + 1
    # no activation: only db could need it, once the dW kernel has 2+ programs per column.
    assert kd_triton.use_dz_pass(128, 512, 784, tiles(64), has_act=False, has_bias=True)
    assert not kd_triton.use_dz_pass(128, 512, 784, tiles(64), has_act=False, has_bias=False)
    assert not kd_triton.use_dz_pass(128, 512, 64, tiles(64), has_act=False, has_bias=True)


def test_disabled_backends_hand_hopper_cases_to_triton():
    # What the Triton sweep does on an H100: without Mosaic GPU the bf16 case is Triton's.
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    fwd = lambda x, w: dense_fwd(x, w, None, activation="tanh")  # noqa: E731
    assert "fusedvjp_dense_fwd_mgpu" in lower_for("cuda", fwd, spec(256, 128), spec(128, 256))
    with _common.disabled_backends("mosaic_gpu"):
        jax.clear_caches()  # the backend is chosen at trace time; a cached trace would keep it
        text = lower_for("cuda", fwd, spec(256, 128), spec(128, 256))
    assert lowered_kernel_names(text, "cuda") == ["fusedvjp_dense_fwd"] and "mosaic_gpu_v2" not in text
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        with _common.disabled_backends("cuda"):
            pass
