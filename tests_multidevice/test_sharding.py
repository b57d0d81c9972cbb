"""Every op and impl sharded over 8 CPU devices: data, tensor and vocabulary parallel.

Each case compares against the same op run unsharded (f32; only the order of the
reductions differs, so the tolerance is a few f32 ulps of the result's scale) and reads
the compiled HLO for the collectives: a data-parallel step may all-reduce parameter
gradients and the loss, never gather an activation; tensor-parallel dense never gathers
``w``; vocabulary-parallel cross-entropy moves only [N]-vectors of row statistics.
Mechanisms (ops/_sharding.py): explicit mesh axes -> the op's internal shard_map; Auto
axes -> custom_partitioning; inside shard_map -> per-device kernels.
"""

from __future__ import annotations

import pathlib

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedvjp import ops
from fusedvjp.ops import registry

IMPLS = ("xla", "jnp", "pallas")
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
# Global batch 64 over 8 devices: 8 rows each. No other dimension is 64 or 8, so a
# collective of an activation shows up by its shape.
BATCH = 64
SHAPES = {
    "dense": (BATCH, 24, 40),
    "dense_tanh": (BATCH, 24, 40),
    "dense_gelu": (BATCH, 24, 40),
    "softmax_cross_entropy_with_integer_labels": (BATCH, 12),
    "softmax_cross_entropy": (BATCH, 12),
    "layer_norm": (BATCH, 20),
    "rms_norm": (BATCH, 20),
}
COLLECTIVE = re.compile(
    r"=\s*(\([^)]*\)|\S+)\s+(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
)


def collectives(compiled_text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(collective, [result shapes]) for each collective in a compiled HLO module."""
    found = []
    for types, op in COLLECTIVE.findall(compiled_text):
        shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", types)]
        found.append((op, shapes))
    return found


def _mesh(shape, names, axis_type):
    return jax.make_mesh(shape, names, axis_types=(AXIS_TYPES[axis_type],) * len(names))


def _loss_and_grads(spec, args, impl, weights):
    """The op's outputs and the gradient of a weighted sum of them (weights make every
    output element's cotangent different, so a wrong row or column cannot hide)."""
    dn = spec.diff_argnums

    def f(*a):
        def loss(*diff):
            full = list(a)
            for i, d in zip(dn, diff):
                full[i] = d
            out = spec.fn(*full, impl=impl)
            return jnp.sum(jnp.where(jnp.isnan(out), 0.0, out) * weights), out

        (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(dn))), has_aux=True)(
            *[a[i] for i in dn])
        return out, grads

    return f


def _inputs(name):
    spec = registry.get(name)
    args = [jnp.asarray(a) for a in spec.make_inputs(np.random.default_rng(), SHAPES[name], jnp.float32)]
    return spec, args


def _assert_close(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, what
        # NaN and +-inf entries must be the same ones (e.g. a NaN row for an out-of-range
        # label, +inf where smoothing puts mass on a masked class); finite ones close,
        # relative to the largest finite entry.
        for check in (np.isnan, np.isposinf, np.isneginf):
            np.testing.assert_array_equal(check(g), check(w), err_msg=f"{what}: {check.__name__} entries differ")
        finite = np.isfinite(w)
        scale = np.max(np.abs(w[finite]), initial=1.0)
        np.testing.assert_allclose(g[finite], w[finite], rtol=3e-5, atol=3e-6 * scale, err_msg=what)


def _row_sharded(a):
    return a.ndim >= 1 and a.shape[0] == BATCH


# --- data parallel under jit -----------------------------------------------------------------


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", SHAPES)
def test_data_parallel_jit(name, impl, axis_type):
    spec, args = _inputs(name)
    out_shape = jax.eval_shape(lambda *a: spec.fn(*a, impl="xla"), *args).shape
    weights = jnp.asarray(np.random.default_rng().normal(size=out_shape), jnp.float32)
    want = _loss_and_grads(spec, args, "xla", weights)(*args)

    mesh = _mesh((8,), ("data",), axis_type)
    sharded = [jax.device_put(a, NamedSharding(mesh, P("data") if _row_sharded(a) else P())) for a in args]
    fn = jax.jit(_loss_and_grads(spec, sharded, impl, jax.device_put(weights, NamedSharding(mesh, P("data")))))
    with jax.set_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to jnp, no replication warning
        out, grads = fn(*sharded)
        text = fn.lower(*sharded).compile().as_text()
    _assert_close((out, grads), want, f"{name} impl={impl} {axis_type}")
    assert out.sharding.spec[0] == "data", f"{name} impl={impl}: output sharding {out.sharding.spec}, not by rows"
    for op, shapes in collectives(text):
        assert op == "all-reduce", f"{name} impl={impl} {axis_type}: {op} {shapes} in a data-parallel step"
        for shape in shapes:
            assert BATCH not in shape and BATCH // 8 not in shape, (
                f"{name} impl={impl} {axis_type}: all-reduce of an activation-sized {shape}")


