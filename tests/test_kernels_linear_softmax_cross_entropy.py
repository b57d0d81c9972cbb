"""The linear cross-entropy kernels (row_stats, dlogits) against a float64 numpy oracle.

Both backends run in interpret mode on the CPU (backend="triton" / "mosaic_tpu"), at
shapes no block divides (C, D, Vc = 37, 129, 1000; 5, 64, 300; 1, 3, 5), with explicit
small TPU tiles so the C, Vc and D tails and several grid steps along each axis are
exercised. Inputs are modest (|z| of a few units), so a padding column that leaked into
the logsumexp would move it visibly. Labels include out-of-range ones (-3, Vc, Vc + 7).

Error bounds are per element and derived from the inputs, so they bite (see each check):
the oracle is the exact result of the inputs as given (bf16 inputs as rounded). The
compiled kernels' lowering (offsets past 2**31 elements, the custom calls) is checked
for an abstract H100 and TPU at the LLM shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DTYPES, assert_kernels_lowered, lower_for
from fusedvjp.kernels import linear_softmax_cross_entropy as lce
from fusedvjp.kernels.linear_softmax_cross_entropy import mosaic_tpu, triton

BS = lce.LinearCrossEntropyBlockSizes
# Small TPU tiles: at 37 x 129 x 1000 a grid of 3 x 4 x 2 steps with a tail on every axis.
TPU_SMALL = BS(block_c=16, block_v=256, block_d=128)
# Triton: 16-row, 128-column tiles, 64-deep D steps, 3 vocabulary tiles per program (the
# last split holds fewer): partials merged over several splits, each over several tiles.
TRITON_SMALL = BS(block_c=16, block_v=128, block_d=64, v_blocks_per_program=3)
# The unit roundoff of f32, in which both kernels do all their math.
F32_REL = 2.0**-24


def _oracle(x, w, b, labels, cap):
    """z (float64, capped) and dz/dl of the inputs as given; |x| |w| row sums (rounding scale)."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    l = x64 @ w64 + (0.0 if b is None else np.asarray(b, np.float64))
    scale = np.abs(x64) @ np.abs(w64) + (0.0 if b is None else np.abs(np.asarray(b, np.float64)))
    if cap is None:
        return l, np.ones_like(l), scale
    a = np.tanh(l / cap)
    return cap * a, 1.0 - a * a, scale


def _inputs(rng, c, d, v, dtype, bias):
    # |z| of a few units: entries of x @ w have standard deviation 1.5 whatever D is.
    x = jnp.asarray(rng.standard_normal((c, d)) * np.sqrt(1.5) / d**0.25, dtype)
    w = jnp.asarray(rng.standard_normal((d, v)) * np.sqrt(1.5) / d**0.25, dtype)
    b = jnp.asarray(rng.standard_normal(v) * 0.5, dtype) if bias else None
    labels = rng.integers(0, v, c)
    special = [-3, v, v + 7, 0, v - 1]  # out of range, out of range, out of range, first, last column
    labels[: min(c, len(special))] = special[: min(c, len(special))]
    return x, w, b, jnp.asarray(labels, jnp.int32)


def _row_stats_oracle(z, labels):
    v = z.shape[1]
    m = z.max(1)
    log_s = np.log(np.exp(z - m[:, None]).sum(1))
    labels = np.asarray(labels)
    ok = (labels >= 0) & (labels < v)
    label_logit = np.where(ok, z[np.arange(z.shape[0]), np.clip(labels, 0, v - 1)], 0.0)
    return m, log_s, label_logit, z.sum(1)


# Cases: shape, dtype, bias, cap, with_logit_sum -- each option on and off across the list.
# Each backend runs every case with the small tiles above and a few with its defaults
# (interpret mode is slow: the whole file stays under a minute on 2 cores).
CASES = [
    ((37, 129, 1000), "f32", True, 2.5, True),
    ((37, 129, 1000), "bf16", False, None, False),
    ((5, 64, 300), "bf16", True, 2.5, True),
    ((1, 3, 5), "f32", False, 2.5, False),
    ((5, 64, 300), "f32", True, None, True),
]



def _case_id(case):
    (c, d, v), dtype, bias, cap, with_sum = case
    return f"{c}x{d}x{v}-{dtype}-bias{int(bias)}-cap{cap}-sum{int(with_sum)}"


