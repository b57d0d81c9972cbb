"""The Mosaic GPU dense kernels (kernels/dense/mosaic_gpu.py) in GPU interpret mode.

Interpret mode runs the kernels on the CPU while simulating SMEM, the TMA copies (zero
fill past an edge, clipped stores), the barriers, the warpgroups and wgmma; what it does
not check is what the compiled lowering accepts (the lowering test below and the AOT
compile do). Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ABSTRACT_DEVICES, float64_oracle, lower_for, randn
from fusedvjp.kernels import _common
from fusedvjp.kernels.dense import mosaic_gpu as mg

# (M, K, N). With TILES every kernel has several output tiles, and:
#   multi_tile: whole tiles; fwd 4 x 1 tiles, dW 1 x 1 with 4 reduction steps over M.
#   steps: several reduction steps in each kernel (fwd 4 over K, dx 2 over N, dW 2 over M).
#   overhang: a partial tile along every axis (M 200 % 64, K 320 % 128, N 192 % 128; the
#     second column tile's second warpgroup lies wholly past N): TMA zero fill and clipping.
#   small: one tile, mostly past the array on every axis.
SHAPES = {
    "multi_tile": (256, 128, 128),
    "steps": (128, 512, 256),
    "overhang": (200, 320, 192),
    "small": (8, 64, 64),
}
# fwd 64 x 128 output tiles stepping 128 along K; dx 64 x 128 stepping 128 along N;
# dW 128 x 128 stepping 64 along M. 2-slot ring: the ring wraps within a few steps.
TILES = mg.DenseMosaicGpuBlockSizes(block_m=64, block_n=128, block_k=128, max_concurrent_steps=2,
                                    grid_tile_width=2)

# Per-element bounds against the float64 oracle of the same bf16 inputs. A kernel computes
# f in f32 and rounds once to bf16: |rn(f) - f| <= 2**-9 |f| (8 significant bits). In the
# backward, dz is rounded to bf16 before the matmul: each product is off by <= 2**-9 of
# its magnitude, so a dx / dW entry by <= 2**-9 T, T the sum of the magnitudes of its
# terms (|dz| |W|^T, |x|^T |dz|). f32 accumulation adds ~K 2**-24 T (< 2**-12 T here).
# Bound: 2**-8 (|e| + T) -- twice the rounding terms, which holds the f32 error too.
# Bites: dropping tanh' = (1 - a**2) changes dz by g a**2, of order 0.3 T, ~80 times the
# bound; a missing bias shifts z by |b| ~ 0.5 against a bound of ~0.01.
REL = 2.0**-8
# gelu'(z) <= 1.13: the f32 error of z reaches a through at most that factor.
GELU_SLOPE = 1.13


def _f64(t) -> np.ndarray:
    return np.asarray(jnp.asarray(t).astype(jnp.float32), np.float64)


def _assert_within(name, got, exact, terms):
    """|got - exact| <= REL (|exact| + terms) elementwise; all entries finite."""
    got = _f64(got)
    assert got.shape == exact.shape, (name, got.shape, exact.shape)
    assert np.isfinite(got).all(), f"{name} has non-finite entries"
    err = np.abs(got - exact)
    bound = REL * (np.abs(exact) + terms)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (
        f"{name}: |error| {err[worst]:.3e} > bound {bound[worst]:.3e} at {worst} "
        f"({int((err > bound).sum())} of {err.size} entries)"
    )


def _inputs(rng, m, k, n, has_bias):
    # z = x w + b of order 1: tanh neither linear nor saturated.
    x = randn(rng, (m, k), jnp.bfloat16)
    w = randn(rng, (k, n), jnp.bfloat16, scale=1.0 / np.sqrt(k))
    b = randn(rng, (n,), jnp.bfloat16, scale=0.5) if has_bias else None
    g = randn(rng, (m, n), jnp.bfloat16)
    return x, w, b, g


@pytest.fixture
def few_sms(monkeypatch):
    # 3 CTAs for 4..8 output tiles: each CTA loops over several tiles (the persistent
    # grid), unevenly, and the operand ring and epilogue buffers are reused across tiles.
    monkeypatch.setattr(_common, "num_sms", lambda: 3)


OPTIONS = {
    "bias_tanh": (True, "tanh"), "plain": (False, None), "bias": (True, None), "tanh": (False, "tanh"),
    "bias_gelu": (True, "gelu"), "gelu_exact": (False, "gelu_exact"),
}
# Every shape with and without (bias, tanh); the mixed pairs and the gelus (gelu's forward
# also stores z through the same epilogue slots; gelu_exact's is refused, its backward
# runs) on a few shapes (interpret mode is slow).
CASES = [(s, o) for s in SHAPES for o in ("bias_tanh", "plain")] + [
    ("overhang", "bias"), ("overhang", "tanh"), ("overhang", "bias_gelu"), ("multi_tile", "bias_gelu"),
    ("overhang", "gelu_exact"),
]


def _activate(z, activation):
    if activation in ("gelu", "gelu_exact"):
        return jax.nn.gelu(z, approximate=activation == "gelu")
    return jnp.tanh(z) if activation == "tanh" else z


def _slope(z, activation):
    """act'(z) by JAX's autodiff (in float64 under float64_oracle), not the kernels' formula."""
    return jax.jvp(lambda z: _activate(z, activation), (z,), (jnp.ones_like(z),))[1]