# --- inside shard_map, check_vma=True ----------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", SHAPES)
def test_inside_shard_map(name, impl):
    """The usual data-parallel step: grad of psum(loss) with the batch split and the
    parameters replicated; the parameters' cotangents come back reduced and typed
    invariant (out_specs P() checks it under check_vma=True)."""
    spec, args = _inputs(name)
    dn = spec.diff_argnums
    in_specs = tuple(P("data") if _row_sharded(a) else P() for a in args)

    def step(*a):
        def loss(*diff):
            full = list(a)
            for i, d in zip(dn, diff):
                full[i] = d
            out = spec.fn(*full, impl=impl)
            return jax.lax.psum(jnp.sum(jnp.where(jnp.isnan(out), 0.0, out) ** 2), "data")

        return jax.grad(loss, argnums=tuple(range(len(dn))))(*[a[i] for i in dn])

    def reference(*a):
        return jax.grad(lambda *d: jnp.sum(spec.fn(*[d[dn.index(i)] if i in dn else a[i] for i in range(len(a))],
                                                   impl="xla") ** 2), argnums=tuple(range(len(dn))))(
            *[a[i] for i in dn])

    # The reference first and finished: on CPU the pallas kernels under shard_map run in
    # the TPU interpreter, whose callbacks place their arguments on CPU device 0 -- eager
    # work queued there behind the sharded program would wait for it, and it for them.
    want = jax.block_until_ready(reference(*args))
    mesh = _mesh((8,), ("data",), "explicit")
    sharded = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, in_specs)]
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=tuple(in_specs[i] for i in dn)))
    _assert_close(fn(*sharded), want, f"{name} impl={impl} in shard_map")


# --- tensor-parallel dense -----------------------------------------------------------------------

TENSOR_PARALLEL = {
    # w split over its output columns: each device computes its columns of y; dx's
    # partial sums over the columns are all-reduced.
    "column": (P("data", None), P(None, "model"), P("model")),
    # w split over its input rows, x over its columns: the partial products are
    # all-reduced by the op, before the bias and tanh.
    "row": (P("data", "model"), P("model", None), P()),
}


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("parallel", TENSOR_PARALLEL)
@pytest.mark.parametrize("name", ["dense", "dense_tanh", "dense_gelu"])
def test_tensor_parallel_dense(name, parallel, impl, axis_type):
    spec, args = _inputs(name)
    m, k, n = SHAPES[name]
    weights = jnp.asarray(np.random.default_rng().normal(size=(m, n)), jnp.float32)
    want = _loss_and_grads(spec, args, "xla", weights)(*args)
    mesh = _mesh((2, 4), ("data", "model"), axis_type)
    sharded = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, TENSOR_PARALLEL[parallel])]
    fn = jax.jit(_loss_and_grads(spec, sharded, impl, weights))
    with jax.set_mesh(mesh):
        got = fn(*sharded)
        text = fn.lower(*sharded).compile().as_text()
    _assert_close(got, want, f"{name} {parallel}-parallel impl={impl} {axis_type}")
    found = collectives(text)
    assert all(op == "all-reduce" for op, _ in found), f"{name} {parallel}-parallel impl={impl}: {found}"
    assert not any((k, n) in shapes for _, shapes in found), f"w [{k}, {n}] crossed devices whole: {found}"


