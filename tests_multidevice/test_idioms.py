"""The ways people write a sharded program, each as a user writes it, for every op and impl.

Each test's program uses ``jax`` and ``fusedvjp.ops`` only (no project helper sets a
mesh or wraps a call): a data-parallel ``value_and_grad`` step with the batch split over
8 CPU devices and the parameters replicated, written

* ``auto_no_mesh``: ``Mesh`` (Auto axes) + ``device_put(NamedSharding)`` + ``jit``, no mesh set;
* ``legacy_with_mesh``: the same inside the legacy ``with mesh:`` context;
* ``explicit_no_set_mesh``: ``jax.make_mesh`` (Explicit axes) + ``device_put`` + ``jit``,
  no ``jax.set_mesh``;

and per-example gradients, ``vmap`` of the step over an axis that is itself split over
the devices (groups of rows; the parameters unbatched), under Explicit and Auto axes with
the mesh set and without. Each is compared with the op run unsharded by ``impl="xla"``
(only the order of reductions differs: a few f32 ulps) and its compiled HLO read: no
all-gather, all-to-all or collective-permute at all, no all-reduce of an array with a
row dimension (activations), and the outputs keep the batch split.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_sharding import _assert_close, collectives

from fusedvjp import ops

IMPLS = ("xla", "jnp", "pallas")
N = 64  # rows: 8 per device; no other dimension is 64 or 8
GROUPS = 16  # vmap: 16 groups of 4 rows, 2 groups per device


def _inputs(name, rng):
    """(arrays, which are per-row, differentiated argnums) of a small case of ``name``."""
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    if name in ("dense", "dense_tanh"):
        return (f32(N, 24), f32(24, 40) / 5, f32(40)), (True, False, False), (0, 1, 2)
    if name == "layer_norm":
        return (f32(N, 20), 1 + f32(20) / 4, f32(20)), (True, False, False), (0, 1, 2)
    if name == "softmax_cross_entropy_with_integer_labels":
        return (3 * f32(N, 12), jnp.asarray(rng.integers(0, 12, N), jnp.int32)), (True, True), (0,)
    if name == "softmax_cross_entropy":
        return (3 * f32(N, 12), jax.nn.softmax(f32(N, 12))), (True, True), (0, 1)
    assert name == "linear_softmax_cross_entropy_with_integer_labels"
    labels = jnp.asarray(rng.integers(0, 36, N), jnp.int32)
    return (f32(N, 20), f32(20, 36) / 4, labels, f32(36)), (True, False, True, False), (0, 1, 3)


def _op(name, impl):
    """The op as a user calls it."""
    if name == "linear_softmax_cross_entropy_with_integer_labels":
        return lambda x, w, labels, b: ops.linear_softmax_cross_entropy_with_integer_labels(
            x, w, labels, b=b, chunk_size=16, impl=impl)
    fn = getattr(ops, name)
    return lambda *args: fn(*args, impl=impl)


def _step(name, impl):
    """(outputs, gradients of sum(sin(outputs))): every element's cotangent differs."""
    op, (_, _, argnums) = _op(name, impl), _inputs(name, np.random.default_rng(0))

    def step(*args):
        def loss(*diff):
            full = list(args)
            for i, d in zip(argnums, diff):
                full[i] = d
            out = op(*full)
            return jnp.sum(jnp.sin(out)), out

        (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(argnums))), has_aux=True)(
            *(args[i] for i in argnums))
        return out, grads

    return step


NAMES = ("dense", "dense_tanh", "layer_norm", "softmax_cross_entropy_with_integer_labels", "softmax_cross_entropy",
         "linear_softmax_cross_entropy_with_integer_labels")
STEP_IDIOMS = ("auto_no_mesh", "legacy_with_mesh", "explicit_no_set_mesh")
VMAP_IDIOMS = ("explicit_set_mesh", "explicit_no_set_mesh", "auto_set_mesh", "auto_no_mesh")
# Interpret-mode pallas costs 5-25 s a case on one CPU, so by default it runs for every op
# under the two new mechanisms' idioms (custom_partitioning with no mesh set, the mesh
# from the types) and for one op per other idiom, rotating; FUSEDVJP_FULL_MATRIX=1 runs
# every pallas case (all 126 cases, 42 of them pallas, passed on 2026-12-08).
FULL_MATRIX = os.environ.get("FUSEDVJP_FULL_MATRIX") == "1"
PALLAS_BY_DEFAULT = {
    *((idiom, name) for idiom in ("auto_no_mesh", "explicit_no_set_mesh") for name in NAMES),
    ("legacy_with_mesh", "softmax_cross_entropy"),
    ("vmap-explicit_set_mesh", "dense_tanh"),
    ("vmap-explicit_no_set_mesh", "softmax_cross_entropy_with_integer_labels"),
    ("vmap-auto_set_mesh", "layer_norm"),
    ("vmap-auto_no_mesh", "linear_softmax_cross_entropy_with_integer_labels"),
}