@pytest.mark.usefixtures("few_sms")
@pytest.mark.sample("shape_name", "options")  # every tiling and every epilogue
@pytest.mark.parametrize(("shape_name", "options"), CASES, ids=[f"{s}-{o}" for s, o in CASES])
def test_matches_float64_oracle(rng, shape_name, options):
    (m, k, n), (has_bias, activation) = SHAPES[shape_name], OPTIONS[options]
    x, w, b, g = _inputs(rng, m, k, n, has_bias)
    bias = () if b is None else (b,)

    gelu = activation in ("gelu", "gelu_exact")
    xf, wf, gf = _f64(x), _f64(w), _f64(g)
    z = xf @ wf + (_f64(b) if has_bias else 0.0)
    if activation == "gelu_exact":
        # Refused by the forward (no erf in the warpgroup lowering); the backward takes z.
        with pytest.raises(NotImplementedError, match="math.erf"):
            mg.fwd(x, w, *bias, activation=activation, block_sizes=TILES, interpret=True, write_z=True)
        r = jnp.asarray(z, jnp.bfloat16)
    else:
        out = mg.fwd(x, w, *bias, activation=activation, block_sizes=TILES, interpret=True, write_z=gelu)
        a, r = out if gelu else (out, out)
        assert a.dtype == jnp.bfloat16 and r.dtype == jnp.bfloat16
        z_terms = np.abs(xf) @ np.abs(wf) * 2.0**-12 + (np.abs(_f64(b)) * 2.0**-12 if has_bias else 0.0)
        _assert_within("a", a, float64_oracle(_activate, z, activation), z_terms * (GELU_SLOPE if gelu else 1.0))
        if gelu:
            _assert_within("z", r, z, z_terms)

    # The backward from the kernel's own residual (a for tanh, z for gelu): its error is
    # the backward's alone.
    dx, dw, db = mg.bwd(x, w, g, *((r,) if activation else ()), activation=activation, has_bias=has_bias,
                        block_sizes=TILES, interpret=True)
    if activation == "tanh":
        dz = gf * (1.0 - _f64(r) ** 2)
    else:
        dz = gf * float64_oracle(_slope, _f64(r), activation) if gelu else gf
    _assert_within("dx", dx, dz @ wf.T, np.abs(dz) @ np.abs(wf).T)
    _assert_within("dw", dw, xf.T @ dz, np.abs(xf).T @ np.abs(dz))
    if has_bias:
        # f32 sum of the f32 dz: only the f32 summation and the final rounding.
        _assert_within("db", db, dz.sum(0), np.abs(dz).sum(0) * 2.0**-12)
    else:
        assert db is None
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16)


# --- refusals: the dispatcher falls back to Triton on NotImplementedError ------------------


def _fwd(x, w, *b):
    return mg.fwd(x, w, *b, activation="tanh", block_sizes=None, interpret=False)


def _bwd(x, w, g, a):
    return mg.bwd(x, w, g, a, activation="tanh", has_bias=True, block_sizes=None, interpret=False)


def _on_h100():
    """Traces as for an H100 (an abstract mesh of one), where the kernels are candidates."""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    return use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(**ABSTRACT_DEVICES["cuda"])))


def _structs(m, k, n, dtype):
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
    return dict(fwd=(s(m, k), s(k, n), s(n)), bwd=(s(m, k), s(k, n), s(m, n), s(m, n)))


def test_gelu_exact_forward_is_refused_and_its_backward_lowers():
    # No erf in the warpgroup lowering: the forward is refused (the dispatcher falls back);
    # the backward's erf is in the XLA dz fusion, so its kernels take the case.
    s = _structs(256, 128, 128, jnp.bfloat16)
    fwd = functools.partial(mg.fwd, activation="gelu_exact", block_sizes=None, interpret=False, write_z=True)
    with _on_h100(), pytest.raises(NotImplementedError, match="math.erf"):
        jax.eval_shape(fwd, *s["fwd"])
    bwd = functools.partial(mg.bwd, activation="gelu_exact", has_bias=True, block_sizes=None, interpret=False)
    text = lower_for("cuda", bwd, *s["bwd"])
    assert text.count("mosaic_gpu_v2") == 2 and "erf" in text


@pytest.mark.parametrize(
    ("m", "k", "n", "dtype", "reason"),
    [
        (256, 128, 128, jnp.float32, "bfloat16 only"),
        (128, 784, 512, jnp.bfloat16, "multiples of 64"),  # MNIST hidden layer: K % 64 = 16
        (128, 512, 10, jnp.bfloat16, "multiples of 64"),
        (100, 128, 128, jnp.bfloat16, "multiple of 8"),
    ],
    ids=["f32", "k784", "n10", "m100"],
)
def test_unsupported_cases_raise_not_implemented(m, k, n, dtype, reason):
    structs = _structs(m, k, n, dtype)
    with _on_h100(), pytest.raises(NotImplementedError, match=reason):
        jax.eval_shape(_fwd, *structs["fwd"])
    with _on_h100(), pytest.raises(NotImplementedError, match=reason):
        jax.eval_shape(_bwd, *structs["bwd"])