def _kernel_inputs(rng, case):
    (c, d, v), dtype, bias, cap, with_sum = case
    x, w, b, labels = _inputs(rng, c, d, v, DTYPES[dtype], bias)
    z, dz_dl, scale = _oracle(x, w, b, labels, cap)
    return x, w, b, labels, cap, with_sum, z, dz_dl, scale


def _z_error_bound(scale, d, cap):
    """Per-entry bound on |z_kernel - z| (z exact from the inputs as rounded): the f32
    accumulation of D products and the bias add (bf16 products are exact in f32; f32
    ones are IEEE), <= (D + 1) 2**-24 sum |x w| + |b|, doubled; the tanh's few ulp of cap."""
    return 2 * (d + 8) * F32_REL * scale + 8 * F32_REL * (cap or 0.0)


def _blocks(backend, block_sizes, c, v, d):
    """The test's small tiles, each clamped to its dimension for Mosaic (a TPU block may not
    exceed the dimension; the whole dimension is always legal)."""
    if block_sizes is None or backend == "triton":
        return block_sizes
    return BS(min(block_sizes.block_c, c), min(block_sizes.block_v, v), min(block_sizes.block_d, d))


def _params(cases, default_cases):
    out = []
    for backend, small in (("triton", TRITON_SMALL), ("mosaic_tpu", TPU_SMALL)):
        out += [pytest.param(backend, small, c, id=f"{backend}-small-{_case_id(c)}") for c in cases]
        out += [pytest.param(backend, None, c, id=f"{backend}-default-{_case_id(c)}") for c in default_cases]
    return out


@pytest.mark.parametrize("backend, block_sizes, case", _params(CASES, CASES[1::2]))
def test_row_stats(rng, backend, block_sizes, case):
    x, w, b, labels, cap, with_sum, z, _, scale = _kernel_inputs(rng, case)
    (c, d), v = x.shape, w.shape[1]
    block_sizes = _blocks(backend, block_sizes, c, v, d)
    m, log_s, label_logit, logit_sum = jax.block_until_ready(
        lce.row_stats(x, w, b, labels, logit_soft_cap=cap, with_logit_sum=with_sum, backend=backend,
                      block_sizes=block_sizes)
    )
    for a in (m, log_s, label_logit, logit_sum):
        assert a.shape == (z.shape[0],) and a.dtype == jnp.float32
    em, els, ey, eu = _row_stats_oracle(z, labels)
    zerr = _z_error_bound(scale, d, cap)  # [C, Vc]
    # m: the max of z, off by the error of that entry of z.
    np.testing.assert_array_less(np.abs(np.asarray(m) - em), zerr.max(1) + 1e-7, err_msg="m")
    # lse = m + log_s: each exp(z_j - m) is relatively off by |dz_j| + a few ulp, so lse by
    # max_j |dz_j|, plus the f32 sum of Vc exponentials (a tree per tile, then one add per
    # tile of >= 16 columns: <= log2 Vc + Vc / 16 roundings) and the log and the add.
    depth = np.log2(v) + v / 16 + 8
    lse_err = zerr.max(1) + depth * F32_REL * (1 + np.abs(em) + els)
    np.testing.assert_array_less(np.abs((np.asarray(m) + np.asarray(log_s)) - (em + els)), lse_err, err_msg="lse")
    # label_logit: that entry of z; exactly 0 for an out-of-range label.
    lab = np.asarray(labels)
    ok = (lab >= 0) & (lab < z.shape[1])
    lab_err = np.where(ok, zerr[np.arange(len(lab)), np.clip(lab, 0, v - 1)], 0.0)
    np.testing.assert_array_less(np.abs(np.asarray(label_logit) - ey), lab_err + 1e-30, err_msg="label_logit")
    assert np.all(np.asarray(label_logit)[~ok] == 0.0)
    # logit_sum: the sum of the entries' errors plus the f32 sum's rounding; exactly 0 when off.
    if with_sum:
        sum_err = zerr.sum(1) + (v + 8) * F32_REL * np.abs(z).sum(1)
        np.testing.assert_array_less(np.abs(np.asarray(logit_sum) - eu), sum_err, err_msg="logit_sum")
    else:
        assert np.all(np.asarray(logit_sum) == 0.0)


