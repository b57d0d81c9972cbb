"""Shared test fixtures: the one per-dtype tolerance table, random inputs, lowering checks."""

from __future__ import annotations

import os
import pathlib
import re
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# The real MNIST IDX files sit beside the checkout (../shared/data); CI lays shared/ there too.
MNIST_DIR = pathlib.Path(os.environ.get("FUSEDVJP_MNIST_DIR", REPO.parent / "shared" / "data"))

# One tolerance table for every comparison against an oracle (float64 or an f32 reference).
# f32: kernels and references both accumulate in f32 but in different orders; over
#   K=784..4096 reductions the differences are ~1e-6 relative.
# bf16: one bf16 rounding of the output is 2**-8 relative (3.9e-3); the table allows
#   about two roundings. Tests that compare a bf16 kernel with a bf16 reference add CCE's
#   rule on top: the kernel's error against float64 must not exceed the plain bf16
#   computation's error by more than a small margin (`assert_no_worse_than`).
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(rtol=2e-5, atol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=1.6e-2, atol=1.6e-2),
    jnp.dtype(jnp.float64): dict(rtol=1e-12, atol=1e-12),
}

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def tol(dtype) -> dict:
    return TOLERANCES[jnp.dtype(dtype)]


def assert_close(actual, expected, dtype=None, *, err_msg: str = "", **override) -> None:
    """Compares in float64 with the table's tolerance for ``dtype`` (default: actual's dtype).

    ``atol`` is relative to the array's largest magnitude (and at least absolute): the
    error of a reduction (a matmul entry, a gradient column sum) scales with the
    magnitudes it summed, not with its own value, which can cancel to near zero.
    """
    dtype = jnp.dtype(dtype if dtype is not None else jnp.asarray(actual).dtype)
    kw = dict(tol(dtype))
    kw.update(override)
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    finite = np.isfinite(e)
    scale = max(1.0, float(np.max(np.abs(e[finite])))) if finite.any() else 1.0
    np.testing.assert_allclose(a, e, rtol=kw["rtol"], atol=kw["atol"] * scale, err_msg=err_msg)


def assert_no_worse_than(actual, baseline, oracle, *, margin: float, err_msg: str = "") -> None:
    """CCE's bf16 rule: max |actual - oracle| <= max |baseline - oracle| + margin * max |oracle|."""
    a = np.asarray(actual).astype(np.float64)
    b = np.asarray(baseline).astype(np.float64)
    o = np.asarray(oracle).astype(np.float64)
    err = np.max(np.abs(a - o)) if o.size else 0.0
    base = np.max(np.abs(b - o)) if o.size else 0.0
    scale = np.max(np.abs(o)) if o.size else 0.0
    assert err <= base + margin * scale, f"{err_msg} error {err:.3e} > baseline {base:.3e} + {margin}*{scale:.3e}"


def float64_oracle(fn, *args, **kwargs):
    """Evaluates ``fn`` with every floating array argument promoted to float64.

    x64 is enabled only inside this call, so the code under test runs with JAX's
    default (32-bit) configuration, as users run it.
    """
    with jax.enable_x64(True):
        def up(a):
            a = jnp.asarray(a) if isinstance(a, (jax.Array, np.ndarray)) else a
            if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating):
                return a.astype(jnp.float64)
            return a

        out = fn(*jax.tree.map(up, args), **kwargs)
        return jax.tree.map(lambda o: np.asarray(o, np.float64), out)


# --- the default tier and the slow tier: sampled cross products --------------------------
#
# `pytest -m "not slow"` (the README's command) is the default tier; `pytest -m slow` the
# rest. A test marked `@pytest.mark.sample("shape", "dname")` (or a module with
# `pytestmark = pytest.mark.sample(...)`) keeps in the default tier, for each combination of
# its *other* parameters (the op, impl, backend, options: the code path), the fewest cases
# that still show every value of each named axis at least once -- for 4 shapes x 2 dtypes,
# 4 cases, each shape once and each dtype twice, instead of 8. The other cases are marked
# `slow`: CI's slow tier runs the whole cross product. The choice is deterministic (greedy
# set cover, ties broken from a start hashed from the group's first test id, so sibling
# groups -- the same op on another impl -- pair the axes' values differently) and depends
# on the group alone: a default-tier case runs whichever files are selected.
# Only interpret mode samples (the default backend is the CPU): on a GPU or TPU (the device
# check) every case stays in the default tier, compiled for the device.


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "sample(*axes): default tier keeps a covering sample of these parameter axes, "
        "the rest go to the slow tier (tests/conftest.py)")