def test_only_hopper_compiles_them():
    # Tracing for no known GPU (here: the CPU, no abstract mesh), and for an A100.
    structs = _structs(256, 128, 128, jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="need a Hopper"):
        jax.eval_shape(_fwd, *structs["fwd"])
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    a100 = AbstractDevice(**{**ABSTRACT_DEVICES["cuda"], "device_kind": "NVIDIA A100-SXM4-80GB", "num_cores": 108})
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=a100)):
        with pytest.raises(NotImplementedError, match="A100"):
            jax.eval_shape(_bwd, *structs["bwd"])
    with _on_h100():
        assert jax.eval_shape(_fwd, *structs["fwd"]).shape == (256, 128)


def test_foreign_block_sizes_raise_not_implemented():
    # Another backend's tile dataclass (the dispatcher passes the user's one to every backend).
    other = types.SimpleNamespace(block_m=64, block_n=128, block_k=128)
    x, w, b = _structs(256, 128, 128, jnp.bfloat16)["fwd"]
    with _on_h100(), pytest.raises(NotImplementedError, match="DenseMosaicGpuBlockSizes"):
        jax.eval_shape(functools.partial(mg.fwd, activation=None, block_sizes=other, interpret=False), x, w)


@pytest.mark.parametrize(
    ("kwargs", "kernel", "message"),
    [
        (dict(block_m=96), "fwd", "multiples of 64"),
        (dict(block_m=0), "fwd", "positive int"),
        (dict(block_n=64), "fwd", "multiple of 128"),  # two warpgroups of 64-column halves
        (dict(block_k=64), "dx", "multiple of 128"),  # dx's columns are K
        (dict(block_m=256, block_n=256), "fwd", "accumulator registers"),
        (dict(max_concurrent_steps=8), "fwd", "shared memory"),
    ],
)
def test_block_sizes_validation(kwargs, kernel, message):
    with pytest.raises(ValueError, match=message):
        mg.DenseMosaicGpuBlockSizes(**kwargs).check_kernel(kernel)


def test_gelu_forward_takes_tiles_that_do_not_spill():
    # 128 x 256 tiles (128 accumulator registers) spilled in the gelu forward (H100 ptxas);
    # its default is 128 x 128, and larger explicit tiles are refused.
    bs = mg.DenseMosaicGpuBlockSizes.default(8192, 4096, 4096, jnp.bfloat16, "fwd", "gelu")
    assert bs.tiles("fwd") == (128, 128, 64)
    assert mg.DenseMosaicGpuBlockSizes.default(8192, 4096, 4096, jnp.bfloat16, "fwd", "tanh").tiles("fwd") == (128, 256, 64)
    x, w, b = _structs(8192, 4096, 4096, jnp.bfloat16)["fwd"]
    fwd = functools.partial(mg.fwd, activation="gelu", interpret=False, write_z=True)
    with _on_h100():
        assert jax.eval_shape(functools.partial(fwd, block_sizes=bs), x, w, b)[1].shape == (8192, 4096)
        with pytest.raises(ValueError, match="128 accumulator registers a thread, more than the 64"):
            jax.eval_shape(functools.partial(fwd, block_sizes=mg.DenseMosaicGpuBlockSizes()), x, w, b)


@pytest.mark.parametrize("shape", [(8192, 4096, 4096), (256, 128, 128), (8, 64, 64), (4096, 64, 64)])
@pytest.mark.parametrize("kernel", mg.KERNELS)
def test_default_block_sizes_are_legal(shape, kernel):
    m, k, n = shape
    bs = mg.DenseMosaicGpuBlockSizes.default(m, n, k, jnp.bfloat16, kernel)
    bs.check_kernel(kernel)
    if shape == (8192, 4096, 4096):  # the compile-report tile: 128 x 256 CTA tiles, 64-deep steps
        assert bs.tiles(kernel) == (128, 256, 64)


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_lowers_to_mosaic_gpu_custom_call(activation):
    """For an abstract H100 the kernels lower to Mosaic GPU custom calls, one per kernel
    (gelu's forward with its second output, z)."""
    s = _structs(256, 128, 128, jnp.bfloat16)
    gelu = activation != "tanh"

    def fwd_bwd(x, w, b, g, _):
        out = mg.fwd(x, w, b, activation=activation, block_sizes=None, interpret=False, write_z=gelu)
        a, r = out if gelu else (out, out)
        return a, mg.bwd(x, w, g, r, activation=activation, has_bias=True, block_sizes=None, interpret=False)

    text = lower_for("cuda", fwd_bwd, *s["fwd"], *s["bwd"][2:])
    assert text.count("mosaic_gpu_v2") == 3, text.count("mosaic_gpu_v2")
    for name in ("fusedvjp_dense_fwd_mgpu", "fusedvjp_dense_bwd_dx_mgpu", "fusedvjp_dense_bwd_dw_mgpu"):
        assert name in text, name