# --- vocabulary-parallel cross-entropy -------------------------------------------------------------

VOCAB = 1000  # 250 classes per device on the "model" axis


def _vocab_case(kind):
    rng = np.random.default_rng()
    n = 16
    logits = rng.normal(size=(n, VOCAB)) * 3
    # A masked slice: one device sees only -inf on this row, whose real logits are all far
    # below 0 -- the slice's placeholder max (0) must not become the row's shift.
    logits[5] -= 200.0
    logits[5, 250:500] = -np.inf
    logits = jnp.asarray(logits, jnp.float32)
    where = jnp.asarray(rng.random(n) > 0.2).at[3].set(True)
    if kind == "probability":
        labels = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, VOCAB)), jnp.float32))
        labels = labels.at[5, 250:500].set(0.0)
        return (lambda x, y, w, impl: ops.softmax_cross_entropy(x, y, where=w, impl=impl)), logits, labels, where
    labels = jnp.asarray(rng.integers(0, VOCAB, n), jnp.int32).at[3].set(VOCAB + 7)  # out of range: a NaN row
    labels = labels.at[5].set(0)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3} if kind == "integer+options" else {}

    def fn(x, y, w, impl):
        return ops.softmax_cross_entropy_with_integer_labels(x, y, where=w, impl=impl, **options)

    return fn, logits, labels, where


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["integer", "integer+options", "probability"])
def test_vocabulary_parallel_cross_entropy(kind, impl, axis_type):
    fn, logits, labels, where = _vocab_case(kind)
    weights = jnp.asarray(np.random.default_rng().normal(size=logits.shape[:1]), jnp.float32)

    def run(x, y, w, impl):
        out = fn(x, y, w, impl)
        grad = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isnan(o := fn(x, y, w, impl)), 0.0, o) * weights))(x)
        return out, grad

    want = run(logits, labels, where, "xla")
    mesh = _mesh((2, 4), ("data", "model"), axis_type)
    label_spec = P("data", "model") if labels.ndim == 2 else P("data")
    args = (jax.device_put(logits, NamedSharding(mesh, P("data", "model"))),
            jax.device_put(labels, NamedSharding(mesh, label_spec)),
            jax.device_put(where, NamedSharding(mesh, P("data"))))
    jitted = jax.jit(run, static_argnums=3)
    with jax.set_mesh(mesh):
        got = jitted(*args, impl)
        text = jitted.lower(*args, impl).compile().as_text()
    _assert_close(got, want, f"{kind} impl={impl} {axis_type}")
    assert got[1].sharding.spec == P("data", "model"), got[1].sharding.spec
    found = collectives(text)
    assert found, "expected the row statistics' all-reduces"
    for op, shapes in found:
        assert op == "all-reduce" and all(len(s) <= 1 for s in shapes), (
            f"{kind} impl={impl} {axis_type}: {op} {shapes}: only [N] row statistics may cross devices")


# Ops with their own multi-device file (more cases than the generic ones here).
COVERED_ELSEWHERE = {
    "linear_softmax_cross_entropy_with_integer_labels": "test_linear_softmax_cross_entropy.py",
}


def test_every_registered_op_has_a_case():
    """A new op in ops/registry.py must be given a shape here (its rows first), or its own file."""
    here = pathlib.Path(__file__).parent
    assert all((here / f).exists() for f in COVERED_ELSEWHERE.values()), COVERED_ELSEWHERE
    covered = set(SHAPES) | set(COVERED_ELSEWHERE)
    assert covered == set(registry.REGISTRY), sorted(set(registry.REGISTRY) ^ covered)