@pytest.mark.parametrize("backend, block_sizes, case", _params(CASES[:3], CASES[:1]))
def test_dlogits(rng, backend, block_sizes, case):
    x, w, b, labels, cap, _, z, dz_dl, scale = _kernel_inputs(rng, case)
    (c, d), v = x.shape, w.shape[1]
    block_sizes = _blocks(backend, block_sizes, c, v, d)
    # The global statistics as the op passes them (here the oracle's, in f32), and
    # per-row cotangents of both signs.
    em, els, _, _ = _row_stats_oracle(z, labels)
    m, log_s = jnp.asarray(em, jnp.float32), jnp.asarray(els, jnp.float32)
    g_p, g_y, g_u = (jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(3))
    dz = jax.block_until_ready(
        lce.dlogits(x, w, b, labels, m, log_s, g_p, g_y, g_u, logit_soft_cap=cap, backend=backend,
                    block_sizes=block_sizes)
    )
    assert dz.shape == (c, v) and dz.dtype == x.dtype
    m64, ls64 = np.asarray(m, np.float64)[:, None], np.asarray(log_s, np.float64)[:, None]
    p = np.exp((z - m64) - ls64)
    gp, gy, gu = (np.asarray(a, np.float64)[:, None] for a in (g_p, g_y, g_u))
    onehot = np.arange(v)[None, :] == np.asarray(labels)[:, None]
    want = (gp * p - gy * onehot - gu) * dz_dl
    # Per element: p is relatively off by the error of z plus the f32 rounding of
    # (z - m) - log_s and the exp; the cap derivative 1 - a^2 by 2 |a| |da| <= 2 |dz| / cap
    # (dz the pre-cap error); d = g_p p - g_y [y] - g_u by a few ulp of its terms. Then one
    # rounding to the output dtype (2**-9 relative for bf16, taken as 2**-8). A missing
    # cap factor (1 - a^2 is 0.2..1 here) or a padding column in p is off by a large
    # multiple of this (the planted tests below).
    zerr = _z_error_bound(scale, d, cap)
    p_rel = zerr + 8 * F32_REL * (np.abs(z) + np.abs(m64) + ls64 + 1)
    terms = np.abs(gp * p) + np.abs(gy) * onehot + np.abs(gu)
    cap_err = 0.0 if cap is None else 2 * zerr / cap * terms
    bound = np.abs(gp * p) * p_rel * np.abs(dz_dl) + cap_err + 8 * F32_REL * terms
    bound = bound + (2.0**-8 if x.dtype == jnp.bfloat16 else 2.0**-24) * np.abs(want)
    got = np.asarray(dz, np.float64)
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), f"dz[{worst}] = {got[worst]!r}, want {want[worst]!r}, bound {bound[worst]:.3g}"


# --- the bounds bite: a planted wrong answer fails them --------------------------------------


def test_dlogits_bound_catches_a_missing_cap_derivative(rng, monkeypatch):
    """Drops the cap's 1 - a^2 from the shared epilogue; the dlogits check must fail."""
    from fusedvjp.kernels.linear_softmax_cross_entropy import common

    stock = common.dlogits_tile
    monkeypatch.setattr(triton, "dlogits_tile", lambda z, dz_dl, *a: stock(z, None, *a))
    with pytest.raises(AssertionError, match="bound"):
        test_dlogits(rng, "triton", TRITON_SMALL, CASES[0])


def test_row_stats_bound_catches_an_unmasked_padding_column(rng, monkeypatch):
    """Counts the tail tile's padding columns (zeros past Vc) in the logsumexp."""
    from fusedvjp.kernels.linear_softmax_cross_entropy import common

    stock = common.tile_stats
    monkeypatch.setattr(triton, "tile_stats", lambda z, col_ok, *a, **k: stock(z, col_ok | True, *a, **k))
    with pytest.raises(AssertionError, match="lse|logit_sum"):
        test_row_stats(rng, "triton", TRITON_SMALL, CASES[0])


# --- arguments ----------------------------------------------------------------------------------


def test_argument_checks():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    labels = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="x \\[C, D\\]"):
        lce.row_stats(x, jnp.ones((7, 16)), None, labels, logit_soft_cap=None, with_logit_sum=False)
    with pytest.raises(ValueError, match="one dtype"):
        lce.row_stats(x, w.astype(jnp.bfloat16), None, labels, logit_soft_cap=None, with_logit_sum=False)
    with pytest.raises(ValueError, match="labels"):
        lce.row_stats(x, w, None, labels[:3], logit_soft_cap=None, with_logit_sum=False)
    with pytest.raises(ValueError, match="g_u"):
        r = jnp.zeros(4)
        lce.dlogits(x, w, None, labels, r, r, r, r, r[:3], logit_soft_cap=None)
    with pytest.raises(NotImplementedError, match="float16"):
        lce.row_stats(x.astype(jnp.float16), w.astype(jnp.float16), None, labels, logit_soft_cap=None,
                      with_logit_sum=False)
    with pytest.raises(ValueError, match="powers of two"):
        lce.row_stats(x, w, None, labels, logit_soft_cap=None, with_logit_sum=False, backend="triton",
                      block_sizes=BS(24, 16, 16))
    with pytest.raises(ValueError, match="mosaic_tpu"):
        lce.row_stats(x, w, None, labels, logit_soft_cap=None, with_logit_sum=False, backend="mosaic_tpu",
                      block_sizes=BS(4, 8, 8))  # 4 rows of 4 is fine, 8 columns of 16 is not
    with pytest.raises(ValueError, match="positive int"):
        BS(16, 16, 0)
    with pytest.raises(ValueError, match="shared memory"):
        triton.check_block_sizes(BS(256, 256, 256, num_stages=4), 4096, 4096, 4096, jnp.float32)


