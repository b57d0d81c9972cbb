"""linear_softmax_cross_entropy_with_integer_labels sharded over 8 CPU devices.

``value_and_grad`` with respect to ``(x, w, b)`` of each impl, compared with the
unsharded ``impl="xla"`` result (f32; only the order of reductions differs), and the
compiled HLO read for its collectives. What the math allows to cross devices
(ops/linear_softmax_cross_entropy.py, its ``_sharding.Layout``\\ s):

* **rows split** (data parallel): the losses and dx are per row, so local; ``dW = x^T dl``
  and ``db = sum_i dl`` are partial sums over the rows: all-reduces of [D, V] and [V] (or of
  their column chunks) and of scalars (the loss sum, the mean's row count). Nothing with
  a row dimension, no all-gather.
* **vocabulary split** (``w`` and ``b`` split over V, rows whole): each device reduces
  its slice of every row to statistics, merged by one pmax and a few psums of [N]
  vectors; the backward writes its own columns of dW and db and a partial
  ``dx = dl w_slice^T`` -- one all-reduce of [N, D]. Never ``w`` gathered, never [N, V].
* **rows x vocabulary** (2 x 4): both, with [N_local] statistics, an [N_local, D] dx and
  the all-reduce of each device's [D, V_local] dW slice (and [V_local] db) over the rows.

The shapes are chosen so that every dimension names itself: N = 64 (8 or 32 per
device), D = 40, V = 1000 (125 or 250 per device). A chunk size per case makes the
chunked paths walk 2-3 chunks per device (a fori_loop and a tail).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_sharding import _assert_close, collectives

from fusedvjp import ops

N, D, V = 64, 40, 1000
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
FULL = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_soft_cap": 5.0}

# parallelism -> (mesh shape, axis names, specs of x, w, b, labels, where, chunk_size)
PARALLEL = {
    # 8 rows per device; V = 1000 in chunks of 400: two in the loop and a 200 tail.
    "data": ((8,), ("data",), (P("data"), P(), P(), P("data"), P("data")), 400),
    # 125 classes per device in chunks of 50: two and a 25 tail.
    "vocabulary": ((8,), ("model",), (P(), P(None, "model"), P("model"), P(), P()), 50),
    # 32 rows and 250 classes per device, chunks of 100: two and a 50 tail.
    "rows_vocabulary": ((2, 4), ("data", "model"),
                        (P("data"), P(None, "model"), P("model"), P("data"), P("data")), 100),
}

# (impl, axis type, reduction, options). "full": bias, smoothing, z-loss, soft cap and a
# where mask whose masked rows hold NaN; "plain": none of them (no bias: the layouts
# without b). Interpret-mode pallas is slow: two cases per parallelism.
CASES = (
    ("xla", "explicit", "none", "full"),
    ("xla", "auto", "mean", "full"),
    ("jnp", "explicit", "none", "full"),
    ("jnp", "explicit", "mean", "plain"),
    ("jnp", "auto", "mean", "full"),
    ("jnp", "auto", "none", "plain"),
    ("pallas", "explicit", "none", "full"),
    ("pallas", "auto", "mean", "full"),
)
ROWS_VOCABULARY_CASES = (
    ("xla", "explicit", "mean", "full"),
    ("jnp", "explicit", "none", "full"),
    ("jnp", "explicit", "mean", "plain"),
    ("jnp", "auto", "mean", "full"),
    ("pallas", "explicit", "mean", "full"),
)


def _inputs(options):
    rng = np.random.default_rng()
    x = rng.normal(size=(N, D))
    w = rng.normal(size=(D, V)) * 2 / np.sqrt(D)  # logits of a few units
    b = rng.normal(size=(V,)) * 0.5
    labels = rng.integers(0, V, N)
    # Labels in every device's vocabulary slice, the first and last class among them.
    labels[:2] = (0, V - 1)
    where = rng.random(N) > 0.2
    where[[5, 40]] = False
    x[[5, 40]] = np.nan  # masked rows: loss 0, gradient 0, nothing into dW or db
    args = [jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
            jnp.asarray(labels, jnp.int32), jnp.asarray(where)]
    if options == "plain":
        args[0] = jnp.where(args[4][:, None], args[0], 1.0)  # no mask: no NaN either
        args[2] = args[4] = None
    return args


def _value_and_grads(impl, reduction, options, chunk_size, weights):
    """(loss, (dx, dw, db)) of the op, or of the weighted sum of its per-row losses."""
    kwargs = FULL if options == "full" else {}

    def f(x, w, b, labels, where):
        def loss(x, w, b):
            out = ops.linear_softmax_cross_entropy_with_integer_labels(
                x, w, labels, b=b, where=where, reduction=reduction, chunk_size=chunk_size, impl=impl, **kwargs)
            return out if reduction != "none" else jnp.sum(out * weights)

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b)

    return f


def _padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def _run(parallel, impl, axis_type, reduction, options):
    shape, names, specs, chunk = PARALLEL[parallel]
    args = _inputs(options)
    weights = jnp.asarray(np.random.default_rng().normal(size=(N,)), jnp.float32)
    want = jax.block_until_ready(_value_and_grads("xla", reduction, options, None, weights)(*args))

    mesh = jax.make_mesh(shape, names, axis_types=(AXIS_TYPES[axis_type],) * len(names))
    sharded = [None if a is None else jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    weights = jax.device_put(weights, NamedSharding(mesh, specs[0]))
    fn = jax.jit(_value_and_grads(impl, reduction, options, chunk, weights))
    with jax.set_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to jnp, no replication warning
        got = fn(*sharded)
        text = fn.lower(*sharded).compile().as_text()
    what = f"{parallel} impl={impl} {axis_type} reduction={reduction} {options}"
    _assert_close(got, want, what)
    found = collectives(text)
    assert found, f"{what}: no collective: the gradients cannot be right"
    assert all(op == "all-reduce" for op, _ in found), f"{what}: {found}"
    # Each gradient comes back sharded as its primal (dW and db split over V when w is).
    for g, a in zip(got[1], sharded[:3]):
        if a is not None:
            assert _padded(g.sharding.spec, g.ndim) == _padded(a.sharding.spec, a.ndim), (
                f"{what}: gradient sharded {g.sharding.spec}, its primal {a.sharding.spec}")
    return what, found


# --- rows split (data parallel) -------------------------------------------------------------


@pytest.mark.parametrize("impl,axis_type,reduction,options", CASES)
def test_lce_data_parallel_jit(impl, axis_type, reduction, options):
    what, found = _run("data", impl, axis_type, reduction, options)
    d_w = [s for _, shapes in found for s in shapes if s]
    assert d_w, f"{what}: no all-reduce of dW / db: {found}"
    for s in d_w:
        # dW and db ([D, V] or XLA's [V, D], [V]; or a chunk's columns of them); no row dim.
        assert not {N, N // 8} & set(s) and (len(s) == 1 or (len(s) == 2 and D in s)), (
            f"{what}: all-reduce of {s}: only dW, db and scalars may cross devices ({found})")


# --- vocabulary split (w and b split over V) ---------------------------------------------------


@pytest.mark.parametrize("impl,axis_type,reduction,options", CASES)
def test_lce_vocabulary_parallel_jit(impl, axis_type, reduction, options):
    what, found = _run("vocabulary", impl, axis_type, reduction, options)
    arrays = [s for _, shapes in found for s in shapes]
    assert all(s in ((), (N,), (N, D)) for s in arrays), (
        f"{what}: only [N] row statistics, scalars and dx [N, D] may cross devices: {found}")
    assert arrays.count((N, D)) == 1, f"{what}: dx's partial sums over the vocabulary: one [N, D] all-reduce: {found}"
    assert (N,) in arrays, f"{what}: the row statistics (max, sums) are merged across the slices: {found}"


@pytest.mark.parametrize("impl,axis_type,reduction,options", ROWS_VOCABULARY_CASES)
def test_lce_rows_and_vocabulary_parallel_jit(impl, axis_type, reduction, options):
    what, found = _run("rows_vocabulary", impl, axis_type, reduction, options)
    n_local, v_local = N // 2, V // 4
    allowed = {(), (n_local,), (n_local, D), (D, v_local), (v_local, D), (v_local,)}
    arrays = [s for _, shapes in found for s in shapes]
    assert set(arrays) <= allowed, (
        f"{what}: only [N_local] statistics, scalars, dx [N_local, D] and the dW/db slices may cross: {found}")
    assert (n_local, D) in arrays and ((D, v_local) in arrays or (v_local, D) in arrays), found


# --- inside shard_map, check_vma=True -------------------------------------------------------------


@pytest.mark.parametrize("impl", ("xla", "jnp", "pallas"))
def test_lce_inside_shard_map(impl):
    """The data-parallel step written by hand: per-device losses, grad of psum(loss) with
    w and b replicated -- their cotangents come back reduced over "data" and typed
    invariant (out_specs P() checks it under check_vma=True)."""
    x, w, b, labels, where = _inputs("full")
    weights = jnp.asarray(np.random.default_rng().normal(size=(N,)), jnp.float32)
    kwargs = dict(FULL, chunk_size=400)  # 3 chunks of the whole vocabulary on each device

    def reference(x, w, b):
        out = ops.linear_softmax_cross_entropy_with_integer_labels(x, w, labels, b=b, where=where, impl="xla",
                                                                   **FULL)
        return out, jax.grad(lambda *p: jnp.sum(ops.linear_softmax_cross_entropy_with_integer_labels(
            p[0], p[1], labels, b=p[2], where=where, impl="xla", **FULL) * weights), argnums=(0, 1, 2))(x, w, b)

    def step(x, w, b, labels, where, weights):
        def total(x, w, b):
            out = ops.linear_softmax_cross_entropy_with_integer_labels(x, w, labels, b=b, where=where, impl=impl,
                                                                       **kwargs)
            return jax.lax.psum(jnp.sum(out * weights), "data"), out

        (_, out), grads = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(x, w, b)
        return out, grads

    # The reference first and finished: on CPU the pallas kernels under shard_map run in
    # the TPU interpreter, whose callbacks place their arguments on CPU device 0.
    want = jax.block_until_ready(reference(x, w, b))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    specs = (P("data"), P(), P(), P("data"), P("data"), P("data"))
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip((x, w, b, labels, where, weights), specs)]
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=(P("data"), (P("data"), P(), P())),
                               check_vma=True))
    _assert_close(fn(*args), want, f"impl={impl} in shard_map")
