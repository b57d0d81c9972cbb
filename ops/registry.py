"""One registry of ops: what the generic tests and the benchmark need to know about each.

A new op registers an :class:`OpSpec` here (see ``docs/adding-an-op.md``); the generic
numerics tests (forward and VJP of every impl against float64, interpret mode,
``check_grads``, GPU/TPU lowering) and the benchmark rows are generated from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusedvjp import ops

Shape = tuple[int, ...]
# make_inputs(rng, shape, dtype) -> positional arrays of the op (numpy rng: fresh inputs per test).
MakeInputs = Callable[[np.random.Generator, Shape, Any], tuple]
# cost(shape, dtype, mode) -> bytes or flops that mode must move or do at the least.
Cost = Callable[[Shape, Any, str], int]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What the generic tests and the benchmark need to know about one op.

    Attributes:
      name: the public function's name in ``fusedvjp.ops``.
      fn: the public function ``fn(*arrays, impl=..., **options)``.
      reference: the xla reference ``reference(*arrays, **options)`` (plain jnp).
      make_inputs: draws random valid inputs for a shape and dtype.
      abstract_inputs: the same inputs as ``jax.ShapeDtypeStruct`` (for lowering checks
        at shapes too large to materialize here).
      diff_argnums: positions of the arrays the VJP is taken with respect to.
      test_shapes: small shapes (odd sizes, size 1) for the generic CPU tests.
      options: option sets the tests run (each a dict of keyword arguments).
      bench_shapes: ``{"mnist": [...], "llm": [...]}`` shapes for the benchmark.
      lowering_shapes: ``(shape, dtype name)`` cases lowered for an abstract H100 and TPU.
      bytes: minimal HBM traffic of a mode ("fwd" or "fwd+bwd") at a shape and dtype.
      flops: floating-point operations of a mode.
      shape_names: what each entry of a shape means (for tables), e.g. ``("M", "K", "N")``.
    """

    name: str
    fn: Callable[..., jax.Array]
    reference: Callable[..., jax.Array]
    make_inputs: MakeInputs
    abstract_inputs: Callable[[Shape, Any], tuple]
    diff_argnums: tuple[int, ...]
    test_shapes: tuple[Shape, ...]
    bench_shapes: Mapping[str, Sequence[Shape]]
    lowering_shapes: tuple[tuple[Shape, str], ...]
    bytes: Cost
    flops: Cost
    shape_names: tuple[str, ...]
    options: tuple[Mapping[str, Any], ...] = ({},)


REGISTRY: dict[str, OpSpec] = {}


def differentiable(fn: Callable[..., Any], args: Sequence[Any], argnums: Sequence[int]):
    """``fn`` as a function of ``args[i]`` for ``i`` in ``argnums`` only, the others (labels,
    masks) held fixed. Returns ``(f, diff_args)`` with ``f(*diff_args) == fn(*args)``."""

    def f(*diff):
        full = list(args)
        for i, a in zip(argnums, diff, strict=True):
            full[i] = a
        return fn(*full)

    return f, tuple(args[i] for i in argnums)


def vjp_wrt(fn: Callable[..., Any], args: Sequence[Any], argnums: Sequence[int]):
    """``jax.vjp`` of ``fn(*args)`` with respect to ``args[argnums]``: ``(out, vjp_fn)``. The
    tests, the float64 oracle and the benchmark all take the VJP this one way."""
    f, diff = differentiable(fn, args, argnums)
    return jax.vjp(f, *diff)


def register(spec: OpSpec) -> OpSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"op {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> OpSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; registered: {sorted(REGISTRY)}") from None


def _itemsize(dtype) -> int:
    return jnp.dtype(dtype).itemsize


