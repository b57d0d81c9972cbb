"""Plumbing shared by every kernel file: which implementation runs on which platform.

A *backend* is one way to compile a Pallas kernel (``"triton"`` for GPUs through the
Pallas Triton lowering, ``"mosaic_tpu"`` for TPUs). Each kernel file provides one
implementation per backend it supports, as a function ``fn(*arrays, interpret: bool)``
that raises ``NotImplementedError(reason)`` at trace time for a case it cannot serve.
:func:`platform_dispatch` turns such a table into one traced function with a branch
per lowering platform (``jax.lax.platform_dependent``), so the choice follows the
platform actually lowered for -- not ``jax.default_backend()`` -- and lowering for an
abstract H100 or TPU on a CPU-only machine really lowers the compiled kernel. On CPU
the kernels run in interpret mode; that is how the tests exercise them.

Adding a backend (e.g. Mosaic GPU) is one more entry in :data:`BACKENDS` and one more
implementation in the kernel file's table.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Backend:
    """A Pallas compilation backend and the lowering platforms it compiles for."""

    name: str
    platforms: tuple[str, ...]


# In preference order: for each lowering platform the first backend that lists it
# and whose implementation accepts the case is used.
BACKENDS: tuple[Backend, ...] = (
    Backend("triton", ("cuda", "rocm")),
    Backend("mosaic_tpu", ("tpu",)),
)
BACKEND_NAMES = tuple(b.name for b in BACKENDS)
# On CPU the kernels run interpreted; by default the GPU kernel is the one interpreted.
DEFAULT_INTERPRET_BACKEND = "triton"


def check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKEND_NAMES} or None")


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# jax.default_backend() / AbstractDevice.platform -> lowering platforms.
_LOWERING_PLATFORMS = {"cpu": ("cpu",), "gpu": ("cuda", "rocm"), "cuda": ("cuda",), "rocm": ("rocm",), "tpu": ("tpu",)}


def _target_platforms() -> set[str]:
    """The platforms this trace will most likely be lowered for: the default backend's,
    and an abstract mesh's device (how the tests lower for an H100 or a TPU here)."""
    targets = set(_LOWERING_PLATFORMS.get(jax.default_backend(), ()))
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is not None:
        targets.update(_LOWERING_PLATFORMS.get(device.platform, ()))
    return targets


def platform_dispatch(
    impls: Mapping[str, Callable[..., Any]],
    *args: Any,
    backend: str | None = None,
    op_name: str = "kernel",
) -> Any:
    """Runs ``impls[name](*args, interpret=...)`` for the platform being lowered for.

    Every platform's branch is traced (they are branches of one ``platform_dependent``),
    so each candidate is first traced abstractly: a backend that raises
    ``NotImplementedError`` for this case is skipped for its platform, and a platform
    left with no backend gets no branch -- lowering for it then fails loudly. A refusal
    on another platform (a TPU VMEM limit, say) must not take the kernel away from the
    platform we run on.

    Args:
      impls: backend name -> implementation; each must return the same pytree of
        shapes and dtypes on every platform.
      *args: arrays passed to the implementation.
      backend: ``None`` picks per platform (``BACKENDS`` order; CPU interprets
        ``DEFAULT_INTERPRET_BACKEND``); a name forces that backend on every platform
        (compiled where it compiles, interpreted on CPU) -- the tests use this to run
        the TPU kernels in interpret mode.
      op_name: used in messages.

    Raises:
      NotImplementedError: every candidate backend refused the case on a platform this
        trace targets (the default backend's, or an abstract mesh's), with each one's
        reason. The ops layer decides whether to fall back to jnp.
    """
    check_backend(backend)

    def candidates_for(platform: str) -> list[str]:
        if platform == "cpu":
            names = [backend or DEFAULT_INTERPRET_BACKEND]
        elif backend is not None:
            names = [backend]
        else:
            names = [b.name for b in BACKENDS if platform in b.platforms]
        return [n for n in names if n in impls]

    specs = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in args]
    branches, refusals = {}, {}
    for platform in PLATFORMS:
        reasons = []
        for name in candidates_for(platform):
            fn = functools.partial(impls[name], interpret=platform == "cpu")
            try:
                jax.eval_shape(fn, *specs)  # refusals are raised while tracing
            except NotImplementedError as e:
                reasons.append(f"{name}: {e}")
                continue
            branches[platform] = fn
            break
        if platform not in branches and reasons:
            refusals[platform] = "; ".join(reasons)
    blocking = {p: why for p, why in refusals.items() if p in _target_platforms()} or (
        refusals if not branches else {}
    )
    if blocking:
        why = "; ".join(f"on {p}: {r}" for p, r in blocking.items())
        raise NotImplementedError(f"{op_name} has no Pallas kernel for this case {why}")
    if not branches:
        raise NotImplementedError(f"{op_name}: no implementation for backend {backend!r}")
    return jax.lax.platform_dependent(*args, **branches)


