"""Running an op's kernel (or its jnp path) on sharded arrays.

A ``pallas_call`` is opaque to XLA's SPMD partitioner: left alone, it makes every
device gather its operands and compute the whole batch. Each kernel call therefore
states how its arrays map onto named *factors* (a :class:`Layout`: ``"m k, k n, n ->
m n"`` for dense's forward) and what a device must do with its shard when a factor is
split over mesh axes (a *local* function: the kernel on the shard, then the collectives
the math needs -- e.g. ``psum`` of ``dW`` over the batch axes). One description serves
the three ways JAX shards a program:

* **Explicit mesh axes** (``jax.make_mesh``'s default; the shardings are in the array
  types): :func:`run` reads each operand's ``PartitionSpec`` from its type and runs the
  local function under an internal ``jax.shard_map`` -- over the mesh set with
  ``jax.set_mesh``, or, with none set, the one in the arrays' types.
* **Auto mesh axes** (``jax.sharding.Mesh``, or ``jit`` with ``in_shardings``): the
  shardings are chosen by the partitioner (Shardy) after tracing, so the kernel call is
  wrapped in ``jax.experimental.custom_partitioning`` with the layout as its
  ``sharding_rule``; its partition callback builds the same local function for the
  shardings Shardy picked. It needs no mesh set: it wraps whenever the process has
  several devices and no mesh is set (``Mesh`` + ``device_put`` + ``jit``, the legacy
  ``with mesh:``), or a multi-device Auto mesh is set. Not on TPU: Mosaic kernels refuse automatic partitioning
  and libtpu cannot compile custom_partitioning (jax-ml/jax#38196), so under a
  multi-device Auto mesh the kernels refuse the case (``impl="auto"`` falls back to the
  jnp path, which XLA partitions; ``impl="pallas"`` raises); explicit axes or shard_map
  run the kernels partitioned.
* **Inside ``shard_map``** (manual axes): the arrays are already local and the caller
  writes the collectives; the op runs as on one device, and the custom_vjp rules reduce
  replicated parameters' cotangents over the axes they vary on (:func:`match_cotangent`),
  as JAX's own autodiff does. With ``axis_name=`` (``manual``) the caller split the
  vocabulary: the local function of that split runs as it is.

Under ``vmap`` the first two get a ``custom_vmap`` rule that partitions the batched call,
the vmapped axis one more factor (:func:`_with_rules`).

A factor in ``Layout.whole`` is one the local function cannot split (layer_norm's
feature axis): it is gathered first, which is the only collective of activations an op
ever issues, and only when the caller sharded that axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fusedvjp.kernels import _common

# factor -> the mesh axes it is split over (only split factors appear).
Assignment = Mapping[str, tuple[str, ...]]
# (assignment, fn, is_kernel) -> the function one device runs on its shards.
LocalBuilder = Callable[[Assignment, Callable[..., Any], bool], Callable[..., Any]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one kernel call's arrays map onto named factors.

    Attributes:
      operands: per array argument (``None`` arguments left out), its dimensions'
        factor names separated by spaces: ``("m k", "k n", "n")``.
      results: the same for each leaf of the result (``jax.tree.leaves`` order).
      sums: per result, the factors it is a *linear* sum over (``dW = x^T dz`` sums over
        the rows ``m``): when such a factor is split, each device's result is a partial
        sum and is all-reduced over that factor's axes. Empty: no result sums.
      whole: factors the local function needs unsplit; a split one is gathered first.
      local: builds the per-device function for an assignment; ``None`` runs ``fn`` and
        applies ``sums``. An op gives its own for a split that is not a plain partial
        sum (dense's contracted ``k`` before bias and tanh; cross-entropy's vocabulary).
      partition_jnp: under Auto axes, partition the jnp path as the kernels are, rather
        than leave it to XLA -- for a jnp path XLA cannot split (linear cross-entropy's
        chunk loop slices a V-split ``w`` dynamically: XLA would gather it).
    """

    operands: tuple[str, ...]
    results: tuple[str, ...]
    sums: tuple[str, ...] = ()
    whole: tuple[str, ...] = ()
    local: LocalBuilder | None = None
    partition_jnp: bool = False

    def __post_init__(self):
        if self.sums and len(self.sums) != len(self.results):
            raise ValueError(f"sums {self.sums} must name one entry per result {self.results}")

    @property
    def factors(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(s.split()) for s in self.operands)

    def result_factors(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(s.split()) for s in self.results)


def axes_of(assign: Assignment, factors: Sequence[str]) -> tuple[str, ...]:
    """The mesh axes the given factors are split over (empty: none is split)."""
    return tuple(a for f in factors for a in assign.get(f, ()))


def psum_over(x: jax.Array, assign: Assignment, factors: Sequence[str]) -> jax.Array:
    axes = axes_of(assign, factors)
    return jax.lax.psum(x, axes) if axes else x