def _normal(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


# --- dense / dense_tanh / dense_gelu: shape (M, K, N) ------------------------------------


def _dense_inputs(rng, shape, dtype):
    m, k, n = shape
    # Scaled so z = x @ w + b is O(1): tanh is then neither linear nor saturated, and gelu
    # is seen on both sides of its minimum (z = -0.75).
    return (_normal(rng, (m, k), dtype), _normal(rng, (k, n), dtype, 1 / math.sqrt(k)), _normal(rng, (n,), dtype, 0.5))


def _dense_abstract(shape, dtype):
    m, k, n = shape
    return (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((k, n), dtype), jax.ShapeDtypeStruct((n,), dtype))


def _dense_bytes(shape, dtype, mode):
    m, k, n = shape
    s = _itemsize(dtype)
    fwd = (m * k + k * n + n + m * n) * s  # read x, w, b; write a
    if mode == "fwd":
        return fwd
    # backward: read x, w, the residual (a for tanh, z for gelu), g; write dx, dw, db
    return fwd + (m * k + k * n + 2 * m * n + m * k + k * n + n) * s


def _dense_gelu_bytes(shape, dtype, mode):
    # Differentiated, the gelu forward also writes z (its backward's residual).
    m, _, n = shape
    return _dense_bytes(shape, dtype, mode) + (0 if mode == "fwd" else m * n * _itemsize(dtype))


def _dense_flops(shape, dtype, mode):
    m, k, n = shape
    fwd = 2 * m * k * n
    return fwd if mode == "fwd" else 3 * fwd  # dx and dw are one matmul each


_DENSE_COMMON = dict(
    make_inputs=_dense_inputs,
    abstract_inputs=_dense_abstract,
    diff_argnums=(0, 1, 2),
    test_shapes=((37, 784, 10), (1, 1, 1), (128, 512, 10)),
    lowering_shapes=(((128, 784, 512), "f32"), ((128, 512, 10), "f32"), ((8192, 4096, 4096), "bf16")),
    bytes=_dense_bytes,
    flops=_dense_flops,
    shape_names=("M", "K", "N"),
)

register(OpSpec(
    name="dense_tanh",
    fn=ops.dense_tanh,
    reference=lambda x, w, b: ops.dense_reference(x, w, b, activation="tanh"),
    bench_shapes={"mnist": [(128, 784, 512)], "llm": [(8192, 4096, 4096)]},
    **_DENSE_COMMON,
))

register(OpSpec(
    name="dense_gelu",
    fn=functools.partial(ops.dense, activation="gelu"),
    # What a user writes: jax.nn.gelu(x @ w + b, approximate=True), the bias and gelu in f32.
    reference=lambda x, w, b: ops.dense_reference(x, w, b, activation="gelu"),
    # A transformer MLP's up-projection (d_model 4096 -> 4 * 4096 would be 4x the flops;
    # the same 8192 x 4096 x 4096 as dense_tanh keeps the two comparable).
    bench_shapes={"mnist": [], "llm": [(8192, 4096, 4096)]},
    **{**_DENSE_COMMON, "bytes": _dense_gelu_bytes},
))

register(OpSpec(
    name="dense",
    fn=ops.dense,
    reference=lambda x, w, b: ops.dense_reference(x, w, b),
    bench_shapes={"mnist": [(128, 512, 10)], "llm": []},
    **_DENSE_COMMON,
))


# --- cross-entropy: shape (N, V) -----------------------------------------------------------


def _xent_int_inputs(rng, shape, dtype):
    n, v = shape
    # Logits of a few units: with large random logits an unmasked padding column would
    # vanish in the logsumexp and hide a bug.
    return (_normal(rng, (n, v), dtype, 2.0), jnp.asarray(rng.integers(0, v, (n,)), jnp.int32))


def _xent_prob_inputs(rng, shape, dtype):
    n, v = shape
    t = rng.random((n, v))
    return (_normal(rng, (n, v), dtype, 2.0), jnp.asarray(t / t.sum(-1, keepdims=True), dtype))


def _xent_int_abstract(shape, dtype):
    n, v = shape
    return (jax.ShapeDtypeStruct((n, v), dtype), jax.ShapeDtypeStruct((n,), jnp.int32))


def _xent_prob_abstract(shape, dtype):
    n, v = shape
    return (jax.ShapeDtypeStruct((n, v), dtype), jax.ShapeDtypeStruct((n, v), dtype))


def _xent_bytes(label_row: bool):
    def cost(shape, dtype, mode):
        n, v = shape
        s = _itemsize(dtype)
        # fwd: one read of the logits (and label rows); fwd+bwd with recompute: read the
        # logits twice, write dlogits once -- the 2-reads-1-write floor.
        # Probability labels add a read of the label rows per pass and, since they are
        # differentiable, a write of dlabels.
        rows = 2 if label_row else 1
        # Per row: the f32 loss, and the residual (row max, log-sum) written and read back.
        if mode == "fwd":
            return rows * n * v * s + 12 * n
        return 2 * rows * n * v * s + rows * n * v * s + 24 * n

    return cost


def _xent_flops(shape, dtype, mode):
    n, v = shape
    return (4 if mode == "fwd" else 9) * n * v  # exp, max, sum, compare per element (+ recompute)


_XENT_LOWERING = (((128, 10), "f32"), ((1000, 32003), "f32"), ((8192, 128256), "bf16"))

register(OpSpec(
    name="softmax_cross_entropy_with_integer_labels",
    fn=ops.softmax_cross_entropy_with_integer_labels,
    reference=ops.softmax_cross_entropy_with_integer_labels_reference,
    make_inputs=_xent_int_inputs,
    abstract_inputs=_xent_int_abstract,
    diff_argnums=(0,),
    test_shapes=((37, 10), (1, 1), (5, 1000), (3, 32003)),
    options=({}, {"label_smoothing": 0.1, "z_loss": 1e-3}),
    bench_shapes={"mnist": [(128, 10)], "llm": [(8192, 32768), (8192, 131072)]},
    lowering_shapes=_XENT_LOWERING,
    bytes=_xent_bytes(label_row=False),
    flops=_xent_flops,
    shape_names=("N", "V"),
))

register(OpSpec(
    name="softmax_cross_entropy",
    fn=ops.softmax_cross_entropy,
    reference=ops.softmax_cross_entropy_reference,
    make_inputs=_xent_prob_inputs,
    abstract_inputs=_xent_prob_abstract,
    diff_argnums=(0, 1),
    test_shapes=((37, 10), (1, 1), (5, 1000)),
    bench_shapes={"mnist": [(128, 10)], "llm": [(8192, 32768)]},
    lowering_shapes=_XENT_LOWERING[:2],
    bytes=_xent_bytes(label_row=True),
    flops=_xent_flops,
    shape_names=("N", "V"),
))


# --- linear + cross-entropy: shape (N, D, V) -----------------------------------------------


def _lce_inputs(rng, shape, dtype):
    n, d, v = shape
    # Logits x w + b of a few units (as the cross-entropy's inputs): w ~ 2 / sqrt(D).
    return (_normal(rng, (n, d), dtype), _normal(rng, (d, v), dtype, 2 / math.sqrt(d)), _normal(rng, (v,), dtype, 0.5),
            jnp.asarray(rng.integers(0, v, (n,)), jnp.int32))


def _lce_abstract(shape, dtype):
    n, d, v = shape
    return (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), dtype), jax.ShapeDtypeStruct((v,), dtype),
            jax.ShapeDtypeStruct((n,), jnp.int32))


