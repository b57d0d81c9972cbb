"""The ops' *sharded* forward + backward compiled for 8 H100s and a TPU v5e 2x4 slice, on CPU.

Each case compiles ``jax.value_and_grad`` of ``sum(op(...))`` (w.r.t. the op's float
inputs, ``impl="pallas"``) for an abstract multi-device topology, with the inputs placed
by ``NamedSharding``\\ s, under both explicit mesh axes (the ops partition through an
internal ``shard_map``) and auto mesh axes (``custom_partitioning``; see
``fusedvjp/ops/_sharding.py``):

* data parallel: the batch (first) dim over ``"data"`` (8 devices), parameters replicated;
* dense_tanh column-parallel (``w`` and ``b`` split on N over ``"model"``) and
  row-parallel (``x``'s K and ``w``'s K over ``"model"``) on a 4 x 2 ``("data", "model")`` mesh;
* softmax_cross_entropy_with_integer_labels vocabulary-parallel: logits
  ``P("data", "model")``, labels ``P("data")``;
* linear_softmax_cross_entropy_with_integer_labels data parallel (``x`` and labels over
  ``"data"``) and vocabulary-parallel (``w`` and ``b`` split on V over ``"model"``, ``x``
  and labels over ``"data"``).

A case fails when the compile fails, when a Pallas kernel traced for the target is not
in the executable (Triton custom calls ``fusedvjp_*`` on CUDA, Mosaic
``tpu_custom_call``\\ s on TPU), when a kernel is handed an array with the full batch
dimension (it runs on the whole batch, not on its shard) or, vocabulary-parallel, the full
vocabulary, or when a collective moves an activation-sized array: any collective whose
array has the full batch dimension (an all-gather of activations) and,
vocabulary-parallel, any collective of an array with the vocabulary dimension -- except
the all-reduce over ``"data"`` of a V-split parameter's gradient slice (linear
cross-entropy's dW [D, V/model] and db [V/model]: partial sums over the rows). The
collectives found are printed per case (``pytest -s``),
and as one table at the end of the module.

Topologies (``jax.experimental.topologies.get_topology_desc``): CUDA ``"1x1x8"`` (slices
x hosts x GPUs per host: one host of 8 H100s; ``"1x2x4"`` is two hosts of 4) and TPU
``"v5e:2x4"`` (8 chips on 2 hosts; ``"v5e:2x2"`` is 4 chips on one).

Two things only an ahead-of-time compile on a CPU host needs, both handled here:

* the partition callback of ``custom_partitioning`` lowers the Triton kernel while XLA
  compiles; Pallas asks the *current* mesh which GPU it lowers for (on a CPU host the
  default device is the CPU), so the compile runs under ``jax.set_mesh(mesh)`` too;
* auto axes partition the kernels only when the ops see more than one device: on a GPU
  host ``jax.device_count() > 1`` says so; here, the mesh set with ``jax.set_mesh``.

Known limit: libtpu has no handler for ``custom_partitioning`` (jax-ml/jax#38196, open:
``Custom emitter for CustomSPMDPartitioning not found``; registering the partitioner
with libtpu's C API does not help), and Mosaic kernels refuse XLA's automatic
partitioning. So on TPU under auto axes the kernels refuse the case (impl="auto" falls
back to jnp); the test checks the error names the ways that work (explicit axes, shard_map).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedvjp.bench import static
from fusedvjp.ops import registry

# target -> the topology compiled for; every mesh below uses its 8 devices.
TOPOLOGIES = {"h100": "1x1x8", "v5e": "v5e:2x4"}
N_DEVICES = 8
MESH_1D = (("data",), (8,))
MESH_2D = (("data", "model"), (4, 2))
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}

# No parameter dimension equals M (the batch) or V: a collective of an array with such a
# dimension is one of activations (or, vocabulary-parallel, of the vocabulary).
M = 1024
V = 32000
DENSE = (M, 512, 256)
LAYER_NORM = (M, 768)
XENT = (M, V)
LCE = (M, 512, V)  # (N, D, V)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")


@dataclasses.dataclass(frozen=True)
class ShardCase:
    """One sharded compile: an op at a shape (bf16), its mesh and each input's spec."""

    op: str
    parallel: str  # "data", "column", "row", "vocab"
    shape: tuple[int, ...]
    mesh: tuple[tuple[str, ...], tuple[int, ...]]
    specs: tuple[P, ...]

    @property
    def label(self) -> str:
        return f"{self.op}-{self.parallel}"

    @property
    def n_data(self) -> int:
        names, sizes = self.mesh
        return sizes[names.index("data")]