def linear_local(layout: Layout) -> LocalBuilder:
    """The default local function: ``fn`` on the shards, each result all-reduced over
    the split factors it sums over."""

    def build(assign: Assignment, fn: Callable[..., Any], is_kernel: bool) -> Callable[..., Any]:
        del is_kernel

        def local(*args):
            out, tree = jax.tree.flatten(fn(*args))
            sums = layout.sums or ("",) * len(out)
            return jax.tree.unflatten(tree, [psum_over(o, assign, s.split()) for o, s in zip(out, sums)])

        return local

    return build


# --- which mesh axes each factor is split over ---------------------------------------------


def _dim_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _padded(spec: P | None, ndim: int) -> tuple[tuple[str, ...], ...]:
    entries = tuple(spec) if spec is not None else ()
    return tuple(_dim_axes(e) for e in entries) + ((),) * (ndim - len(entries))


def assign_factors(layout: Layout, specs: Sequence[tuple[tuple[str, ...], ...]],
                   shapes: Sequence[tuple[int, ...]], sizes: Mapping[str, int]) -> dict[str, tuple[str, ...]]:
    """Each factor takes the axes of the first operand dimension that splits it. A factor
    stays unsplit (its operands are gathered) when it is in ``whole``, when one of its
    axes splits another factor already, or when the axes do not divide its size."""
    assign: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for factors, spec, shape in zip(layout.factors, specs, shapes):
        for f, axes, size in zip(factors, spec, shape):
            if not axes or f in assign or f in layout.whole or used & set(axes):
                continue
            if size % math.prod(sizes[a] for a in axes):
                continue
            assign[f] = axes
            used.update(axes)
    return assign


def _spec(factors: Sequence[str], assign: Assignment) -> P:
    return P(*(None if f not in assign else (assign[f] if len(assign[f]) > 1 else assign[f][0]) for f in factors))


def _local_fn(layout: Layout, assign: Assignment, fn, is_kernel: bool):
    return (layout.local or linear_local(layout))(assign, fn, is_kernel)


# --- entry point ---------------------------------------------------------------------------


def run(fn: Callable[..., Any], args: Sequence[Any], layout: Layout | None, *, is_kernel: bool,
        manual: Assignment | None = None) -> Any:
    """``fn(*args)`` for sharded ``args``, partitioned as ``layout`` says (its operands
    are the array leaves of ``args``; ``None`` entries have none); see the module
    docstring for which mechanism runs when.

    ``manual``: factors the caller split inside its own ``shard_map`` (the vocabulary
    over ``axis_name=``): ``args`` are this device's slices and the local function for
    that assignment runs as it is.
    """
    if layout is None:
        return fn(*args)
    arrays, tree = jax.tree.flatten(tuple(args))
    if len(arrays) != len(layout.operands):
        raise ValueError(f"layout {layout.operands} does not match {len(arrays)} array arguments")

    def call(*xs):
        return fn(*jax.tree.unflatten(tree, xs))

    if manual:
        return _local_fn(layout, manual, call, is_kernel)(*arrays)
    return _run_flat(call, arrays, layout, is_kernel)


def manual_axes(axis_name, op_name: str) -> tuple[str, ...] | None:
    """``axis_name=`` (a mesh axis name or a tuple of them) as a tuple, checked to name
    manual axes of the enclosing ``shard_map``; None stays None."""
    if axis_name is None:
        return None
    axes = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(axes, tuple) or not axes or not all(isinstance(a, str) for a in axes):
        raise TypeError(f"{op_name}: axis_name must be None, a mesh axis name or a non-empty tuple of them, "
                        f"got {axis_name!r}")
    manual = jax.sharding.get_abstract_mesh().manual_axes
    if not set(axes) <= set(manual):
        raise ValueError(f"{op_name}: axis_name={axis_name!r} must name manual axes of the enclosing shard_map "
                         f"(the axes the vocabulary is split over); the manual axes here are {tuple(manual)}")
    return axes


def axes_size(axes: Sequence[str]) -> int:
    """The number of devices along manual ``axes`` of the current mesh."""
    shape = jax.sharding.get_abstract_mesh().shape
    return math.prod(shape[a] for a in axes)


def _run_flat(call, arrays, layout: Layout, is_kernel: bool):
    mesh = explicit_mesh(*arrays)
    if mesh is not None:
        def partitioned(*xs):
            with _mesh_context(mesh):
                return _run_explicit(call, xs, layout, mesh, is_kernel)
    elif (is_kernel or layout.partition_jnp) and _auto_partitioned(is_kernel):
        def partitioned(*xs):
            return _run_custom_partitioned(call, xs, layout, is_kernel)
    else:
        return call(*arrays)
    return _with_rules(partitioned, call if mesh is None else partitioned, call, arrays, layout, is_kernel)