def _lce_bytes(shape, dtype, mode):
    n, d, v = shape
    s = _itemsize(dtype)
    operands = (n * d + d * v + v) * s
    # fwd: read x, w, b and the labels once; write the f32 loss and the residual (row
    # max, log-sum) -- never the [N, V] logits.
    fwd = operands + 4 * n + 12 * n
    if mode == "fwd":
        return fwd
    # backward: read x, w, b, labels, the residual and g again (the logits are
    # recomputed); write dx, dW, db.
    return fwd + operands + 16 * n + operands


def _lce_flops(shape, dtype, mode):
    n, d, v = shape
    # The matmuls: x w forward; dx = dl w^T and dW = x^T dl backward (the recomputation of
    # x w in the backward is the price of not storing the logits, not counted).
    return 2 * n * d * v * (1 if mode == "fwd" else 3)


def _lce_fn(x, w, b, labels, **kwargs):
    """The public op with the bias positional, so that the registry can differentiate it."""
    return ops.linear_softmax_cross_entropy_with_integer_labels(x, w, labels, b=b, **kwargs)


def _lce_reference(x, w, b, labels, **kwargs):
    return ops.linear_softmax_cross_entropy_with_integer_labels_reference(x, w, labels, b=b, **kwargs)


register(OpSpec(
    name="linear_softmax_cross_entropy_with_integer_labels",
    fn=_lce_fn,
    reference=_lce_reference,
    make_inputs=_lce_inputs,
    abstract_inputs=_lce_abstract,
    diff_argnums=(0, 1, 2),
    # 37 x 129 x 1000: no block divides D or V; 8 x 16 x 10: the MNIST head's V; 1 x 3 x 5: tiny.
    test_shapes=((37, 129, 1000), (8, 16, 10), (1, 3, 5)),
    # The cap at 5 bends logits of a few units (tanh is far from linear there).
    options=({}, {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_soft_cap": 5.0}),
    bench_shapes={"mnist": [(128, 512, 10)], "llm": [(4096, 2048, 32768), (16384, 4096, 128256)]},
    lowering_shapes=(((37, 129, 1000), "f32"), ((16384, 4096, 128256), "bf16")),
    bytes=_lce_bytes,
    flops=_lce_flops,
    shape_names=("N", "D", "V"),
))


# --- layer_norm: shape (N, D) -- generated by fusedvjp.scaffold ------------------------------


def _layer_norm_inputs(rng, shape, dtype):
    n, d = shape
    # Rows with their own offset (mean ~ N(0, 2^2)) and spread (std in [0.5, 2]), so the
    # normalization really moves every row; scale near 1 as after initialization.
    x = rng.standard_normal((n, 1)) * 2.0 + rng.uniform(0.5, 2.0, (n, 1)) * rng.standard_normal((n, d))
    scale = 1.0 + 0.1 * rng.standard_normal(d)
    return (jnp.asarray(x, dtype), jnp.asarray(scale, dtype), _normal(rng, (d,), dtype))


def _layer_norm_abstract(shape, dtype):
    n, d = shape
    return (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d,), dtype), jax.ShapeDtypeStruct((d,), dtype))