def _param_key(value) -> str:
    return repr(value)


def _covering_sample(items, axes, start: int) -> set[int]:
    """Indices of few ``items`` (greedy set cover; ties go to the first from ``start`` on)
    whose values on ``axes`` cover every value the items have."""
    values = [{(a, _param_key(item.callspec.params.get(a))) for a in axes} for item in items]
    uncovered = set().union(*values)
    keep = set()
    while uncovered:
        best = max(range(len(items)), key=lambda i: (len(values[i] & uncovered), -((i - start) % len(items))))
        keep.add(best)
        uncovered -= values[best]
    return keep


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "cpu":
        return
    groups: dict[tuple, list] = {}
    for item in items:
        marker = item.get_closest_marker("sample")
        callspec = getattr(item, "callspec", None)
        if marker is None or callspec is None or item.get_closest_marker("slow"):
            continue
        axes = tuple(marker.args)
        rest = tuple(sorted((k, _param_key(v)) for k, v in callspec.params.items() if k not in axes))
        groups.setdefault((item.path, item.originalname, axes, rest), []).append(item)
    for (_, _, axes, _), group in groups.items():
        keep = _covering_sample(group, axes, zlib.crc32(group[0].nodeid.encode()))
        for i, item in enumerate(group):
            if i not in keep:
                item.add_marker(pytest.mark.slow)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test id and a per-run salt.

    Inputs differ from run to run (fresh random inputs); a failing seed is printed so the
    case can be replayed with FUSEDVJP_TEST_SALT.
    """
    salt = int(os.environ.get("FUSEDVJP_TEST_SALT", np.random.SeedSequence().entropy % 2**32))
    seed = (zlib.crc32(request.node.nodeid.encode()) ^ salt) % 2**32
    request.node.user_properties.append(("seed_salt", salt))
    print(f"FUSEDVJP_TEST_SALT={salt}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _tpu_kernels_run_interpreted_off_tpu(request):
    """A test that names backend="mosaic_tpu" runs the TPU kernel interpreted on the CPU
    device when the default backend is not a TPU (on a GPU machine it would otherwise
    try to compile the Mosaic kernel for CUDA)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec and callspec.params.get("backend") == "mosaic_tpu" and jax.default_backend() != "tpu":
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    else:
        yield


def randn(rng: np.random.Generator, shape, dtype, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


# --- lowering for an abstract accelerator on this CPU machine ---------------------------

ABSTRACT_DEVICES = {
    "cuda": dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
    "tpu": dict(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
}
# The custom call that proves the compiled kernel (not an interpreted or jnp stand-in)
# is in the lowered module.
KERNEL_CUSTOM_CALL = {"cuda": "xla.gpu.triton", "tpu": "tpu_custom_call"}


def lower_for(platform: str, fn, *args) -> str:
    """Lowers ``jax.jit(fn)`` for an abstract H100 (``"cuda"``) or TPU; returns the module text."""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    dev = AbstractDevice(**ABSTRACT_DEVICES[platform])
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=dev)):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
    return lowered.as_text()