def explicit_mesh(*arrays) -> jax.sharding.AbstractMesh | None:
    """The mesh whose Explicit axes shard these arrays, or None.

    The mesh set with ``jax.set_mesh`` when there is one (None if it has no explicit
    axes: Auto axes, or inside shard_map where every axis is manual); else the mesh in
    the arrays' types -- ``jax.make_mesh`` + ``device_put`` with no mesh set, as a user of
    ``impl="xla"`` writes it.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh if mesh.explicit_axes else None
    for a in arrays:
        m = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
        if m is not None and not m.empty and m.explicit_axes:
            return m
    return None


def _mesh_context(mesh):
    """``mesh`` as the current abstract mesh when none is set (the explicit idiom
    without ``jax.set_mesh``): shard_map and reshard read it from there."""
    return contextlib.nullcontext() if not jax.sharding.get_abstract_mesh().empty else (
        jax.sharding.use_abstract_mesh(mesh))


def _auto_partitioned(is_kernel: bool) -> bool:
    """Whether a kernel call (or a jnp path marked ``partition_jnp``) goes through
    custom_partitioning (Auto axes).

    With a mesh of several devices set (``jax.set_mesh``) whose axes are Auto; with no
    mesh set (``Mesh`` + ``device_put`` + ``jit``, or the legacy ``with mesh:``, which
    sets none) whenever the process sees several devices, since the shardings are only
    known to the partitioner. On one device nothing is wrapped: no cost. Inside
    ``shard_map`` (every axis manual) the arrays are already local. Not on TPU: libtpu
    cannot compile custom_partitioning (jax-ml/jax#38196); a set Auto mesh raises
    instead (:data:`_NO_TPU_AUTO_PARTITIONING`), no mesh leaves the kernel whole.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        several = jax.device_count() > 1
    else:
        several = mesh.size > 1 and bool(mesh.auto_axes)
    if not several:
        return False
    if "tpu" in _common.target_platforms():
        if is_kernel and not mesh.empty:
            raise NotImplementedError(_NO_TPU_AUTO_PARTITIONING)
        return False
    return True


_NO_TPU_AUTO_PARTITIONING = (
    "a Pallas kernel cannot run on TPU under Auto mesh axes: Mosaic kernels are not "
    "partitioned automatically and libtpu cannot compile custom_partitioning "
    "(jax-ml/jax#38196). Use explicit mesh axes (jax.make_mesh's default) or call the op "
    "inside shard_map"
)


# --- vmap and autodiff of a partitioned call ---------------------------------------------------


def _with_rules(partitioned, differentiable, call, arrays, layout: Layout, is_kernel: bool):
    """``partitioned(*arrays)`` with a batching rule and a JVP.

    Neither mechanism batches by itself (custom_partitioning has no batching rule; the
    internal shard_map cannot be batched over an axis that is itself split), so under
    ``vmap`` a ``custom_vmap`` rule runs the call again, partitioned, on the batched
    arrays: the vmapped axis is one more factor of the layout, independent across its
    elements, so it may be split over devices like the rows (:func:`_batched_layout`).
    custom_vmap and custom_partitioning have no transpose (or, the latter, no JVP), so a
    ``custom_jvp`` on the outside differentiates ``differentiable`` instead: the
    internal shard_map under explicit axes, the unpartitioned call under Auto axes
    (the kernels' JVP is the jnp path's, which XLA partitions).
    """
    batchable = jax.custom_batching.custom_vmap(partitioned)

    @batchable.def_vmap
    def _rule(axis_size, in_batched, *xs):
        del axis_size
        batched = _batched_layout(layout, call, in_batched)
        vcall = jax.vmap(call, in_axes=tuple(0 if b else None for b in in_batched))
        out = _run_flat(vcall, list(xs), batched, is_kernel)
        return out, jax.tree.map(lambda _: True, out)

    fn = jax.custom_jvp(batchable)
    fn.defjvp(lambda primals, tangents: jax.jvp(differentiable, primals, tangents))
    return fn(*arrays)


def _batched_layout(layout: Layout, call, in_batched: Sequence[bool]) -> Layout:
    """``layout`` of ``vmap(call)`` with the batched operands' vmapped axis (moved to the
    front by custom_vmap) and every result's leading axis a new factor. Its elements are
    independent, so a device holding some of them runs the unbatched local function on
    each (``vmap`` of it: its collectives, over the other factors' axes, batch as usual)."""
    taken = {f for s in layout.operands + layout.results for f in s.split()}
    b = next(f"vmap{i}" for i in range(len(taken) + 1) if f"vmap{i}" not in taken)
    in_axes = tuple(0 if bt else None for bt in in_batched)
    inner = layout.local or linear_local(layout)

    def local(assign, fn, is_kernel):
        del fn  # the batched call; each element runs the unbatched one's local function
        unbatched = {f: axes for f, axes in assign.items() if f != b}
        return jax.vmap(inner(unbatched, call, is_kernel), in_axes=in_axes, out_axes=0)

    return Layout(tuple(f"{b} {s}" if bt else s for s, bt in zip(layout.operands, in_batched)),
                  tuple(f"{b} {s}" for s in layout.results), sums=layout.sums, whole=layout.whole, local=local,
                  partition_jnp=layout.partition_jnp)


def _run_explicit(call, arrays, layout: Layout, mesh, is_kernel: bool):
    explicit = set(mesh.explicit_axes)
    specs = []
    for a in arrays:
        spec = _padded(jax.typeof(a).sharding.spec, jnp.ndim(a))
        specs.append(tuple(tuple(x for x in axes if x in explicit) for axes in spec))
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    assign = assign_factors(layout, specs, [jnp.shape(a) for a in arrays], sizes)
    in_specs = tuple(_spec(f, assign) for f in layout.factors)
    arrays = [jax.sharding.reshard(a, s) if _padded(s, jnp.ndim(a)) != spec else a
              for a, s, spec in zip(arrays, in_specs, specs)]
    if not assign:
        # Nothing split: every device would run the whole call. (Also what custom_vmap
        # traces for the unbatched shapes under vmap of a split axis, where JAX keeps
        # that axis from a shard_map inside; the batched call splits it.)
        return call(*arrays)
    local = _local_fn(layout, assign, call, is_kernel)
    tree = []

    def flat_local(*xs):
        leaves, t = jax.tree.flatten(local(*xs))
        tree.append(t)
        return tuple(leaves)

    out_specs = tuple(_spec(f, assign) for f in layout.result_factors())
    # check_vma=False: a result that is replicated over a split factor it does not
    # depend on (db over dense's k) is computed identically on every device; the
    # local functions issue every reduction the math needs themselves.
    out = jax.shard_map(flat_local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                        axis_names=frozenset(explicit), check_vma=False)(*arrays)
    return jax.tree.unflatten(tree[0], out)


def _rule_string(layout: Layout) -> str:
    return ", ".join(layout.operands) + " -> " + ", ".join(layout.results)


def _run_custom_partitioned(call, arrays, layout: Layout, is_kernel: bool):
    out_tree = jax.tree.structure(jax.eval_shape(call, *arrays))

    def flat_call(*xs):
        return tuple(jax.tree.leaves(call(*xs)))

    def partition(mesh, arg_shapes, result_shape):
        specs = [_padded(s.sharding.spec, len(s.shape)) for s in arg_shapes]
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        assign = assign_factors(layout, specs, [s.shape for s in arg_shapes], sizes)
        local = _local_fn(layout, assign, call, is_kernel)

        def lower(*xs):
            return tuple(jax.tree.leaves(local(*xs)))

        arg_shardings = tuple(NamedSharding(mesh, _spec(f, assign)) for f in layout.factors)
        result_shardings = tuple(NamedSharding(mesh, _spec(f, assign)) for f in layout.result_factors())
        return mesh, lower, result_shardings, arg_shardings

    wrapped = custom_partitioning(flat_call)
    wrapped.def_partition(partition=partition, sharding_rule=_rule_string(layout),
                          need_replication_factors=tuple(layout.whole))
    return jax.tree.unflatten(out_tree, wrapped(*arrays))


# --- cotangents of replicated inputs ----------------------------------------------------------


def match_cotangent(ct: jax.Array | None, primal: jax.Array | None) -> jax.Array | None:
    """``ct`` reduced to ``primal``'s type, as JAX's autodiff reduces it.

    Inside ``shard_map`` a parameter replicated over an axis (``w`` while the batch is
    split over ``"data"``) enters a per-device computation; its cotangent comes out
    varying over that axis, one partial sum per device, and the parameter's cotangent is
    their sum: ``psum`` over the axes ``ct`` varies on and the primal does not (the
    transpose of JAX's implicit ``pvary``). With explicit mesh axes, the cotangent gets
    the primal's sharding.
    """
    if ct is None or primal is None:
        return ct
    extra = tuple(sorted(_varying(ct) - _varying(primal)))
    if extra:
        ct = jax.lax.psum(ct, extra)
    mesh = explicit_mesh(primal)
    if mesh is not None:
        want = jax.typeof(primal).sharding.spec
        if _padded(jax.typeof(ct).sharding.spec, ct.ndim) != _padded(want, ct.ndim):
            with _mesh_context(mesh):
                ct = jax.sharding.reshard(ct, want)
    return ct


def _varying(x: jax.Array) -> frozenset[str]:
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset() if mat is None else frozenset(mat.varying)
