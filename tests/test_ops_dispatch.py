"""impl= resolution and the fallback seam: a case no kernel serves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randn
from fusedvjp import ops
from fusedvjp.ops import _dispatch


# What impl="auto" becomes on each backend jax.default_backend() can name: the kernels
# (with the jnp fallback) on an accelerator, the jnp path on the CPU.
AUTO = {
    "cpu": "jnp",
    "gpu": _dispatch.PALLAS_OR_JNP,
    "cuda": _dispatch.PALLAS_OR_JNP,
    "rocm": _dispatch.PALLAS_OR_JNP,
    "tpu": _dispatch.PALLAS_OR_JNP,
}


def test_auto_follows_the_backend_this_suite_runs_on():
    """Right on whatever machine runs the suite (a CPU, a GPU or a TPU host)."""
    assert _dispatch.resolve_impl("auto") == AUTO[jax.default_backend()]


@pytest.mark.parametrize("backend", AUTO)
def test_auto_on_every_backend(monkeypatch, backend):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert _dispatch.resolve_impl("auto") == AUTO[backend]
    for impl in ("xla", "jnp", "pallas"):  # an explicit impl is never resolved away
        assert _dispatch.resolve_impl(impl) == impl


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