def _layer_norm_bytes(shape, dtype, mode):
    n, d = shape
    s = _itemsize(dtype)
    fwd = (2 * n * d + 2 * d) * s  # read x, scale, bias; write y
    if mode == "fwd":
        return fwd
    # + write mean, rstd (f32) in the forward; backward: read x, g, scale, mean, rstd;
    # write dx, dscale, dbias.
    return fwd + 8 * n + (3 * n * d + 3 * d) * s + 8 * n


def _layer_norm_flops(shape, dtype, mode):
    n, d = shape
    # Per element, forward: sum, subtract, square-and-sum, two multiplies, add (~7);
    # backward: recompute xhat (2), g*scale, two row dots (3), dx (4), dscale (2), dbias (1).
    return (7 if mode == "fwd" else 7 + 13) * n * d


register(OpSpec(
    name="layer_norm",
    fn=ops.layer_norm,
    reference=ops.layer_norm_reference,
    make_inputs=_layer_norm_inputs,
    abstract_inputs=_layer_norm_abstract,
    diff_argnums=(0, 1, 2),
    # 37 x 784: ragged row and column blocks; 1 x 1: D = 1 (x - mean = 0, dx = 0, y = bias);
    # 3 x 1000: fewer rows than a block.
    test_shapes=((37, 784), (1, 1), (3, 1000)),
    # eps is checked by tests/test_ops_layer_norm.py (a second option set here would
    # double the generic tests' runtime for one scalar).
    bench_shapes={"mnist": [(128, 512)], "llm": [(8192, 4096)]},
    lowering_shapes=(((128, 512), "f32"), ((8192, 4096), "bf16")),
    bytes=_layer_norm_bytes,
    flops=_layer_norm_flops,
    shape_names=("N", "D"),
))


# --- rms_norm: shape (N, D) -- generated by fusedvjp.scaffold --------------------------------


def _rms_norm_inputs(rng, shape, dtype):
    n, d = shape
    # Rows of their own magnitude (rms in [0.5, 2]) and a nonzero mean, so the
    # normalization moves every row; scale near 1 as after initialization.
    x = rng.standard_normal((n, 1)) + rng.uniform(0.5, 2.0, (n, 1)) * rng.standard_normal((n, d))
    return (jnp.asarray(x, dtype), jnp.asarray(1.0 + 0.1 * rng.standard_normal(d), dtype))


def _rms_norm_abstract(shape, dtype):
    n, d = shape
    return (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d,), dtype))


def _rms_norm_bytes(shape, dtype, mode):
    n, d = shape
    s = _itemsize(dtype)
    fwd = (2 * n * d + d) * s  # read x, scale; write y
    if mode == "fwd":
        return fwd
    # + write rstd (f32) in the forward; backward: read x, g, scale, rstd; write dx, dscale.
    return fwd + 4 * n + (3 * n * d + 2 * d) * s + 4 * n


def _rms_norm_flops(shape, dtype, mode):
    n, d = shape
    # Per element, forward: square-and-sum (2), two multiplies (2); backward: xhat (1),
    # g*scale (1), the row dot (2), dx (3), dscale (2).
    return (4 if mode == "fwd" else 4 + 9) * n * d


register(OpSpec(
    name="rms_norm",
    fn=ops.rms_norm,
    reference=ops.rms_norm_reference,
    make_inputs=_rms_norm_inputs,
    abstract_inputs=_rms_norm_abstract,
    diff_argnums=(0, 1),
    # 37 x 784: ragged row and column blocks; 1 x 1: D = 1 (y = sign(x) * scale, up to
    # eps); 3 x 1000: fewer rows than a block.
    test_shapes=((37, 784), (1, 1), (3, 1000)),
    # eps and scale=None are checked by tests/test_ops_rms_norm.py.
    bench_shapes={"mnist": [(128, 512)], "llm": [(8192, 4096)]},
    lowering_shapes=(((128, 512), "f32"), ((8192, 4096), "bf16")),
    bytes=_rms_norm_bytes,
    flops=_rms_norm_flops,
    shape_names=("N", "D"),
))
