"""Benchmark cases: which (op, shape, dtype, mode) to time, and how to build each impl.

The ops, their inputs, shapes, bytes and flops come from :mod:`fusedvjp.ops.registry`
(the definitions the numerics tests use too); this module adds only the whole MNIST SGD
step (``mnist_train_step``), which has no registry entry, and the small ``--quick``
shapes. The CLI (``python -m fusedvjp.bench``) and the pytest-benchmark suite
(``bench/test_bench_ops.py``) both build their cases here. Nothing runs at import.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusedvjp.bench import baselines
from fusedvjp.model import mlp
from fusedvjp.ops import registry

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
MODES = ("fwd", "fwd+bwd")
# "user": the op as its users write it (bench/baselines.py), the baseline with "xla".
USER = "user"
IMPLS = ("pallas", USER, "xla", "jnp")
SHAPE_SETS = ("mnist", "llm")
TRAIN_STEP = "mnist_train_step"
# Short names accepted by --ops and shown in tables.
ALIASES = {
    "xent": "softmax_cross_entropy_with_integer_labels",
    "xent_prob": "softmax_cross_entropy",
}
SHORT_NAMES = {name: alias for alias, name in ALIASES.items()}

# mnist_train_step's shape (B, D, H, C): batch 128 of 784 pixels -> 512 tanh -> 10 classes.
TRAIN_STEP_SHAPE = (128, 784, 512, 10)
TRAIN_STEP_LR = 0.01
# --quick caps each dimension so the whole path runs in seconds in interpret mode on CPU.
QUICK_CAPS = {2: (64, 1000), 3: (64, 128, 64), 4: (64, 128, 64, 10)}

# Inputs smaller than this rotate among several copies, so repeated calls do not find
# them in the L2 cache (50 MiB on an H100) and flatter the result.
ROTATE_BELOW_BYTES = 64 * 2**20
MAX_COPIES = 32


def all_op_names() -> tuple[str, ...]:
    """Every op the benchmark knows: the registry's public names and ``mnist_train_step``."""
    return (*registry.REGISTRY, TRAIN_STEP)


def resolve_op(name: str) -> str:
    """Maps an alias (``xent``) to its public name; raises ValueError for unknown names."""
    name = ALIASES.get(name, name)
    if name not in all_op_names():
        known = sorted((*all_op_names(), *ALIASES))
        raise ValueError(f"unknown op {name!r}; expected one of {', '.join(known)}")
    return name


def short_name(op: str) -> str:
    """The alias of ``op`` for tables (``xent``), or ``op`` itself."""
    return SHORT_NAMES.get(op, op)


def quick_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A tiny stand-in for ``shape``: each dimension capped (e.g. (64, 128, 64), (64, 1000))."""
    caps = QUICK_CAPS[len(shape)]
    return tuple(min(d, c) for d, c in zip(shape, caps))


# --- mnist_train_step: bytes and flops summed over its layers --------------------------------


def _train_step_cost(kind: str) -> Callable[[tuple[int, ...], Any, str], int]:
    def cost(shape, dtype, mode):
        del mode  # a training step is always forward + backward
        b, d, h, c = shape
        s = jnp.dtype(dtype).itemsize
        layer1 = registry.get("dense_tanh")
        layer2 = registry.get("dense")
        loss = registry.get("softmax_cross_entropy_with_integer_labels")
        n_params = d * h + h + h * c + c
        total = sum(getattr(spec, kind)(shape_, dtype, "fwd+bwd")
                    for spec, shape_ in ((layer1, (b, d, h)), (layer2, (b, h, c)), (loss, (b, c))))
        if kind == "bytes":
            # The first layer needs no dx (the images are not differentiated): drop its
            # write; the SGD update reads each gradient once more and writes the new params.
            return total - b * d * s + 2 * n_params * s
        # No dx matmul for the first layer; the update is one multiply-add per parameter.
        return total - 2 * b * d * h + 2 * n_params

    return cost


# --- inputs ----------------------------------------------------------------------------------


class DeviceRng:
    """The part of ``numpy.random.Generator`` that ``make_inputs`` uses, drawn on the device.

    ``OpSpec.make_inputs(rng, shape, dtype)`` written for numpy runs unchanged with this
    stand-in, so LLM-size inputs (2 GiB of logits) are drawn in milliseconds on the
    accelerator instead of minutes of host time. Draws are random normal / uniform /
    integer, never zeros.
    """

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)

    def _next(self) -> jax.Array:
        self._key, key = jax.random.split(self._key)
        return key

    def standard_normal(self, size=None, dtype=None) -> jax.Array:
        del dtype  # f32 is plenty for inputs that are cast to f32 or bf16 anyway
        return jax.random.normal(self._next(), _shape(size), jnp.float32)

    def random(self, size=None, dtype=None) -> jax.Array:
        del dtype
        return jax.random.uniform(self._next(), _shape(size), jnp.float32)

    def uniform(self, low=0.0, high=1.0, size=None) -> jax.Array:
        return jax.random.uniform(self._next(), _shape(size), jnp.float32, low, high)

    def integers(self, low, high=None, size=None, dtype=None, endpoint=False) -> jax.Array:
        del dtype
        if high is None:
            low, high = 0, low
        return jax.random.randint(self._next(), _shape(size), low, high + 1 if endpoint else high, jnp.int32)


def _shape(size) -> tuple[int, ...]:
    if size is None:
        return ()
    return (int(size),) if np.ndim(size) == 0 else tuple(int(d) for d in size)


def _draw(make: Callable[[Any], tuple], seed: int) -> tuple:
    """``make(rng)`` with a :class:`DeviceRng`; with numpy's generator if the stand-in lacks a method."""
    try:
        return make(DeviceRng(seed))
    except (AttributeError, TypeError) as e:
        warnings.warn(f"drawing inputs on the host (slow at LLM shapes): DeviceRng cannot serve make_inputs: {e}",
                      stacklevel=2)
        return make(np.random.default_rng(seed))