def test_default_block_sizes_are_legal():
    for (c, v, d) in [(16384, 16384, 4096), (16384, 128256, 4096), (16384, 8192, 4096), (37, 1000, 129), (1, 5, 3)]:
        for dtype in (jnp.float32, jnp.bfloat16):
            for kernel in lce.KERNELS:
                for backend in ("triton", "mosaic_tpu"):
                    bs = BS.default(c, v, d, dtype, backend, kernel)
                    bs.check(c, v, d, backend)
                    if backend == "triton":
                        triton.check_block_sizes(bs, c, v, d, dtype)
    # The LLM chunk: 128 x 128 tiles, and enough vocabulary splits for 8 waves of 132 SMs.
    bs = triton.default_block_sizes(16384, 16384, 4096, jnp.bfloat16, "stats")
    assert (bs.block_c, bs.block_v, bs.block_d, bs.v_blocks_per_program) == (128, 128, 64, 8)
    assert mosaic_tpu.default_block_sizes(16384, 16384, 4096, jnp.bfloat16, "dlogits").block_v == 512


# --- lowering for an abstract H100 and TPU at the LLM shape -----------------------------------


def _llm_fns(c, d, v, dtype):
    S = jax.ShapeDtypeStruct
    args = (S((c, d), dtype), S((d, v), dtype), S((v,), dtype), S((c,), jnp.int32))
    rows = tuple(S((c,), jnp.float32) for _ in range(5))

    def stats(x, w, b, y):
        return lce.row_stats(x, w, b, y, logit_soft_cap=30.0, with_logit_sum=True)

    def dlogits(x, w, b, y, *r):
        return lce.dlogits(x, w, b, y, *r, logit_soft_cap=30.0)

    return (stats, args), (dlogits, args + rows)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_to_the_compiled_kernels(platform):
    for (fn, args), name in zip(_llm_fns(37, 129, 1000, jnp.bfloat16), ("fusedvjp_lce_stats", "fusedvjp_lce_dlogits")):
        assert_kernels_lowered(lower_for(platform, fn, *args), platform, [name])


@pytest.mark.parametrize("shape, dtype", [((20000, 4096, 128256), jnp.bfloat16), ((16384, 4096, 128256), jnp.float32)],
                         ids=["20000x4096x128256-bf16", "16384x4096x128256-f32"])
def test_offsets_past_2_31_elements(shape, dtype):
    """dz over 4 GiB (bf16: 2.6e9 > 2**31 elements, ragged row block; f32: 8.4 GB): its
    Triton offsets must be i64 with every i32 part bounded, and the TPU block indices
    inside the arrays (the checkers of tests/test_offsets.py). At C = 16384, Vc = 128256
    bf16, dz has 2_101_346_304 < 2**31 elements (3.9 GiB) and gets i32 offsets, correct there.
    """
    from test_offsets import assert_triton_offsets_bounded, lower_tpu, summary, tpu_index_violations

    big = []
    for fn, args in _llm_fns(*shape, dtype):
        _, accesses = assert_triton_offsets_bounded(fn, *args)
        # The lowering's rule: arrays over 2**32 bytes (here dz) get i64 offsets.
        big += [a for a in accesses if np.prod(a.buffer.shape, dtype=np.int64) * a.buffer.dtype.itemsize > 2**32]
        assert all(a.bits == 64 for a in big), summary(accesses)
        _, kernels = lower_tpu(fn, *args)
        for kernel in kernels:
            v, lines = tpu_index_violations(kernel)
            assert not v, "\n".join(v + lines)
    assert big and {a.kernel for a in big} == {"fusedvjp_lce_dlogits"}