# --- bf16 gradients of the cross-entropy ops: an element-wise check -----------------------
#
# A tolerance scaled by the array's largest entry cannot see an error in the small ones:
# a cross-entropy gradient row holds one entry near -1 (p_y - 1) and V - 1 entries near
# p ~ 1 / V, so at V = 32003 `assert_close`'s bf16 atol (1.6e-2 * max) is thousands of
# times the typical entry, and a gradient with every softmax term 50% too large passes it.
# The check below bounds every entry by its own size.
#
# The bound. e is the exact gradient entry of the bf16-rounded inputs (numpy float64),
# T the magnitude of the terms it is formed from (|g| (|c p| + |t|) for dlogits = g (c p - t),
# |g| (1 + |x - m| + log_s) for dlabels = -g log p, log p = (x - m) - log_s). An
# implementation computes f in f32 and rounds once to bf16, got = rn(f):
#   * |got - f| <= 2**-8 |f|: round to nearest with 8 significant bits (unit roundoff 2**-8);
#   * |f - e| <= 2**-16 T: x - m is exact in f32 for bf16 x (two 8-bit significands a few
#     binades apart), log_s = log(s (1 + eps_s)) is off by ~eps_s (the f32 sum of V
#     exponentials: <= 2**-16 unless the summation is 256 roundings deep) plus 2**-24
#     (|x - m| + log_s); so p = exp(x - m - log_s) is relatively off by <= ~2**-16 and
#     c p - t by <= 2**-16 T.
# Hence |got - e| <= 2**-8 |e| + (1 + 2**-8) 2**-16 T; BF16_ELEMENTWISE_C = 1.25 covers the
# (1 + 2**-8) with room. An entry that must be 0 (where=False rows, T = 0) must be exactly
# 0. Seen (xla, jnp, pallas; V = 1, 10, 1000, 32003; both ops, smoothing and z-loss):
# at most 0.79 of the bound, i.e. 0.99 * 2**-8 |e| -- the one bf16 rounding and nothing
# else. Bites: a softmax term 50% too large is off by 0.5 |g c p|, 0.5 / (1.25 * 2**-8) =
# 102 times the bound wherever t = 0 (the planted test in test_ops_softmax_cross_entropy.py).
BF16_ELEMENTWISE_C = 1.25


class XentFloat64(NamedTuple):
    """Exact loss and VJP of the cross-entropy ops (numpy float64), with what the
    element-wise check needs: per-entry term magnitudes, and dlogits' softmax part."""

    loss: np.ndarray  # [N]
    dlogits: np.ndarray  # [N, V]: g (c p - t)
    dlogits_softmax_part: np.ndarray  # [N, V]: g c p, the term a softmax bug scales
    dlogits_terms: np.ndarray  # [N, V]: |g| (|c p| + |t|)
    dlabels: np.ndarray | None  # [N, V]: -g log p (probability labels only)
    dlabels_terms: np.ndarray | None  # [N, V]: |g| (1 + |x - m| + log_s)


def softmax_cross_entropy_float64(logits, labels, g, *, where=None, label_smoothing=0.0, z_loss=0.0):
    """The cross-entropy ops' loss and VJP in numpy float64, from the inputs as given
    (bf16 inputs are used exactly as rounded). Integer labels [N] (optionally smoothed,
    with z-loss) or probability labels [N, V]; ``where=False`` rows give 0; an out-of-range
    integer label on a counted row gives a NaN loss and gradient row.

    Equivalent to: ``-sum(t * log_softmax(x), -1) + z_loss * logsumexp(x, -1)**2`` and its VJP.
    """
    x = np.asarray(logits).astype(np.float64)
    n, v = x.shape
    g = np.asarray(g).astype(np.float64)
    where = np.ones(n, bool) if where is None else np.asarray(where, bool)
    labels = np.asarray(labels)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s = np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))
        logp = (x - m) - log_s
        p = np.exp(logp)
        if labels.ndim == 1:
            onehot = np.arange(v)[None, :] == labels[:, None]
            t = np.where(onehot, 1.0 - label_smoothing, 0.0) + label_smoothing / v
            c = 1.0 + 2.0 * z_loss * (m + log_s)
            bad = ~((labels >= 0) & (labels < v))
        else:
            t = labels.astype(np.float64)
            c = np.sum(t, axis=-1, keepdims=True)
            bad = np.zeros(n, bool)
        t_logp = np.where(t == 0, 0.0, t * logp)
        loss = -np.sum(t_logp, axis=-1) + z_loss * (m + log_s)[:, 0] ** 2
        gc = g[:, None]
        softmax_part = gc * c * p
        dlogits = softmax_part - gc * t
        dlogits_terms = np.abs(gc) * (np.abs(c * p) + np.abs(t))
        dlabels = dlabels_terms = None
        if labels.ndim == 2:
            dlabels = -gc * np.where(np.isneginf(logp) & (t == 0), 0.0, logp)
            dlabels_terms = np.abs(gc) * (1.0 + np.abs(x - m) + np.abs(log_s))
    loss[bad] = np.nan
    dlogits[bad] = np.nan
    counted = where[:, None]
    zero = lambda a: None if a is None else np.where(counted, a, 0.0)  # noqa: E731
    return XentFloat64(np.where(where, loss, 0.0), zero(dlogits), zero(softmax_part), zero(dlogits_terms),
                       zero(dlabels), zero(dlabels_terms))


