"""Shared test fixtures: the one per-dtype tolerance table, random inputs, lowering checks."""

from __future__ import annotations

import os
import pathlib
import zlib

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