def _cases(idioms, prefix=""):
    for idiom in idioms:
        for name in NAMES:
            for impl in IMPLS:
                default = impl != "pallas" or (prefix + idiom, name) in PALLAS_BY_DEFAULT
                marks = () if default else pytest.mark.skipif(not FULL_MATRIX, reason="FUSEDVJP_FULL_MATRIX=1")
                yield pytest.param(idiom, name, impl, marks=marks, id=f"{idiom}-{name}-{impl}")


def _check_hlo(text, what, row_dims):
    for op, shapes in collectives(text):
        assert op == "all-reduce", f"{what}: {op} {shapes}: nothing may be gathered or permuted"
        for shape in shapes:
            assert not set(row_dims) & set(shape), f"{what}: all-reduce of an activation-sized {shape}"


# --- the data-parallel step, three ways ----------------------------------------------------------


def _data_parallel(name, impl, idiom):
    rng = np.random.default_rng()
    args, per_row, _ = _inputs(name, rng)
    step = _step(name, impl)
    want = jax.block_until_ready(jax.jit(_step(name, "xla"))(*args))
    if idiom == "explicit_no_set_mesh":
        mesh = jax.make_mesh((8,), ("data",))  # Explicit axes: make_mesh's default
    else:
        mesh = Mesh(np.array(jax.devices()), ("data",))  # Auto axes
    sharded = [jax.device_put(a, NamedSharding(mesh, P("data") if r else P())) for a, r in zip(args, per_row)]
    if idiom == "legacy_with_mesh":
        with mesh:
            compiled = jax.jit(step).lower(*sharded).compile()
    else:
        compiled = jax.jit(step).lower(*sharded).compile()
    got, text = compiled(*sharded), compiled.as_text()
    what = f"{name} impl={impl} {idiom}"
    _assert_close(got, want, what)
    _check_hlo(text, what, (N, N // 8))
    out = got[0]
    assert out.sharding.spec[0] == "data", f"{what}: output sharded {out.sharding.spec}, not by rows"
    return text


@pytest.mark.parametrize("idiom,name,impl", _cases(STEP_IDIOMS))
def test_step_as_written(idiom, name, impl):
    _data_parallel(name, impl, idiom)


# --- vmap over an axis split over the devices --------------------------------------------------


@pytest.mark.parametrize("idiom,name,impl", _cases(VMAP_IDIOMS, "vmap-"))
def test_vmap_over_a_split_axis(idiom, name, impl):
    """Per-group outputs and gradients: ``vmap`` of the step over [GROUPS, N / GROUPS, ...]
    arrays split by group, the parameters unbatched (their gradients come out per group)."""
    rng = np.random.default_rng()
    args, per_row, _ = _inputs(name, rng)
    args = [a.reshape(GROUPS, N // GROUPS, *a.shape[1:]) if r else a for a, r in zip(args, per_row)]
    in_axes = tuple(0 if r else None for r in per_row)
    want = jax.block_until_ready(jax.jit(jax.vmap(_step(name, "xla"), in_axes=in_axes))(*args))
    axis_type = AxisType.Explicit if idiom.startswith("explicit") else AxisType.Auto
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = [jax.device_put(a, NamedSharding(mesh, P("data") if r else P())) for a, r in zip(args, per_row)]
    jitted = jax.jit(jax.vmap(_step(name, impl), in_axes=in_axes))
    if idiom.endswith("_set_mesh") and not idiom.endswith("no_set_mesh"):
        with jax.set_mesh(mesh):
            compiled = jitted.lower(*sharded).compile()
    else:
        compiled = jitted.lower(*sharded).compile()
    got, text = compiled(*sharded), compiled.as_text()
    what = f"vmap {name} impl={impl} {idiom}"
    _assert_close(got, want, what)
    found = collectives(text)
    assert not found, f"{what}: the groups are independent, nothing may cross devices: {found}"
    for leaf in jax.tree.leaves(got):
        assert leaf.sharding.spec[0] == "data", f"{what}: a result sharded {leaf.sharding.spec}, not by group"


# --- vocabulary parallel inside the user's shard_map: axis_name= ---------------------------------

VOCAB = 1000  # 250 classes per device along "model"


def _vocab_inputs(kind, rng):
    """(op(args..., axis_name, impl), global arrays, their shard_map specs, differentiated argnums)."""
    n = 16
    logits = rng.normal(size=(n, VOCAB)) * 3
    # One slice of row 5 is all -inf, its real logits far below 0: the slice's placeholder
    # max must not become the row's shift.
    logits[5] -= 200.0
    logits[5, 250:500] = -np.inf
    logits = jnp.asarray(logits, jnp.float32)
    where = jnp.asarray(rng.random(n) > 0.2).at[3].set(True)
    if kind == "probability":
        labels = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, VOCAB)), jnp.float32)).at[5, 250:500].set(0.0)
        op = lambda z, t, w, axis_name, impl: ops.softmax_cross_entropy(  # noqa: E731
            z, t, where=w, axis_name=axis_name, impl=impl)
        return op, (logits, labels, where), (P("data", "model"), P("data", "model"), P("data")), (0, 1)
    labels = jnp.asarray(rng.integers(0, VOCAB, n), jnp.int32).at[3].set(VOCAB + 7).at[5].set(0)  # 3: NaN row
    if kind == "integer":
        op = lambda z, y, w, axis_name, impl: ops.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            z, y, where=w, label_smoothing=0.1, z_loss=1e-3, axis_name=axis_name, impl=impl)
        return op, (logits, labels, where), (P("data", "model"), P("data"), P("data")), (0,)
    x = jnp.asarray(rng.normal(size=(n, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(24, VOCAB)) / 3, jnp.float32)
    b = jnp.asarray(rng.normal(size=(VOCAB,)), jnp.float32)
    op = lambda x, w, b, y, m, axis_name, impl: ops.linear_softmax_cross_entropy_with_integer_labels(  # noqa: E731
        x, w, y, b=b, where=m, label_smoothing=0.1, z_loss=1e-3, logit_soft_cap=5.0, chunk_size=100,
        axis_name=axis_name, impl=impl)
    return (op, (x, w, b, labels, where), (P("data"), P(None, "model"), P("model"), P("data"), P("data")),
            (0, 1, 2))


@pytest.mark.parametrize("kind,impl,axis_name", [
    *((kind, impl, "model") for kind in ("integer", "probability", "linear") for impl in IMPLS),
    ("integer", "jnp", ("m1", "m2")),  # a tuple of axes: 2 x 2 slices
])
def test_axis_name_vocabulary_parallel_in_shard_map(kind, impl, axis_name):
    """The caller's shard_map holds one slice of the vocabulary per device along "model"
    (rows split over "data"); ``axis_name="model"`` merges the per-row statistics. Equal
    to the op on the whole vocabulary; only [N_local] vectors and scalars cross devices."""
    rng = np.random.default_rng()
    op, args, specs, argnums = _vocab_inputs(kind, rng)
    # Per-row weights: every row's cotangent differs (a linear sum, so that the loss's own
    # rounding -- checked on the outputs -- is not amplified into the gradients).
    args, specs = (*args, jnp.asarray(rng.normal(size=args[0].shape[:1]), jnp.float32)), (*specs, P("data"))

    def step(*a, axis_name, impl):
        *a, weights = a

        def total(*diff):
            full = list(a)
            for i, d in zip(argnums, diff):
                full[i] = d
            out = op(*full, axis_name=axis_name, impl=impl)
            return jnp.sum(jnp.where(jnp.isnan(out), 0.0, out) * weights), out

        (_, out), grads = jax.value_and_grad(total, argnums=tuple(range(len(argnums))), has_aux=True)(
            *(a[i] for i in argnums))
        return out, grads

    want = jax.block_until_ready(jax.jit(lambda *a: step(*a, axis_name=None, impl="xla"))(*args))
    if axis_name == "model":
        mesh = jax.make_mesh((2, 4), ("data", "model"))
    else:
        mesh = jax.make_mesh((2, 2, 2), ("data", *axis_name))
        specs = tuple(P(*(axis_name if e == "model" else e for e in s)) for s in specs)
    sharded = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    mapped = jax.shard_map(lambda *a: step(*a, axis_name=axis_name, impl=impl), mesh=mesh, in_specs=specs,
                           out_specs=(P("data"), tuple(specs[i] for i in argnums)))
    compiled = jax.jit(mapped).lower(*sharded).compile()
    got = compiled(*sharded)
    what = f"axis_name={axis_name!r} {kind} impl={impl}"
    _assert_close(got, want, what)
    found = collectives(compiled.as_text())
    assert found, f"{what}: the slices' statistics must be merged"
    for op_name, shapes in found:
        assert op_name == "all-reduce", f"{what}: {op_name} {shapes}"
        # [N_local] statistics and scalars; the linear op also all-reduces dx [N_local, D]
        # over "model" and its dW, db slices [D, V_local], [V_local] over the rows ("data").
        allowed = ((), (8,)) + (((8, 24), (24, 250), (250,), (1, 250)) if kind == "linear" else ())
        assert all(s in allowed for s in shapes), f"{what}: all-reduce of {shapes}: only [N] vectors may cross"


def test_axis_name_is_checked():
    logits, labels = jnp.zeros((4, 6)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="manual axes of the enclosing shard_map"):
        ops.softmax_cross_entropy_with_integer_labels(logits, labels, axis_name="model", impl="jnp")
    with pytest.raises(TypeError, match="axis_name must be"):
        ops.softmax_cross_entropy(logits, logits, axis_name=3, impl="jnp")
    mesh = jax.make_mesh((8,), ("model",))

    def class_mask(z, y):
        return ops.softmax_cross_entropy_with_integer_labels(z, y, where=z > 0, axis_name="model", impl="jnp")

    with pytest.raises(ValueError, match="per-row where"):
        jax.shard_map(class_mask, mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P())(
            jax.device_put(jnp.zeros((4, 16)), NamedSharding(mesh, P(None, "model"))),
            jax.device_put(labels, NamedSharding(mesh, P())))
