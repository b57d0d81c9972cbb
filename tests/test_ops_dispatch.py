"""impl= resolution and the fallback seam: a case no kernel serves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randn
from fusedvjp import ops
from fusedvjp.ops import _dispatch


def test_auto_is_jnp_on_cpu_and_kernels_with_fallback_on_an_accelerator(monkeypatch):
    assert _dispatch.resolve_impl("auto") == "jnp"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _dispatch.resolve_impl("auto") == _dispatch.PALLAS_OR_JNP
    assert _dispatch.resolve_impl("pallas") == "pallas"


def test_a_case_no_kernel_serves(monkeypatch, rng):
    """float16 has no kernel: impl="pallas" says so; impl="auto" on a GPU warns and uses jnp."""
    x, w, b = (randn(rng, s, jnp.float16) for s in ((8, 16), (16, 4), (4,)))
    with pytest.raises(NotImplementedError, match="dense kernels take float32 or bfloat16, not float16"):
        ops.dense_tanh(x, w, b, impl="pallas")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.warns(ops.UnsupportedCaseWarning, match="using the jnp implementation"):
        out, grads = jax.value_and_grad(
            lambda *a: ops.dense_tanh(*a, impl="auto").astype(jnp.float32).sum(), argnums=(0, 1, 2))(x, w, b)
    want, want_grads = jax.value_and_grad(
        lambda *a: ops.dense_tanh(*a, impl="jnp").astype(jnp.float32).sum(), argnums=(0, 1, 2))(x, w, b)
    np.testing.assert_array_equal(out, want)
    for got, exp in zip(grads, want_grads):
        np.testing.assert_array_equal(got, exp)
