"""The ``impl=`` argument shared by every op, and argument checks used by several ops."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "jnp", "pallas")
# "xla": the plain-jnp reference, differentiated by JAX's autodiff (the baseline).
# "jnp": jnp forward + the hand-written custom_vjp backward.
# "pallas": the Pallas kernels in both directions (interpret mode on CPU).
# "auto": pallas on GPU/TPU, jnp on CPU.
ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


# What resolve_impl returns: "auto" on an accelerator becomes PALLAS_OR_JNP -- the
# kernels, falling back to the jnp path (with a warning) for a case no kernel serves;
# an explicit impl="pallas" gets the kernels' NotImplementedError instead.
PALLAS_OR_JNP = "pallas_or_jnp"


class UnsupportedCaseWarning(UserWarning):
    """No Pallas kernel serves this case; impl="auto" fell back to the jnp implementation."""


def resolve_impl(impl: str) -> str:
    """Validates ``impl``; resolves ``"auto"`` for the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return PALLAS_OR_JNP if jax.default_backend() in ACCELERATOR_BACKENDS else "jnp"
    return impl


def uses_kernels(impl: str) -> bool:
    return impl in ("pallas", PALLAS_OR_JNP)


def run_kernel(impl: str, kernel: Callable[[], Any], jnp_path: Callable[[], Any], op_name: str) -> Any:
    """Runs ``kernel()``; under ``PALLAS_OR_JNP`` a refusal falls back to ``jnp_path()``."""
    try:
        return kernel()
    except NotImplementedError as e:
        if impl == "pallas":
            raise
        warnings.warn(f"{op_name}: {e}; using the jnp implementation", UnsupportedCaseWarning, stacklevel=3)
        return jnp_path()


def check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype} (shape {x.shape})")


def check_static_float(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """A hyperparameter that selects code paths must be a concrete Python number in
    ``[lo, hi)`` (``(lo, hi)`` with ``lo_open``)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete Python float, not a traced value")
    value = float(value)
    if not ((lo < value if lo_open else lo <= value) and value < hi):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}), got {value}")
    return value
