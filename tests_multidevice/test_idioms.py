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