def _train_step_inputs(rng, shape, dtype) -> tuple:
    """(params, x, y) as :func:`mlp.init_params` draws them, but with random biases (never zeros)."""
    b, d, h, c = shape
    params = {}
    for i, (fan_in, fan_out) in enumerate(((d, h), (h, c)), start=1):
        params[f"w{i}"] = jnp.asarray(rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in), dtype)
        params[f"b{i}"] = jnp.asarray(rng.standard_normal((fan_out,)) * 0.1, dtype)
    x = jnp.asarray(rng.standard_normal((b, d)), dtype)
    y = jnp.asarray(rng.integers(0, c, (b,)), jnp.int32)
    return params, x, y


def _nbytes(tree) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(tree))


# --- cases -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One row group of the benchmark: an op at a shape, dtype and mode, for every impl.

    Attributes:
      op: the public name in ``fusedvjp.ops``, or ``"mnist_train_step"``.
      shape: the op's shape (registry convention, e.g. ``(M, K, N)``, ``(N, V)``;
        ``(B, D, H, C)`` for ``mnist_train_step``).
      dtype: ``"f32"`` or ``"bf16"``.
      mode: ``"fwd"`` or ``"fwd+bwd"`` (``mnist_train_step`` is always ``"fwd+bwd"``).
      shape_set: ``"mnist"`` or ``"llm"``; ``quick`` says the shape was shrunk.
    """

    op: str
    shape: tuple[int, ...]
    dtype: str
    mode: str
    shape_set: str = "mnist"
    quick: bool = False

    @property
    def spec(self) -> registry.OpSpec | None:
        return None if self.op == TRAIN_STEP else registry.get(self.op)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        return f"{short_name(self.op)}-{'x'.join(map(str, self.shape))}-{self.dtype}-{self.mode}"

    def bytes(self) -> int:
        """Minimal HBM traffic of this case (the registry's count, summed over layers for the step)."""
        cost = _train_step_cost("bytes") if self.spec is None else self.spec.bytes
        return int(cost(self.shape, self.jnp_dtype, self.mode))

    def flops(self) -> int:
        """Floating-point operations of this case."""
        cost = _train_step_cost("flops") if self.spec is None else self.spec.flops
        return int(cost(self.shape, self.jnp_dtype, self.mode))

    def make_inputs(self, seed: int) -> tuple:
        """One random input set: the op's arrays, plus a random cotangent in fwd+bwd mode.

        Arrays are drawn on the default device by the registry's ``make_inputs``.
        """
        if self.spec is None:
            return _draw(lambda rng: _train_step_inputs(rng, self.shape, self.jnp_dtype), seed)
        spec = self.spec

        def make(rng):
            args = tuple(spec.make_inputs(rng, self.shape, self.jnp_dtype))
            if self.mode == "fwd":
                return args
            out = jax.eval_shape(lambda *a: spec.reference(*a), *args)
            return (*args, jnp.asarray(rng.standard_normal(out.shape), out.dtype))

        return _draw(make, seed)

    def input_copies(self, seed: int, max_copies: int = MAX_COPIES) -> list[tuple]:
        """Input sets placed on the device: several when one set is small enough to sit in L2."""
        first = jax.device_put(self.make_inputs(seed))
        nbytes = _nbytes(first)
        copies = 1 if nbytes >= ROTATE_BELOW_BYTES else min(max_copies, -(-ROTATE_BELOW_BYTES // max(nbytes, 1)))
        return [first] + [jax.device_put(self.make_inputs(seed + i)) for i in range(1, copies)]

    def has_impl(self, impl: str) -> bool:
        """Whether this case has a row for ``impl``: every impl but ``"user"``, which only
        an op with a registered baseline (:mod:`fusedvjp.bench.baselines`) has."""
        return impl != USER or self.spec is None or baselines.get(self.op) is not None

    def function(self, impl: str) -> Callable[..., Any]:
        """The function to jit for ``impl``; it takes one input set from :meth:`make_inputs`.

        fwd: ``op(*args, impl=impl)``, or for ``impl="user"`` the users' formulation
        (:mod:`fusedvjp.bench.baselines`). fwd+bwd: ``jax.vjp`` of that with respect to
        ``spec.diff_argnums``, applied to the cotangent (the last argument); returns
        ``(out, grads)``. Identical for every impl, so only the implementation differs.
        ``mnist_train_step``: one :func:`mlp.sgd_step` (its donation is inert when nested in
        this jit, so the same inputs can be reused), or :func:`baselines.sgd_step` for "user".

        Raises:
          ValueError: ``impl="user"`` for an op with no registered baseline.
        """
        if self.spec is None:
            if impl == USER:
                return lambda params, x, y: baselines.sgd_step(params, x, y, TRAIN_STEP_LR)
            return functools.partial(_train_step, impl=impl)
        spec = self.spec
        if impl == USER:
            if not self.has_impl(USER):
                raise ValueError(f"{self.op} has no user baseline (bench/baselines.py registers none)")
            op = baselines.get(self.op).fn
        else:
            op = functools.partial(spec.fn, impl=impl)
        return self.wrap(op)

    def wrap(self, op: Callable[..., Any]) -> Callable[..., Any]:
        """``op`` (a function of the op's arrays, e.g. a peer library's) in this case's mode,
        the way :meth:`function` builds our impls: ``op`` itself for fwd; for fwd+bwd
        ``jax.vjp`` w.r.t. ``spec.diff_argnums`` applied to the cotangent."""
        return op if self.mode == "fwd" else functools.partial(_fwd_bwd, op, self.spec.diff_argnums)


def _train_step(params, x, y, *, impl):
    return mlp.sgd_step(params, x, y, TRAIN_STEP_LR, impl)


def _fwd_bwd(op, diff_argnums, *args_and_cotangent):
    *args, g = args_and_cotangent
    out, vjp = registry.vjp_wrt(op, args, diff_argnums)
    return out, vjp(g)



def check_choices(*checks: tuple[str, Sequence[str], Sequence[str]]) -> None:
    """Each ``(kind, given, known)``: every given name is known, else a ValueError naming them."""
    for kind, given, known in checks:
        bad = [g for g in given if g not in known]
        if bad:
            raise ValueError(f"unknown {kind} {bad}; expected some of {', '.join(known)}")

def build_cases(
    ops: Iterable[str] | None = None,
    shape_sets: Iterable[str] = SHAPE_SETS,
    dtypes: Iterable[str] = tuple(DTYPES),
    modes: Iterable[str] = MODES,
    quick: bool = False,
) -> list[Case]:
    """The cases of a run, in order: shape set, dtype, op, shape, mode.

    Args:
      ops: public names or aliases (default: every registry op and ``mnist_train_step``).
      shape_sets: ``"mnist"`` (registry mnist shapes and ``mnist_train_step``) and/or
        ``"llm"`` (registry llm shapes).
      dtypes: names in :data:`DTYPES`.
      modes: ``"fwd"`` and/or ``"fwd+bwd"``; ``mnist_train_step`` runs only in fwd+bwd.
      quick: shrink every shape with :func:`quick_shape` (duplicates dropped).

    Returns:
      The list of :class:`Case`.

    Raises:
      ValueError: an unknown op, shape set, dtype or mode.
    """
    op_names = list(all_op_names()) if ops is None else [resolve_op(o) for o in ops]
    shape_sets, dtypes, modes = list(shape_sets), list(dtypes), list(modes)
    check_choices(("shape set", shape_sets, SHAPE_SETS), ("dtype", dtypes, DTYPES), ("mode", modes, MODES))
    out, seen = [], set()
    # dtype outside op: with --dtypes bf16,f32 every bf16 row of a shape set comes first,
    # so a run stopped by a time limit loses f32 rows, not whole ops.
    for shape_set in shape_sets:
        for dtype in dtypes:
            for op in dict.fromkeys(op_names):
                if op == TRAIN_STEP:
                    shapes, op_modes = ([TRAIN_STEP_SHAPE] if shape_set == "mnist" else []), ("fwd+bwd",)
                else:
                    shapes, op_modes = registry.get(op).bench_shapes.get(shape_set, []), MODES
                for shape in shapes:
                    shape = quick_shape(shape) if quick else tuple(shape)
                    for mode in (m for m in modes if m in op_modes):
                        key = (op, shape, dtype, mode)
                        if key not in seen:
                            seen.add(key)
                            out.append(Case(op, shape, dtype, mode, shape_set, quick))
    return out