CASES = (
    ShardCase("dense", "data", DENSE, MESH_1D, (P("data"), P(), P())),
    ShardCase("dense_tanh", "data", DENSE, MESH_1D, (P("data"), P(), P())),
    ShardCase("dense_tanh", "column", DENSE, MESH_2D, (P("data"), P(None, "model"), P("model"))),
    ShardCase("dense_tanh", "row", DENSE, MESH_2D, (P("data", "model"), P("model", None), P())),
    ShardCase("layer_norm", "data", LAYER_NORM, MESH_1D, (P("data"), P(), P())),
    ShardCase("rms_norm", "data", LAYER_NORM, MESH_1D, (P("data"), P())),
    ShardCase("softmax_cross_entropy", "data", XENT, MESH_1D, (P("data"), P("data"))),
    ShardCase("softmax_cross_entropy_with_integer_labels", "data", XENT, MESH_1D, (P("data"), P("data"))),
    ShardCase("softmax_cross_entropy_with_integer_labels", "vocab", XENT, MESH_2D, (P("data", "model"), P("data"))),
    # x [N, D], w [D, V], b [V], labels [N].
    ShardCase("linear_softmax_cross_entropy_with_integer_labels", "data", LCE, MESH_1D,
              (P("data"), P(), P(), P("data"))),
    ShardCase("linear_softmax_cross_entropy_with_integer_labels", "vocab", LCE, MESH_2D,
              (P("data"), P(None, "model"), P("model"), P("data"))),
)

# (target, op, parallelism, axis type, collectives), filled as the cases run.
TABLE: list[tuple[str, str, str, str, str]] = []


# --- topologies and meshes ------------------------------------------------------------------


@functools.cache
def topology(target: str):
    from jax.experimental import topologies

    t = static.get_target(target)
    static.use_cpu_backend()
    if t.platform == "cuda":
        spec = (static.GPU_TARGETS_DIR / t.spec_file).read_text()
        return topologies.get_topology_desc(platform="cuda", target_config=spec, topology=TOPOLOGIES[target])
    static.target_mesh(target)  # sets up libtpu the way the one-device tier does
    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[target])


@functools.cache
def mesh_for(target: str, names: tuple[str, ...], sizes: tuple[int, ...], axis_type: str) -> jax.sharding.Mesh:
    from jax.experimental import mesh_utils

    devices = list(topology(target).devices)
    assert len(devices) == N_DEVICES, f"{target} {TOPOLOGIES[target]}: {len(devices)} devices"
    grid = mesh_utils.create_device_mesh(sizes, devices)
    return jax.sharding.Mesh(grid, names, axis_types=(AXIS_TYPES[axis_type],) * len(names))


# --- the compiled text ------------------------------------------------------------------------

_SHAPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%\S+ = (.*?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", re.M)
_KERNEL_CALL = re.compile(r'^\s*(?:ROOT\s+)?%(\S+) = (.*?) custom-call\(.*?custom_call_target="'
                          r'(__gpu\$xla\.gpu\.triton|tpu_custom_call|mosaic_gpu_v2)"'
                          r'(?:, operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\})?')


def shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an HLO type (a tuple type gives several)."""
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(type_text)]


def fmt(dtype: str, dims: tuple[int, ...]) -> str:
    return f"{dtype}[{','.join(map(str, dims))}]"


def collectives(hlo: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """(op, arrays of its result) of every collective in the compiled HLO, fused ones
    included (an async ``*-start`` result holds the operand and the result)."""
    return [(op, shapes(ty)) for ty, op in _COLLECTIVE.findall(hlo)]


def summarize(found) -> str:
    counts: dict[str, int] = {}
    for op, arrays in found:
        key = f"{op} {' '.join(fmt(*a) for a in arrays)}"
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{k}" + (f" x{n}" if n > 1 else "") for k, n in sorted(counts.items())) or "none"


def kernel_calls(hlo: str) -> list[dict]:
    """Every Pallas kernel call: its names (Triton: the config's ``name``; Mosaic GPU and TPU: the
    ``fusedvjp_*`` scope in its ``op_name``, else the instruction's name) and the arrays
    of its result and operands."""
    out = []
    for line in hlo.splitlines():
        m = _KERNEL_CALL.match(line)
        if not m:
            continue
        if m.group(3) == "mosaic_gpu_v2":
            # The kernel's own name, in its serialized module (op_name lacks it under
            # custom_partitioning).
            names = set(re.findall(r"(fusedvjp_\w+?)_mosaic_gpu", line))
        elif m.group(3) == "tpu_custom_call":
            names = (re.findall(r"/(fusedvjp_\w+)/pallas_call", line)
                     or re.findall(r"^(fusedvjp_\w+?)(?:\.\d+|$)", m.group(1)))
        else:
            names = [c["name"] for c in static.triton_calls(line)]
        out.append({"names": set(names), "arrays": shapes(m.group(2)) + shapes(m.group(4) or "")})
    return out


# --- the cases --------------------------------------------------------------------------------


def function_and_args(case: ShardCase, mesh: jax.sharding.Mesh):
    spec = registry.get(case.op)
    abstract = spec.abstract_inputs(case.shape, jnp.bfloat16)
    args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))
                 for a, s in zip(abstract, case.specs, strict=True))
    op = functools.partial(spec.fn, impl="pallas")
    argnums = spec.diff_argnums

    def fwd_bwd(*args):
        def total(*diff):
            full = list(args)
            for i, a in zip(argnums, diff):
                full[i] = a
            return jnp.sum(op(*full).astype(jnp.float32))

        return jax.value_and_grad(total, argnums=tuple(range(len(argnums))))(*(args[i] for i in argnums))

    return fwd_bwd, args


def compile_sharded(case: ShardCase, target: str, axis_type: str):
    mesh = mesh_for(target, *case.mesh, axis_type)
    platform = static.get_target(target).platform
    with jax.set_mesh(mesh):
        fn, args = function_and_args(case, mesh)
        traced = jax.jit(fn).trace(*args)
        kernels = {k["name"] for k in static.pallas_kernels(traced.jaxpr, platform)}
        lowered = traced.lower()
        # Under set_mesh: custom_partitioning's callback lowers the Triton kernels during
        # this compile, and Pallas reads the target GPU off the current mesh.
        compiled = lowered.compile()
    return compiled, kernels


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if TABLE:
        print("\n\n| target | op | parallelism | axis type | collectives (result arrays, per device) |")
        print("| --- | --- | --- | --- | --- |")
        for row in TABLE:
            print("| " + " | ".join(row) + " |")


@pytest.mark.parametrize("axis_type", tuple(AXIS_TYPES))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
@pytest.mark.parametrize("target", tuple(TOPOLOGIES))
def test_sharded_fwd_bwd_compiles(target, case, axis_type):
    platform = static.get_target(target).platform
    t0 = time.perf_counter()
    if platform == "tpu" and axis_type == "auto":
        # Mosaic kernels refuse automatic partitioning and libtpu cannot compile
        # custom_partitioning (jax-ml/jax#38196): the ops refuse, naming the ways that work.
        with pytest.raises(NotImplementedError, match="explicit mesh axes"):
            compile_sharded(case, target, axis_type)
        TABLE.append((target, case.op, case.parallel, axis_type, "refused: use explicit axes (jax-ml/jax#38196)"))
        return
    compiled, traced_kernels = compile_sharded(case, target, axis_type)
    seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    label = f"{target} {TOPOLOGIES[target]} {case.label} {axis_type}"

    # The kernels are there, for this target's backend.
    assert traced_kernels, f"{label}: no Pallas kernel was traced for {platform}"
    calls = kernel_calls(hlo)
    compiled_kernels = set().union(*(c["names"] for c in calls)) if calls else set()
    assert all(n.startswith("fusedvjp_") for n in compiled_kernels), f"{label}: {compiled_kernels}"
    assert traced_kernels <= compiled_kernels, (
        f"{label}: Pallas kernels missing from the executable: {sorted(traced_kernels - compiled_kernels)}")

    # They run on shards: no kernel sees the full batch, and some kernel sees the local one.
    arrays = [(sorted(c["names"]), a) for c in calls for a in c["arrays"]]
    whole = [(names, fmt(*a)) for names, a in arrays if M in a[1]]
    assert not whole, f"{label}: kernels given the whole batch (M={M}): {whole}"
    local_m = M // case.n_data
    assert any(local_m in a[1] for _, a in arrays), (
        f"{label}: no kernel array has the local batch {local_m}: {[(n, fmt(*a)) for n, a in arrays]}")

    # No collective of activations (the full batch dim); vocab-parallel: none of the vocabulary.
    found = collectives(hlo)
    mentioned = re.findall(r"\b(?:" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo)
    assert len(mentioned) == len(found), f"{label}: {len(mentioned)} collectives in the HLO, {len(found)} parsed"
    summary = summarize(found)
    print(f"\n[{label}] compiled in {seconds:.1f}s; kernels {sorted(compiled_kernels)}; collectives: {summary}")
    TABLE.append((target, case.op, case.parallel, axis_type, summary))
    activations = [(op, fmt(*a)) for op, outs in found for a in outs if M in a[1]]
    assert not activations, f"{label}: collectives of activation-sized arrays: {activations}"
    if case.parallel == "vocab":
        v_dims = {V, V // dict(zip(*case.mesh))["model"]}
        params = param_shards(case)
        vocab = [(op, fmt(*a)) for op, outs in found for a in outs if v_dims & set(a[1]) and a[1] not in params]
        assert not vocab, f"{label}: collectives of arrays with the vocabulary dim: {vocab}"
        whole_v = [(names, fmt(*a)) for names, a in arrays if V in a[1]]
        assert not whole_v, f"{label}: kernels given the whole vocabulary (V={V}): {whole_v}"


def param_shards(case: ShardCase) -> set[tuple[int, ...]]:
    """Per-device shapes of the parameters (inputs not split over "data") that are split
    over another axis: their gradients' slices are partial sums over the rows, all-reduced
    over "data" -- a vocabulary-parallel collective that carries V / model by right."""
    sizes = dict(zip(*case.mesh))
    out = set()
    for a, spec in zip(registry.get(case.op).abstract_inputs(case.shape, jnp.bfloat16), case.specs, strict=True):
        entries = [(e,) if isinstance(e, str) else tuple(e or ()) for e in spec]
        if not entries or "data" in sum(entries, ()) or not any(entries):
            continue
        entries += [()] * (len(a.shape) - len(entries))
        out.add(tuple(d // math.prod(sizes[x] for x in axes) for d, axes in zip(a.shape, entries)))
    return out