# --- Triton compiler parameters -------------------------------------------------------
#
# JAX 0.11 deprecates the Pallas Triton lowering (in favour of Mosaic GPU) and warns on
# every lowering. Our GPU kernels use it on purpose until the Mosaic GPU backends land, so
# the warning would only be noise to our users -- but it must keep reaching code that
# is *not* ours. It is raised inside the lowering rule, long after our Python frames
# have returned, so a ``catch_warnings`` around our call cannot reach it. Instead our
# kernels pass a private subclass of the Triton params, whose lowering rule is the
# stock one run under a filter for that one message: other users' Triton kernels still
# warn. If JAX's internals move, we fall back to the stock params (and the warning).


@dataclasses.dataclass(frozen=True)
class _FusedvjpTritonParams(plgpu.CompilerParams):
    pass


def _register_quiet_triton_rule() -> bool:
    try:
        from jax._src.pallas import core as pallas_core
        from jax._src.pallas.triton import pallas_call_registration as triton_reg
    except ImportError:  # pragma: no cover - depends on the jax build
        return False
    stock_rule = getattr(triton_reg, "pallas_call_lowering", None)
    register = getattr(pallas_core, "register_lowering_rule", None)
    if stock_rule is None or register is None:  # pragma: no cover
        return False

    @functools.wraps(stock_rule)
    def quiet_rule(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning
            )
            return stock_rule(*args, **kwargs)

    register(_FusedvjpTritonParams, quiet_rule, "gpu")
    return True


_QUIET_TRITON = _register_quiet_triton_rule()


def triton_params(num_warps: int, num_stages: int) -> plgpu.CompilerParams:
    """Explicit Triton compiler params (without them some jax versions pick Mosaic GPU)."""
    cls = _FusedvjpTritonParams if _QUIET_TRITON else plgpu.CompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def tpu_interpret(interpret: bool):
    """The ``interpret=`` argument of a Mosaic TPU ``pallas_call``.

    ``pltpu.InterpretParams()``, not ``interpret=True``: the TPU interpreter simulates
    VMEM, the block pipeline and its DMAs, fills uninitialised memory and reads past an
    edge with NaN, and raises on an output block revisited out of order (which the
    dense dW+db kernel's resident db block relies on). ``interpret=True`` would run the
    generic interpreter, which checks none of that.
    """
    return pltpu.InterpretParams() if interpret else False


def validate_block_fields(obj: Any, fields: tuple[str, ...]) -> None:
    """For a block-size dataclass's ``__post_init__``: every field a positive int, and
    ``num_warps`` (if present) a power of two. Errors name the class, field and value."""
    cls = type(obj).__name__
    for field in fields:
        value = getattr(obj, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{cls}.{field} must be a positive int, got {value!r}")
    warps = getattr(obj, "num_warps", None)
    if warps is not None and not is_power_of_two(warps):
        raise ValueError(f"{cls}.num_warps must be a power of two, got {warps}")


def check_block_sizes(block_sizes: Any, cls: type, backend: str | None, *dims: int) -> None:
    """Checks explicit block sizes (a ``cls`` with ``check(*dims, backend_name)``) against
    the backends they will be traced for: ``backend=None`` traces a branch per lowering
    platform, so the tile must suit every backend."""
    if block_sizes is None:
        return
    if not isinstance(block_sizes, cls):
        raise TypeError(f"block_sizes must be a {cls.__name__} or None, got {block_sizes!r}")
    check_backend(backend)
    for name in (backend,) if backend else BACKEND_NAMES:
        block_sizes.check(*dims, name)
