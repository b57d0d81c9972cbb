"""The ``impl=`` argument shared by every op, and argument checks used by several ops."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fusedvjp.ops import _sharding

IMPLS = ("auto", "xla", "jnp", "pallas")
# "xla": the plain-jnp reference, differentiated by JAX's autodiff (the oracle).
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


def run_kernel(impl: str, kernel: Callable[..., Any], jnp_path: Callable[..., Any], args: Sequence[Any],
               op_name: str, layout: _sharding.Layout | None = None,
               manual: _sharding.Assignment | None = None) -> Any:
    """``kernel(*args)`` when ``impl`` uses the kernels, else ``jnp_path(*args)``.

    Both compute the same function of ``args`` (arrays or None; options are bound in).
    Under ``PALLAS_OR_JNP`` a refusal (``NotImplementedError``) falls back to the jnp path
    with an :class:`UnsupportedCaseWarning`; ``impl="pallas"`` gets the error. Empty
    arrays run the jnp path on every impl: there is nothing for a kernel to stream, and
    a zero-sized grid is not a case worth a kernel's special-casing.

    ``layout`` says how the call is partitioned when its arrays are sharded
    (:mod:`fusedvjp.ops._sharding`): the kernel always, and the jnp path under explicit
    mesh axes, where jnp's own sharding rules cannot type a contraction over a split
    batch. ``manual``: the factors the caller split in its own shard_map (``axis_name=``).

    The kernel is wrapped in a ``jax.custom_jvp`` whose rule is the jnp path's JVP. The
    first derivative never uses it (the ops' hand-written ``custom_vjp`` rules call the
    kernels with plain values); it is what lets a second derivative (``jax.hessian``,
    ``grad`` of ``grad``) differentiate the custom_vjp rules themselves: a ``pallas_call``
    has no derivative of its own, so the derivative of a kernel's output is taken
    through the jnp computation of the same function.
    """
    if not uses_kernels(impl) or any(jnp.size(a) == 0 for a in jax.tree.leaves(args)):
        return _sharding.run(jnp_path, args, layout, is_kernel=False, manual=manual)
    try:
        return _sharding.run(_with_jnp_derivatives(kernel, jnp_path), args, layout, is_kernel=True, manual=manual)
    except NotImplementedError as e:
        if impl == "pallas":
            raise
        warnings.warn(f"{op_name}: {e}; using the jnp implementation", UnsupportedCaseWarning, stacklevel=3)
        return _sharding.run(jnp_path, args, layout, is_kernel=False, manual=manual)


def _with_jnp_derivatives(kernel: Callable[..., Any], jnp_path: Callable[..., Any]) -> Callable[..., Any]:
    fn = jax.custom_jvp(kernel)
    fn.defjvp(lambda primals, tangents: jax.jvp(jnp_path, primals, tangents))
    return fn


@contextlib.contextmanager
def reverse_mode_only(op_name: str, impl: str):
    """Names the op and the alternative when forward-mode autodiff meets a custom_vjp.

    The hand-written backward passes are reverse-mode rules (``jax.custom_vjp``), which
    JAX cannot run in forward mode (``jax.jvp``, ``jax.jacfwd``, the linear map that
    ``jax.linearize`` returns -- applied after the op has returned, so that one keeps
    JAX's own message); ``jax.grad``, ``jax.vjp`` and ``jax.hessian`` work.
    ``impl="xla"`` is plain jnp and supports every mode.
    """
    try:
        yield
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise TypeError(
            f"fusedvjp.ops.{op_name}(impl={impl!r}) has a hand-written reverse-mode VJP and no forward-mode "
            f"rule, so jax.jvp / jax.jacfwd cannot differentiate it (jax.grad, jax.vjp and jax.hessian "
            f"can). For forward mode use impl=\"xla\" (plain jnp, differentiated by JAX)."
        ) from e


def compute_dtype(*dtypes) -> jnp.dtype:
    """The dtype the jnp paths compute in: float64 when an input is float64 (x64 mode),
    else float32 -- 16-bit inputs are computed in f32 and rounded once at the end."""
    return jnp.dtype(jnp.float64) if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.dtype(jnp.float32)


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
