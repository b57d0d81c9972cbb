"""Plumbing shared by every kernel file: which implementation runs on which platform.

A *backend* is one way to compile a Pallas kernel (``"mosaic_gpu"`` for Hopper GPUs
through Mosaic GPU, ``"triton"`` for any GPU through the Pallas Triton lowering,
``"mosaic_tpu"`` for TPUs). Each kernel file provides one
implementation per backend it supports, as a function ``fn(*arrays, interpret: bool)``
that raises ``NotImplementedError(reason)`` at trace time for a case it cannot serve.
:func:`platform_dispatch` turns such a table into one traced function with a branch
per lowering platform (``jax.lax.platform_dependent``), so the choice follows the
platform actually lowered for -- not ``jax.default_backend()`` -- and lowering for an
abstract H100 or TPU on a CPU-only machine really lowers the compiled kernel. On CPU
the kernels run in interpret mode; that is how the tests exercise them.

Adding a backend is one more entry in :data:`BACKENDS` and one more module in an op's
kernel package (``kernels/<op>/<backend>.py``) and its table. An op need not implement
every backend: a platform's candidates are the listed backends the op's table has.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import json
import math
import os
import pathlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
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
    # Hopper only, bf16: an implementation refuses other GPUs at trace time (is_hopper).
    Backend("mosaic_gpu", ("cuda",)),
    Backend("triton", ("cuda", "rocm")),
    Backend("mosaic_tpu", ("tpu",)),
)
BACKEND_NAMES = tuple(b.name for b in BACKENDS)
# On CPU the kernels run interpreted; by default the GPU kernel is the one interpreted.
DEFAULT_INTERPRET_BACKEND = "triton"
# ...except on arrays that vary over shard_map's manual axes: JAX's generic interpreter
# (which runs the Triton kernels on CPU) cannot type those (its grid loop carries
# outputs created replicated), while the TPU interpreter simulates devices under
# shard_map and does.
MANUAL_INTERPRET_BACKEND = "mosaic_tpu"


def backend_module(package: str, backend: str, available: tuple[str, ...] = ("triton", "mosaic_tpu")):
    """The module ``<package>.<backend>`` (an op's kernels for one backend), imported on
    demand: a block-size dataclass in ``<package>.common`` calls this, and the backend
    modules import ``common``, so a top-level import would be a cycle."""
    if backend not in available:
        raise ValueError(f"unknown backend {backend!r} for {package}; expected one of {available}")
    return importlib.import_module(f"{package}.{backend}")


_DISABLED: contextvars.ContextVar = contextvars.ContextVar("fusedvjp_disabled_backends", default=frozenset())


@contextlib.contextmanager
def disabled_backends(*names: str) -> Iterator[None]:
    """While active, ``backend=None`` dispatch skips these backends: e.g. the Triton sweep
    on an H100 (where Mosaic GPU would otherwise take the bf16 dense cases)."""
    for name in names:
        check_backend(name)
    token = _DISABLED.set(_DISABLED.get() | frozenset(names))
    try:
        yield
    finally:
        _DISABLED.reset(token)


def check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKEND_NAMES} or None")


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# jax.default_backend() / AbstractDevice.platform -> lowering platforms.
_LOWERING_PLATFORMS = {"cpu": ("cpu",), "gpu": ("cuda", "rocm"), "cuda": ("cuda",), "rocm": ("rocm",), "tpu": ("tpu",)}


def target_platforms() -> set[str]:
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
            names = [backend or (MANUAL_INTERPRET_BACKEND if varying else DEFAULT_INTERPRET_BACKEND)]
        elif backend is not None:
            names = [backend]
        else:
            names = [b.name for b in BACKENDS if platform in b.platforms and b.name not in _DISABLED.get()]
        return [n for n in names if n in impls]

    mat = _manual_axis_type(args)
    varying = mat is not None and bool(mat.varying)
    token = _ARG_MANUAL_AXIS_TYPE.set(mat)
    try:
        return _dispatch(impls, args, candidates_for, op_name, backend)
    finally:
        _ARG_MANUAL_AXIS_TYPE.reset(token)


# Inside shard_map (check_vma=True) a pallas_call's outputs must say which mesh axes they
# vary over. A kernel's outputs vary over every axis any of its inputs varies over (a
# block of rows of x gives that block of rows of y), so platform_dispatch records the
# union of its arguments' and out_struct attaches it to each output.
_ARG_MANUAL_AXIS_TYPE: contextvars.ContextVar = contextvars.ContextVar("fusedvjp_manual_axis_type", default=None)


def _manual_axis_type(args):
    mats = [getattr(jax.typeof(a), "manual_axis_type", None) for a in args if isinstance(a, jax.Array)]
    mats = [m for m in mats if m is not None]
    if not mats:
        return None
    varying = frozenset().union(*(m.varying for m in mats))
    return mats[0].update(varying=varying)


def out_struct(shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """A kernel output's ``out_shape``: ``jax.ShapeDtypeStruct(shape, dtype)``, varying
    over the mesh axes the kernel's inputs vary over (see ``_ARG_MANUAL_AXIS_TYPE``)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=_ARG_MANUAL_AXIS_TYPE.get())


def _dispatch(impls, args, candidates_for, op_name, backend):
    branches, refusals = {}, {}
    for platform in PLATFORMS:
        reasons = []
        for name in candidates_for(platform):
            fn = functools.partial(impls[name], interpret=platform == "cpu")
            try:
                # On the arguments themselves, not fresh ShapeDtypeStructs: inside shard_map
                # their abstract values carry the mesh axes each one varies over.
                jax.eval_shape(fn, *args)  # refusals are raised while tracing
            except NotImplementedError as e:
                reasons.append(f"{name}: {e}")
                continue
            branches[platform] = fn
            break
        if platform not in branches and reasons:
            refusals[platform] = "; ".join(reasons)
    blocking = {p: why for p, why in refusals.items() if p in target_platforms()} or (
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
# every lowering. Our Triton kernels use it on purpose: they serve every GPU case the
# Mosaic GPU kernels do not (non-Hopper GPUs, f32, every op but dense), so the warning
# would only be noise to our users -- but it must keep reaching code that is *not* ours.
# It is raised inside the lowering rule, long after our Python frames have returned, so
# a ``catch_warnings`` around our call cannot reach it. Instead our
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


# Tile-rows per program group in Triton's grouped program order (`grouped_program`);
# 8 as in Triton's matmul tutorial.
GROUP_ROWS = 8


def grouped_program(n_rows: int, n_cols: int):
    """(row, column) tile of this program of a 1-D Triton grid over ``n_rows x n_cols``
    tiles, walked in groups of ``GROUP_ROWS`` tile-rows: the programs resident at once share
    a few row tiles of the first operand and sweep the column tiles of the second, so a
    wave re-reads its operands from L2 instead of HBM.

    ``lax.div``/``lax.rem`` on these non-negative ints (``rows_here >= 1``), not ``//``/``%``:
    jnp's floor-division sign fix-ups would leave i32 values that the offset checker of
    tests/test_offsets.py cannot bound, and it must prove every 32-bit offset part bounded.
    """
    pid = pl.program_id(0)
    # lax.div/rem take one dtype: the constants in the program id's (int64 under x64).
    per_group = jnp.asarray(GROUP_ROWS * n_cols, pid.dtype)
    first = lax.div(pid, per_group) * GROUP_ROWS
    rows_here = jnp.minimum(n_rows - first, GROUP_ROWS)
    in_group = lax.rem(pid, per_group)
    return first + lax.rem(in_group, rows_here), lax.div(in_group, rows_here)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def class_indices(labels: jax.Array, v: int) -> jax.Array:
    """Integer labels of any integer dtype -> int32 class indices, -1 for every label
    outside ``[0, v)``: the one place the cross-entropy ops and kernels widen labels.

    The range check never wraps: ``v`` is compared in the labels' own dtype only where
    that dtype holds it (``v = 300`` is 44 in uint8, so a uint8 label is below 300
    whatever it is), and the sign test only for signed dtypes. Only then is the label
    narrowed or widened to int32, which holds every index in ``[0, v)``: an int64 label
    ``2**32 + 1`` (x64) or a uint32 label ``2**31`` stays out of range instead of
    wrapping to class 1 or to a negative number, and -1 is never unsigned (255 in uint8
    would be a class at V > 255).
    """
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype} (shape {labels.shape})")
    int32_max = int(jnp.iinfo(jnp.int32).max)
    if v > int32_max + 1:
        raise ValueError(f"V={v} classes do not fit int32 class indices (V <= 2**31)")
    info = jnp.iinfo(labels.dtype)
    valid = jnp.ones(labels.shape, bool) if info.min == 0 else labels >= 0
    if v <= info.max:
        valid = valid & (labels < jnp.asarray(v, labels.dtype))
    return jnp.where(valid, labels.astype(jnp.int32), -1)


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


def check_block_sizes(block_sizes: Any, cls: type, backend: str | None, *dims: int,
                      backends: tuple[str, ...] = ("triton", "mosaic_tpu")) -> None:
    """Checks explicit block sizes (a ``cls`` with ``check(*dims, backend_name)``) against
    the backends they will be traced for: ``backend=None`` traces a branch per lowering
    platform, so the tile must suit every backend the op has (``backends``)."""
    if block_sizes is None:
        return
    if not isinstance(block_sizes, cls):
        raise TypeError(f"block_sizes must be a {cls.__name__} or None, got {block_sizes!r}")
    check_backend(backend)
    for name in (backend,) if backend else backends:
        block_sizes.check(*dims, name)



def check_variance_eps(name: str, value: float, dtype) -> None:
    """Raises ValueError unless ``value``, an eps added to a variance in ``dtype``, keeps
    ``rsqrt(var + eps)`` and its derivative finite for every ``var >= 0``.

    The derivative of ``rsqrt(v)`` is ``-rsqrt(v) / (2 v)``, about ``v**-1.5``: it is finite
    for ``v >= (max / 8)**(-2/3)`` (8.2e-26 in float32). A smaller eps (1e-50 is 0 in
    float32; 1e-40 a subnormal, flushed to 0) makes a constant row's output or its
    autodiff gradient (``impl="xla"``) inf or NaN.
    """
    info = jnp.finfo(dtype)
    lo, hi = (float(info.max) / 8) ** (-2 / 3), float(info.max)
    rounded = float(np.asarray(value, info.dtype)) if abs(float(value)) <= hi else float(value) * math.inf
    if not lo <= rounded <= hi:
        raise ValueError(
            f"{name}={value!r} is {rounded!r} in {info.dtype}, the dtype it is added in; it must be in "
            f"[{lo:.3g}, {hi:.4g}] there: a smaller one makes rsqrt(var + {name}) or its derivative of a constant "
            f"row inf (1e-50 is 0 in float32, and subnormals flush to 0), and NaN follows"
        )

# --- measured block sizes: the tuning table ----------------------------------------------
#
# `bench/sweep.py` times the legal block sizes of each kernel on a device at the benchmark
# shapes and writes the winners, with their evidence, to a table that ships with the package
# (`kernels/tuning.json`). Each block-size dataclass's `default()` asks the table first: a hit
# is a measured config; a miss falls back to the hand-written heuristic. Entries are keyed by
# the device kind (`jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3") and then by
# `kernel/backend/dtype/bucket`, the bucket being each dimension rounded up to a power of two
# (in the order `default()` takes them), so one measurement serves the shapes near it.

TUNING_FILE = pathlib.Path(__file__).with_name("tuning.json")
# Another table to read instead of the packaged one (the device check reads the one its
# sweep just wrote).
TUNING_ENV = "FUSEDVJP_TUNING"


def tuning_path() -> pathlib.Path:
    """The table in use: ``$FUSEDVJP_TUNING`` if set, else the packaged ``tuning.json``."""
    return pathlib.Path(os.environ.get(TUNING_ENV) or TUNING_FILE)


@functools.lru_cache(maxsize=8)
def _load_table(path: str, mtime_ns: int) -> dict[str, dict[str, dict]]:
    del mtime_ns  # part of the cache key: a rewritten table is read again
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ValueError(f"tuning table {path}: expected {{'entries': {{device_kind: {{key: entry}}}}}}")
    return entries


def tuning_table() -> dict[str, dict[str, dict]]:
    """``{device_kind: {key: {"config": {...}, "evidence": {...}}}}`` of :func:`tuning_path`
    (empty if the file does not exist)."""
    path = tuning_path()
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return {}
    return _load_table(str(path), mtime)


def tuning_key(kernel: str, dims: tuple[int, ...], dtype, backend: str) -> str:
    """``kernel/backend/dtype/bucket``, e.g. ``dense/triton/bfloat16/8192x4096x4096``."""
    bucket = "x".join(str(next_power_of_two(int(d))) for d in dims)
    return f"{kernel}/{backend}/{jnp.dtype(dtype).name}/{bucket}"


def device_kind() -> str:
    """The device being traced for: an abstract mesh's device (lowering for an H100 on a
    CPU), else the default device."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    kind = getattr(device, "device_kind", None)
    return str(kind) if kind else str(jax.devices()[0].device_kind)


# NVIDIA Hopper (sm_90) parts, by device kind: what the Mosaic GPU kernels (TMA, wgmma)
# are written for.
HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def is_hopper() -> bool:
    """Whether the GPU being traced for (an abstract mesh's device, else the default
    device) is a Hopper. False when no GPU is known, e.g. lowering for "cuda" from a
    CPU without an abstract mesh: then only the portable backends are candidates."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is None:
        if jax.default_backend() != "gpu":
            return False
        device = jax.devices()[0]
        capability = getattr(device, "compute_capability", None)
        if capability is not None:
            return str(capability).startswith("9.")
    return device.platform == "gpu" and any(k in str(device.device_kind) for k in HOPPER_KINDS)


# The CPU interpreter has no SMs: interpret mode (and lowering for "cuda" with no GPU
# known) sizes SM-bound grids and tiles as for an H100 SXM's 132.
INTERPRET_SMS = 132


def num_sms() -> int:
    """The streaming multiprocessors of the GPU being traced for: the abstract mesh's
    device's ``num_cores`` (JAX fills it from a GPU's ``core_count``; a compile-only
    topology's comes from its target spec, ``core_count`` in ``bench/gpu_targets/*.txtpb``),
    else the default device's ``core_count``; ``INTERPRET_SMS`` when neither is a GPU."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is not None:
        cores = device.num_cores if device.platform == "gpu" else None
    else:
        device = jax.devices()[0]
        cores = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return int(cores) if cores else INTERPRET_SMS


@dataclasses.dataclass
class TuningSession:
    """What :func:`tuning_session` yields: the lookups made while it was active.

    ``lookups``: one dict per ``default()`` that asked -- kernel, backend, dims, dtype, key,
    device kind, ``source`` ("forced", "table" or "heuristic") and the config it got
    (None for "heuristic": the caller computes it).
    """

    forced: Mapping[tuple[str, str], Any]
    lookups: list[dict] = dataclasses.field(default_factory=list)


_SESSION: contextvars.ContextVar[TuningSession | None] = contextvars.ContextVar("fusedvjp_tuning", default=None)


@contextlib.contextmanager
def tuning_session(forced: Mapping[tuple[str, str], Any] | None = None) -> Iterator[TuningSession]:
    """Records the block-size lookups traced inside it; the sweep's hook.

    Lookups happen while tracing, and JAX caches traces: call ``jax.clear_caches()`` before
    tracing inside a session whose ``forced`` differs from the last one.

    Args:
      forced: ``{(kernel, backend): block_sizes or None}``: those lookups return that
        instance (the sweep's candidate), or with None skip the table (the heuristic).
    """
    session = TuningSession(dict(forced or {}))
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)


def tuned_block_sizes(cls: type, kernel: str, dims: tuple[int, ...], dtype, backend: str) -> Any | None:
    """The measured block sizes for this case, or None (then ``default()`` uses its heuristic).

    Called first thing by each block-size dataclass's ``default()``. A table entry whose
    config this case cannot use (``cls.check`` refuses it, e.g. a TPU block larger than a
    dimension of the same bucket) is a miss.

    Args:
      cls: the block-size dataclass; the entry's ``config`` are its fields.
      kernel: the kernel family (``"dense"``, ``"softmax_cross_entropy"``, ``"layer_norm"``).
      dims: the dimensions ``default()`` was given, in its order.
      dtype: the input dtype.
      backend: ``"triton"`` or ``"mosaic_tpu"``.
    """
    session = _SESSION.get()
    key = tuning_key(kernel, dims, dtype, backend)
    record = dict(kernel=kernel, backend=backend, dims=tuple(int(d) for d in dims), dtype=jnp.dtype(dtype).name,
                  key=key)
    if session is not None and (kernel, backend) in session.forced:
        forced = session.forced[(kernel, backend)]
        session.lookups.append({**record, "device_kind": None, "source": "forced" if forced else "heuristic",
                                "config": dataclasses.asdict(forced) if forced else None})
        return forced
    kind = device_kind()
    entry = tuning_table().get(kind, {}).get(key)
    found = None
    if entry is not None:
        found = cls(**entry["config"])
        check = getattr(found, "check", None)
        if check is not None:
            try:
                check(*dims, backend)
            except ValueError:
                found = None
    if session is not None:
        session.lookups.append({**record, "device_kind": kind, "source": "table" if found else "heuristic",
                                "config": dataclasses.asdict(found) if found else None})
    return found