def bf16_elementwise_excess(actual, expected, terms) -> float:
    """max over entries of |actual - expected| / bound (the check passes at <= 1); see above.

    NaN entries of ``expected`` must be NaN in ``actual`` (they count 0); any other
    non-finite ``actual`` entry is an infinite excess.
    """
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected, np.float64)
    t = np.asarray(terms, np.float64)
    assert a.shape == e.shape == t.shape, (a.shape, e.shape, t.shape)
    nan = np.isnan(e)
    if np.any(nan & ~np.isnan(a)):
        return np.inf
    a, e, t = a[~nan], e[~nan], t[~nan]
    if not np.all(np.isfinite(a) == np.isfinite(e)):
        return np.inf
    finite = np.isfinite(e)
    err = np.abs(a[finite] - e[finite])
    bound = BF16_ELEMENTWISE_C * (2.0**-8 * np.abs(e[finite]) + 2.0**-16 * t[finite])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / bound)  # err > 0 where bound == 0: inf
    if not np.array_equal(a[~finite], e[~finite]):
        return np.inf
    return float(np.max(ratio)) if ratio.size else 0.0


def assert_bf16_elementwise(actual, expected, terms, *, err_msg: str = "") -> None:
    """Every entry within ``BF16_ELEMENTWISE_C (2**-8 |expected| + 2**-16 terms)``."""
    excess = bf16_elementwise_excess(actual, expected, terms)
    if excess > 1.0:
        a = np.asarray(actual).astype(np.float64)
        e = np.asarray(expected, np.float64)
        with np.errstate(invalid="ignore"):
            i = np.unravel_index(np.nanargmax(np.abs(a - e)), e.shape) if e.size else ()
        raise AssertionError(f"{err_msg}: bf16 element-wise error {excess:.3g} x its bound "
                             f"(largest absolute error at {i}: got {a[i]!r}, want {e[i]!r})")


# --- which kernels a lowered module calls, by name -------------------------------------------

# How a kernel's `name=` appears on its custom call in the lowered module text:
#   cuda: stablehlo.custom_call @__gpu$xla.gpu.triton(...) {..., mhlo.backend_config =
#         {..., name = "fusedvjp_dense_fwd", num_stages = ...}}
#   tpu:  stablehlo.custom_call @tpu_custom_call(...) {backend_config = "...",
#         kernel_name = "fusedvjp_dense_fwd", ...}
# (The name also occurs inside the serialized kernel IR, so a bare substring test is not
# evidence of a custom call.)
_KERNEL_NAME_ATTR = {"cuda": re.compile(r'(?<![\w.])name = "([\w.]+)"'),
                     "tpu": re.compile(r'(?<![\w.])kernel_name = "([\w.]+)"')}


def lowered_kernel_names(text: str, platform: str) -> list[str]:
    """The ``name=`` of every compiled-kernel custom call in a lowered module, in order."""
    target = KERNEL_CUSTOM_CALL[platform]
    names = []
    for line in text.splitlines():
        if "stablehlo.custom_call" in line and target in line:
            found = _KERNEL_NAME_ATTR[platform].findall(line)
            names.append(found[0] if len(found) == 1 else f"<{len(found)} names: {found}>")
    return names


def assert_kernels_lowered(text: str, platform: str, expected: Sequence[str]) -> None:
    """Each kernel in ``expected`` is called (as a compiled custom call) at least once, and
    no other kernel is."""
    names = lowered_kernel_names(text, platform)
    missing = [n for n in expected if n not in names]
    unexpected = sorted(set(names) - set(expected))
    assert not missing and not unexpected, (
        f"{platform}: kernels {names} in the lowered module; missing {missing}, unexpected {unexpected}")
