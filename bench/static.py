"""Compile for an H100/H200/A100/B200 or a TPU v5e/v6e on this CPU machine and read the compiler's answer.

``python -m fusedvjp.bench --static --target h100|h200|a100|b200|v5e|v6e [--ops ...] [--shapes mnist,llm,odd]
[--dtypes f32,bf16] [--out DIR]`` compiles the forward and backward of every registered op
(``jax.vjp`` of the op applied to a cotangent, ``impl="pallas"``) and the MNIST training
step, without a GPU or TPU: XLA compiles for a target it is only told about, all the way
to the cubin (CUDA) or the TPU executable. Nothing is timed; the report gives, per kernel,
what the compiler decided, and per op the memory XLA plans and the roofline floor.

How (jax 0.11.2, the ``aot`` extra: ``jax[cuda13]`` and ``jax[tpu]``; ``JAX_PLATFORMS=cpu``):

* CUDA: ``topologies.get_topology_desc(platform="cuda", target_config=TEXT, topology="1x1x1")``
  where TEXT is XLA's ``GpuTargetConfigProto`` of the card (``gpu_targets/*.txtpb``, copies
  of openxla/xla's specs), a one-device mesh, ``jax.set_mesh`` and abstract inputs with a
  ``NamedSharding``, then ``.lower().compile()``. The per-compile debug options dump the
  PTX and the thunk sequence (each kernel's grid, threads and shared memory); ``ptxas -v``
  on the dumped PTX gives registers and spills; the PTX text says whether a dot uses the
  tensor cores (``wgmma.mma_async`` on sm_90a, ``tcgen05.mma`` on sm_100a, ``mma.sync`` on
  sm_80 and for small tiles).
* TPU: ``topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")`` (a 1x1
  topology is refused), a mesh of its first device, the same compile. Mosaic compile
  errors and VMEM overflows fail the compile; ``cost_analysis()`` gives XLA's bytes and
  ``optimal_seconds``. Per kernel: the grid and block shapes from the traced
  ``pallas_call`` and Pallas's double-buffered VMEM estimate.

The ops pick the kernel for the platform being lowered for (``kernels/_common.
platform_dispatch``), so a TPU target gets the Mosaic TPU kernels, a Hopper (H100, H200)
the Mosaic GPU kernels where they serve the case and the Triton ones elsewhere, and any
other GPU (A100, B200) the Triton kernels only. ``tests_aot/`` runs the same compiles in
CI and fails on a compile error, a register spill
(``xla_gpu_fail_ptx_compilation_on_register_spilling``) or a bf16 matmul kernel with no
tensor-core instruction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusedvjp.bench import cases as cases_lib
from fusedvjp.ops import registry

HERE = pathlib.Path(__file__).resolve().parent
GPU_TARGETS_DIR = HERE / "gpu_targets"
RESULTS_DIR = HERE / "results"
SHAPE_SETS = ("mnist", "llm", "odd")
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
# The MNIST training step at the full batch and at the last partial batch of an epoch
# (60000 = 468 * 128 + 96; the training loop keeps the partial batch).
TRAIN_STEP_SHAPES = (cases_lib.TRAIN_STEP_SHAPE, (60000 % 128, *cases_lib.TRAIN_STEP_SHAPE[1:]))
# Ops whose bf16 flops run on the tensor cores / MXU; the others do f32 vector math
# whatever their input dtype, so their floor uses the f32 rate.
MATMUL_OPS = ("dense", "dense_tanh", "dense_gelu", "linear_softmax_cross_entropy_with_integer_labels", cases_lib.TRAIN_STEP)


# --- targets ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """A device compiled for without being present.

    Attributes:
      name: CLI name (``h100``).
      platform: ``"cuda"`` or ``"tpu"``.
      device: what the card or chip is.
      hbm_bytes_per_s: HBM bandwidth of the floor.
      peak_flops: ``{"bf16": tensor-core/MXU rate, "f32": IEEE f32 rate}`` in flop/s.
      memory_bytes: device memory.
      peak_source: where the three numbers come from.
      spec_file: CUDA: the ``GpuTargetConfigProto`` text file in ``gpu_targets/``.
      topology: TPU: the topology name given to ``get_topology_desc``.
      gpu: CUDA: the per-SM limits used for occupancy (from the spec file).
      arch: CUDA: the ptxas architecture (``sm_90a``), from the spec's compute capability.
      vmem_scoped_bytes: TPU: the default scoped VMEM a kernel may use.
    """

    name: str
    platform: str
    device: str
    hbm_bytes_per_s: float
    peak_flops: Mapping[str, float]
    memory_bytes: int
    peak_source: str
    spec_file: str | None = None
    topology: str | None = None
    gpu: Mapping[str, int] | None = None
    vmem_scoped_bytes: int | None = None
    arch: str | None = None


# XLA's target specs: key numbers of the rate tables are xla::PrimitiveType values.
_XLA_F32, _XLA_BF16 = 11, 16
# Not in the spec: CUDA compute capability 8.0, 9.0 and 10.0 limits, the same on the three
# (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"): 32
# resident blocks per SM, registers allocated per warp in units of 256, shared memory in
# units of 128 bytes with 1 KiB reserved per block.
_MAX_BLOCKS_PER_SM = 32
_REG_ALLOC_UNIT = 256
_SMEM_ALLOC_UNIT = 128
_SMEM_RESERVED_PER_BLOCK = 1024

_GPU_SPECS = {
    "h100": ("h100_sxm.txtpb", "NVIDIA H100 SXM 80GB HBM3"),
    "h200": ("h200.txtpb", "NVIDIA H200 SXM 141GB HBM3e"),
    "a100": ("a100_sxm_80.txtpb", "NVIDIA A100 SXM4 80GB HBM2e"),
    "b200": ("b200.txtpb", "NVIDIA B200 180GB HBM3e"),
}
_GPU_DATASHEET = {
    "h100": "NVIDIA H100 datasheet (SXM): 989 TFLOP/s dense BF16, 67 TFLOP/s FP32, 3.35 TB/s HBM3",
    "h200": "NVIDIA H200 datasheet (SXM): 989 TFLOP/s dense BF16, 67 TFLOP/s FP32, 4.8 TB/s HBM3e",
    "a100": "NVIDIA A100 datasheet (SXM 80GB): 312 TFLOP/s dense BF16, 19.5 TFLOP/s FP32, 2.04 TB/s HBM2e",
    "b200": "NVIDIA HGX B200 datasheet per GPU (1/8): 2.25 PFLOP/s dense BF16, 75 TFLOP/s FP32; HBM3e 8 TB/s "
            "there, 7.67 TB/s in the spec (the spec's is used)",
}
# XLA's a100_sxm_80 spec has no rate tables: multiply-adds per SM per clock from NVIDIA's
# A100 whitepaper (GA100 SM: 4 tensor cores x 256 dense bf16 FMA, 64 FP32 FMA units).
_MACS_PER_CLOCK_NOT_IN_SPEC = {"a100": {"bf16": 1024, "f32": 64}}
# What serves the GPU ops on a target that is not a Hopper (the report's notes).
_KERNELS_NOTE = {
    "a100": "every GPU kernel is Pallas Triton: the Mosaic GPU dense kernels are written for Hopper (TMA, wgmma) "
            "and refuse any other device (kernels/_common.is_hopper); Triton lowers the bf16 dots to sm_80's "
            "`mma.sync`.",
    "b200": "every GPU kernel is Pallas Triton: the Mosaic GPU dense kernels use Hopper's wgmma, which sm_100 does "
            "not have, and refuse any device but a Hopper (kernels/_common.is_hopper); the Triton of jax 0.11.2's "
            "XLA lowers the bf16 dots to `tcgen05.mma` (Blackwell's tensor cores, accumulator in tensor memory), "
            "those of the smallest odd shapes (one 16x16 tile: 1x1x1, 8x16x10, 1x3x5) to `mma.sync`.",
}
# TPU peaks: Google Cloud TPU documentation (cloud.google.com/tpu/docs/v5e and /v6e), per
# chip. f32 at Precision.HIGHEST runs as six bf16 MXU passes, so its rate is taken as 1/6
# of bf16 (an estimate). The default scoped VMEM limit is Mosaic's (16 MiB on v5e, 32 MiB
# on v6e; a kernel may raise it with vmem_limit_bytes).
_TPUS = {
    "v5e": dict(topology="v5e:2x2", device="TPU v5e (v5 lite)", bf16=197e12, hbm=819e9, memory=16 * 2**30,
                vmem=16 * 2**20, source="Google Cloud TPU v5e docs: 197 TFLOP/s BF16, 819 GB/s HBM, 16 GiB per chip"),
    "v6e": dict(topology="v6e:2x2", device="TPU v6e (Trillium)", bf16=918e12, hbm=1640e9, memory=32 * 2**30,
                vmem=32 * 2**20, source="Google Cloud TPU v6e docs: 918 TFLOP/s BF16, 1640 GB/s HBM, 32 GiB per chip"),
}
TARGET_NAMES = (*_GPU_SPECS, *_TPUS)


def _spec_scalar(text: str, field: str) -> float:
    m = re.search(rf"^\s*{field}:\s*([0-9.eE+-]+)\s*$", text, re.M)
    if not m:
        raise ValueError(f"GPU target spec has no {field}")
    return float(m.group(1))


def _spec_rate(text: str, table: str, key: int) -> float:
    """Operations per second per SM of one rate table entry: clock * units * ops/clock (FMA = 1 op)."""
    block = text[text.index(table):]
    m = re.search(rf"rate_infos \{{\s*key: {key}\s*value \{{\s*clock_rate_ghz: ([0-9.]+)\s*units_per_core: (\d+)"
                  rf"\s*ops_per_clock: (\d+)", block)
    if not m:
        raise ValueError(f"GPU target spec has no {table} rate for type {key}")
    return float(m.group(1)) * 1e9 * int(m.group(2)) * int(m.group(3))


def _spec_arch(text: str) -> str:
    """The ptxas architecture of a spec's ``cuda_compute_capability``: ``sm_90a`` for 9.0
    with ACCELERATED_FEATURES (wgmma, setmaxnreg; ``sm_100a``: tcgen05), else ``sm_80``."""
    m = re.search(r"cuda_compute_capability \{([^}]*)\}", text)
    if not m:
        raise ValueError("GPU target spec has no cuda_compute_capability")
    field = lambda k: re.search(rf"\b{k}: (\w+)", m.group(1))  # noqa: E731
    major, minor, ext = field("major"), field("minor"), field("feature_extension")
    suffix = "a" if ext and ext.group(1) == "ACCELERATED_FEATURES" else ""
    return f"sm_{major.group(1)}{minor.group(1) if minor else 0}{suffix}"


def get_target(name: str) -> Target:
    """The :class:`Target` called ``name`` (one of :data:`TARGET_NAMES`)."""
    if name in _GPU_SPECS:
        file, device = _GPU_SPECS[name]
        text = (GPU_TARGETS_DIR / file).read_text()
        sms, clock = int(_spec_scalar(text, "core_count")), _spec_scalar(text, "clock_rate_ghz") * 1e9
        gpu = {k: int(_spec_scalar(text, k)) for k in ("core_count", "registers_per_core_limit",
                                                        "shared_memory_per_core", "threads_per_core_limit",
                                                        "shared_memory_per_block_optin", "threads_per_warp")}
        if name in _MACS_PER_CLOCK_NOT_IN_SPEC:
            macs = _MACS_PER_CLOCK_NOT_IN_SPEC[name]
            bf16, f32 = (2 * sms * macs[t] * clock for t in ("bf16", "f32"))
            gpu["bf16_macs_per_clock"] = macs["bf16"]
            source = (f"XLA's target spec gpu_targets/{file} (SMs, clock, bandwidth; it has no rate tables: "
                      f"multiply-adds per SM per clock from NVIDIA's A100 whitepaper, bf16 {macs['bf16']}, "
                      f"f32 {macs['f32']}, x {sms} SMs x {clock / 1e9:g} GHz); agrees with the ")
        else:
            # A tensor-core "op" in XLA's table is a multiply-add: 2 flops.
            bf16 = 2 * sms * _spec_rate(text, "matrix_unit_description", _XLA_BF16)
            f32 = 2 * sms * _spec_rate(text, "scalar_unit_description", _XLA_F32)
            # Tensor-core multiply-adds per SM per clock (the rate table's units x ops/clock).
            gpu["bf16_macs_per_clock"] = round(_spec_rate(text, "matrix_unit_description", _XLA_BF16) / clock)
            source = f"XLA's target spec gpu_targets/{file} (rate tables x {sms} SMs); agrees with the "
        return Target(name, "cuda", device, _spec_scalar(text, "memory_bandwidth"), {"bf16": bf16, "f32": f32},
                      int(_spec_scalar(text, "device_memory_size")), source + _GPU_DATASHEET[name],
                      spec_file=file, gpu=gpu, arch=_spec_arch(text))
    if name in _TPUS:
        t = _TPUS[name]
        return Target(name, "tpu", t["device"], t["hbm"], {"bf16": t["bf16"], "f32": t["bf16"] / 6}, t["memory"],
                      t["source"] + "; f32 (HIGHEST) = BF16 / 6 passes, an estimate", topology=t["topology"],
                      vmem_scoped_bytes=t["vmem"])
    raise ValueError(f"unknown target {name!r}; expected one of {', '.join(TARGET_NAMES)}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def unavailable_reason(platform: str) -> str | None:
    """Why this venv cannot compile for ``platform`` ("cuda"/"tpu"), or None if it can."""
    if platform == "cuda":
        if _installed("jax_plugins.xla_cuda13") or _installed("jax_plugins.xla_cuda12"):
            return None
        return "the jax CUDA plugin is not installed (pip install -c constraints.txt -e '.[aot]', or run .ci/aot)"
    if platform == "tpu":
        if _installed("libtpu"):
            return None
        return "libtpu is not installed (pip install -c constraints.txt -e '.[aot]', or run .ci/aot)"
    return f"unknown platform {platform!r}"


def use_cpu_backend() -> None:
    """Keeps JAX off the GPU/TPU plugins as a runtime (there is no device here): CPU only.

    ``JAX_PLATFORMS=cpu`` in the environment does the same when set before jax is imported.
    """
    if jax.config.jax_platforms != "cpu":
        jax.config.update("jax_platforms", "cpu")


@functools.cache
def target_mesh(name: str) -> jax.sharding.Mesh:
    """A one-device mesh of the target's abstract topology (cached: one per process)."""
    from jax.experimental import topologies

    target = get_target(name)
    reason = unavailable_reason(target.platform)
    if reason:
        raise RuntimeError(f"cannot compile for {name}: {reason}")
    use_cpu_backend()
    if target.platform == "cuda":
        text = (GPU_TARGETS_DIR / target.spec_file).read_text()
        topo = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
        return topologies.make_mesh(topo, (1,), ("x",))
    # libtpu locks /tmp/libtpu_lockfile for the chips of this host; compiling for an
    # abstract topology opens no chip, so several processes (pytest -n 2) may load it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology)
    return jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))


# --- cases ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StaticCase:
    """One compile: an op's forward and backward at a shape, dtype and option set.

    Attributes:
      op: a registry name, or ``"mnist_train_step"`` (one whole SGD step of the MLP).
      shape: the registry's shape convention (``(B, D, H, C)`` for the training step).
      dtype: ``"f32"`` or ``"bf16"``.
      shape_set: ``"mnist"``, ``"llm"`` (registry ``bench_shapes``) or ``"odd"`` (``test_shapes``).
      options: the op's keyword options, as sorted (name, value) pairs.
    """

    op: str
    shape: tuple[int, ...]
    dtype: str
    shape_set: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        opts = "".join(f"-{k}={v}" for k, v in self.options)
        return f"{cases_lib.short_name(self.op)}-{'x'.join(map(str, self.shape))}-{self.dtype}{opts}"

    def _bench_case(self) -> cases_lib.Case:
        return cases_lib.Case(self.op, self.shape, self.dtype, "fwd+bwd", self.shape_set)

    def bytes(self) -> int:
        """Minimal HBM bytes of forward + backward (the registry's count)."""
        return self._bench_case().bytes()

    def flops(self) -> int:
        return self._bench_case().flops()

    def function_and_args(self, sharding) -> tuple[Callable[..., Any], tuple]:
        """The function to compile and its abstract arguments, each placed by ``sharding``."""
        dtype = DTYPES[self.dtype]

        def place(tree):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

        if self.op == cases_lib.TRAIN_STEP:
            b, d, h, c = self.shape
            params = {"w1": (d, h), "b1": (h,), "w2": (h, c), "b2": (c,)}
            args = ({k: jax.ShapeDtypeStruct(s, dtype) for k, s in params.items()},
                    jax.ShapeDtypeStruct((b, d), dtype), jax.ShapeDtypeStruct((b,), jnp.int32))
            return _train_step, place(args)
        spec = registry.get(self.op)
        args = tuple(spec.abstract_inputs(self.shape, dtype))
        options = dict(self.options)
        out = jax.eval_shape(lambda *a: spec.reference(*a, **options), *args)
        op = functools.partial(spec.fn, impl="pallas", **options)
        fn = functools.partial(_fwd_bwd, op, spec.diff_argnums)
        return fn, place((*args, jax.ShapeDtypeStruct(out.shape, out.dtype)))


def _fwd_bwd(op, diff_argnums, *args_and_cotangent):
    *args, g = args_and_cotangent
    out, vjp = registry.vjp_wrt(op, args, diff_argnums)
    return out, vjp(g)


def _train_step(params, x, y):
    from fusedvjp.model import mlp

    return mlp.sgd_step(params, x, y, cases_lib.TRAIN_STEP_LR, "pallas")


def build_cases(
    ops: Iterable[str] | None = None,
    shape_sets: Iterable[str] = SHAPE_SETS,
    dtypes: Iterable[str] = tuple(DTYPES),
) -> list[StaticCase]:
    """Every (op, shape, dtype, option set) to compile, in order: shape set, dtype, op, shape.

    Args:
      ops: names or aliases (default: every registry op and ``mnist_train_step``).
      shape_sets: ``mnist`` (registry mnist bench shapes and the training step at the
        full and the last partial batch), ``llm`` (registry llm bench shapes), ``odd``
        (registry test shapes: sizes no block divides, and 1).
      dtypes: ``f32`` and/or ``bf16``.

    Raises:
      ValueError: an unknown op, shape set or dtype.
    """
    op_names = list(cases_lib.all_op_names()) if ops is None else [cases_lib.resolve_op(o) for o in ops]
    shape_sets, dtypes = list(shape_sets), list(dtypes)
    cases_lib.check_choices(("shape set", shape_sets, SHAPE_SETS), ("dtype", dtypes, DTYPES))
    out, seen = [], set()
    for shape_set in shape_sets:
        for dtype in dtypes:
            for op in dict.fromkeys(op_names):
                if op == cases_lib.TRAIN_STEP:
                    shapes, option_sets = (TRAIN_STEP_SHAPES if shape_set == "mnist" else ()), ({},)
                else:
                    spec = registry.get(op)
                    shapes = spec.test_shapes if shape_set == "odd" else spec.bench_shapes.get(shape_set, ())
                    option_sets = spec.options
                for shape in shapes:
                    for options in option_sets:
                        case = StaticCase(op, tuple(shape), dtype, shape_set, tuple(sorted(options.items())))
                        key = (case.op, case.shape, case.dtype, case.options)
                        if key not in seen:
                            seen.add(key)
                            out.append(case)
    return out


# --- compiling ----------------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
    """What one compile left: the executable (or the error) and where its dumps are."""

    case: StaticCase
    target: Target
    compiled: Any | None
    error: str | None
    lower_s: float
    compile_s: float
    dump_dir: pathlib.Path | None
    pallas_kernels: list[dict]

    @property
    def ok(self) -> bool:
        return self.error is None


@contextlib.contextmanager
def _mosaic_gpu_dumps(dump_dir):
    """Mosaic GPU compiles its kernels itself (to PTX, then ptxas) inside XLA's compile,
    out of XLA's dumps; its own environment switches put the PTX and the kernel's MLIR
    (with its launch: grid, threads, shared memory) under ``dump_dir/mosaic_gpu``."""
    if dump_dir is None:
        yield
        return
    where = pathlib.Path(dump_dir) / "mosaic_gpu"
    where.mkdir(parents=True, exist_ok=True)
    switches = {"MOSAIC_GPU_DUMP_TO": str(where), "MOSAIC_GPU_DUMP_PTX": "1"}
    saved = {k: os.environ.get(k) for k in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_MGPU_LAUNCH = re.compile(r"gpu\.launch.*?in \(%\w+ = %c(\d+), %\w+ = %c(\d+), %\w+ = %c(\d+)\) threads"
                          r".*?in \(%\w+ = %c(\d+), %\w+ = %c(\d+), %\w+ = %c(\d+)\)"
                          r"(?:.*?dynamic_shared_memory_size %c(\d+))?")


def mosaic_gpu_kernels(dump_dir: pathlib.Path, arch: str = "sm_90a") -> list[dict]:
    """The Mosaic GPU kernels of a compile (see ``_mosaic_gpu_dumps``): name, launch,
    registers and spills (``ptxas -v`` of the dumped PTX), wgmma and the wgmma loop."""
    where = dump_dir / "mosaic_gpu"
    out = []
    for ptx in sorted(where.glob("*.ptx")) if where.is_dir() else ():
        name = re.sub(r"_\d+$", "", ptx.stem)
        mlir = ptx.with_name(ptx.stem + ".before_layout_inference.txt")
        launch = _MGPU_LAUNCH.search(mlir.read_text()) if mlir.exists() else None
        if launch is None:
            continue
        text = ptx.read_text(errors="replace")
        info = next(iter(ptxas_info(ptx, arch).values()), {})
        out.append({"name": name, "grid": [int(launch.group(i)) for i in (1, 2, 3)],
                    "threads": math.prod(int(launch.group(i)) for i in (4, 5, 6)),
                    "dynamic_smem": int(launch.group(7) or 0), "ptx": {
                        **tensor_core_counts(text), **tensor_core_loop(text)}, "ptxas": info})
    return out


def compile_case(case: StaticCase, target_name: str, *, dump_dir: str | os.PathLike | None = None,
                 fail_on_spill: bool = False) -> Compiled:
    """Lowers and compiles ``case`` for ``target_name``; a compile error is returned, not raised.

    Args:
      case: what to compile.
      target_name: one of :data:`TARGET_NAMES`.
      dump_dir: CUDA: where XLA dumps the PTX and the thunk sequence (None: nothing dumped).
      fail_on_spill: CUDA: make a register spill fail the compile (XLA's own check).

    Returns:
      :class:`Compiled`. Tracing or lowering errors (a bug, or a kernel refusing the case)
      are returned the same way as compile errors.
    """
    target = get_target(target_name)
    mesh = target_mesh(target_name)
    options: dict[str, Any] = {}
    if target.platform == "cuda":
        options["xla_gpu_fail_ptx_compilation_on_register_spilling"] = fail_on_spill
        if dump_dir is not None:
            options.update(xla_dump_to=str(dump_dir), xla_dump_emitter_re="ptx",
                           xla_gpu_experimental_dump_gpu_executable=True)
    compiled, error, kernels = None, None, []
    t0 = time.perf_counter()
    lower_s = compile_s = 0.0
    try:
        with jax.set_mesh(mesh), _mosaic_gpu_dumps(dump_dir if target.platform == "cuda" else None):
            fn, args = case.function_and_args(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            traced = jax.jit(fn).trace(*args)
            kernels = pallas_kernels(traced.jaxpr, target.platform)
            lowered = traced.lower()
            lower_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            try:
                compiled = lowered.compile(compiler_options=options)
            finally:
                compile_s = time.perf_counter() - t1
    except Exception as e:  # noqa: BLE001 -- the error is the result
        error = f"{type(e).__name__}: {str(e).strip()}"
    return Compiled(case, target, compiled, error, lower_s, compile_s,
                    pathlib.Path(dump_dir) if dump_dir is not None else None, kernels)


# --- the traced kernels -----------------------------------------------------------------


def _sub_jaxprs(value) -> Iterable[Any]:
    from jax.extend import core as jex_core

    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, jex_core.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jex_core.Jaxpr):
            yield v


def _has_dot(jaxpr) -> list[str]:
    """The operand dtypes of every dot in a kernel body (nested bodies included)."""
    dots = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            dots.append("x".join(str(v.aval.dtype) for v in eqn.invars))
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                dots.extend(_has_dot(sub))
    return dots


def pallas_kernels(closed_jaxpr, platform: str) -> list[dict]:
    """The compiled (not interpreted) ``pallas_call``\\ s of a traced function for ``platform``.

    Each op traces one branch per platform (``platform_dispatch``); the kernels of the
    target's backend are told apart by their compiler params. Returns one dict per
    distinct kernel: ``name``, ``grid``, ``dots`` (operand dtypes of its dot_generals),
    and for TPU ``blocks`` (shape, dtype of each block) and ``vmem_estimate_bytes`` (two
    buffers per block, as the Pallas TPU pipeline double-buffers, plus the scratch).
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas import triton as plgpu

    from jax.experimental.pallas import mosaic_gpu as plmgpu

    want = (plgpu.CompilerParams, plmgpu.CompilerParams) if platform == "cuda" else (pltpu.CompilerParams,)
    found: dict[tuple, dict] = {}

    def walk(jaxpr):
        # platform_dependent traces a cond over platform_index: only the branch for
        # `platform` is compiled (on CUDA the Mosaic GPU or the Triton one, not both).
        platform_vars = {}
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "platform_index":
                platform_vars[eqn.outvars[0]] = eqn.params["platforms"]
                continue
            if eqn.primitive.name == "pallas_call":
                p = eqn.params
                if isinstance(p["compiler_params"], want) and not p["interpret"]:
                    _record(p)
                continue
            if eqn.primitive.name == "mpmd_map":  # a Mosaic GPU kernel (plgpu.kernel)
                p = eqn.params
                if isinstance(p.get("compiler_params"), want) and not p.get("interpret"):
                    name = str(p.get("name") or "kernel")
                    dots = sorted({d for v in p.values() for sub in _sub_jaxprs(v) for d in _has_dot(sub)})
                    found.setdefault((name,), {"name": name, "grid": [], "dots": dots})
                continue
            if eqn.primitive.name == "cond" and eqn.invars and eqn.invars[0] in platform_vars:
                platforms = platform_vars[eqn.invars[0]]
                branches = eqn.params["branches"]
                chosen = [b for i, b in enumerate(branches) if i < len(platforms) and platform in platforms[i]]
                for branch in chosen or branches:
                    walk(branch.jaxpr)
                continue
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    walk(sub)

    def _record(p):
        gm = p["grid_mapping"]
        name = str(p.get("name") or "kernel")
        blocks = []
        for bm in gm.block_mappings:
            # A squeezed dimension (None in the BlockSpec) holds one element.
            shape = tuple(d if isinstance(d := getattr(b, "block_size", b), int) else 1 for b in bm.block_shape)
            blocks.append((shape, str(bm.array_aval.dtype)))
        scratch = [(tuple(a.shape), str(a.dtype)) for a in getattr(gm, "scratch_avals", ()) if hasattr(a, "shape")]
        info = {"name": name, "grid": [int(g) for g in gm.grid], "dots": _has_dot(p["jaxpr"])}
        if platform == "tpu":
            nbytes = lambda s, d: math.prod(s) * jnp.dtype(d).itemsize  # noqa: E731
            info["blocks"] = [list(s) + [d] for s, d in blocks]
            info["vmem_estimate_bytes"] = (2 * sum(nbytes(s, d) for s, d in blocks)
                                           + sum(nbytes(s, d) for s, d in scratch))
        key = (name, tuple(info["grid"]), tuple(blocks))
        found.setdefault(key, info)

    walk(closed_jaxpr.jaxpr)
    return list(found.values())


# --- reading the CUDA compile ---------------------------------------------------------------

# A launch inside a while loop's body (a chunked op) is indented under the loop's thunk.
_THUNK = re.compile(r"^\s*\d+: (\w+) \[[^\]]*\] (\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]"
                    r"\s+shared_memory: (\d+) bytes", re.M)
_TRITON_CALL = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?backend_config=\{(.*?)\}\s*$', re.M)


def _last(dump_dir: pathlib.Path, suffix: str) -> str:
    files = sorted(dump_dir.glob(f"*{suffix}"))
    return files[-1].read_text(errors="replace") if files else ""


def triton_calls(hlo_text: str) -> list[dict]:
    """name, grid, num_warps, num_stages of every Pallas Triton custom call in an HLO text."""
    out = []
    for m in _TRITON_CALL.finditer(hlo_text):
        cfg = re.sub(r'ir = "(?:[^"\\]|\\.)*"', "", m.group(1))
        field = lambda k: re.search(rf"\b{k} = (?:\"([^\"]*)\"|(-?\d+))", cfg)  # noqa: E731
        name = field("name")
        if not name:
            continue
        num = lambda k: int(field(k).group(2)) if field(k) else None  # noqa: E731
        out.append({"name": name.group(1), "grid": [num("grid_x"), num("grid_y"), num("grid_z")],
                    "num_warps": num("num_warps"), "num_stages": num("num_stages")})
    return out


@functools.cache
def ptxas_path() -> str | None:
    """The ptxas of the CUDA wheels (``nvidia-cuda-nvcc``), else one on PATH."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cuda_nvcc", "cu12"):
            path = pathlib.Path(root) / sub / "bin" / "ptxas"
            if path.is_file():
                return str(path)
    return shutil.which("ptxas")


@functools.cache
def ptxas_version() -> str | None:
    path = ptxas_path()
    if not path:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V[\d.]+", out)
    return m.group(0) if m else out.strip().splitlines()[-1]


def ptxas_info(ptx_file: pathlib.Path, arch: str = "sm_90a") -> dict[str, dict]:
    """``ptxas -v`` of one PTX file: entry -> registers, spill bytes, stack, static smem."""
    path = ptxas_path()
    if path is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([path, "-v", "--gpu-name", arch, str(ptx_file), "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    info: dict[str, dict] = {}
    current = None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = info.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
                           spill_load_bytes=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem_bytes"] = int(s.group(1)) if s else 0
    return info


def spilling_kernels(case: StaticCase, target_name: str, dump_dir: pathlib.Path) -> str:
    """The kernels of ``case`` that spill registers on ``target_name``, in words.

    XLA's spill error names no kernel: this compiles again with spills allowed (so every
    kernel's PTX is dumped) and asks ptxas about each.
    """
    compile_case(case, target_name, dump_dir=dump_dir, fail_on_spill=False)
    arch = get_target(target_name).arch
    spilled = []
    for ptx in sorted(pathlib.Path(dump_dir).glob("*.ptx")):
        for name, info in ptxas_info(ptx, arch).items():
            if info.get("spill_store_bytes") or info.get("spill_load_bytes"):
                spilled.append(f"{name}: {info.get('registers')} regs, {info.get('spill_store_bytes')} B spill "
                               f"stores, {info.get('spill_load_bytes')} B spill loads")
    return "; ".join(spilled) or "(ptxas here reports no spill)"


def tensor_core_counts(ptx: str) -> dict[str, int]:
    """Tensor-core instructions in PTX text, per generation: ``mma.sync`` (warp-level, sm_80
    and up), ``wgmma.mma_async`` (warpgroup, sm_90a only), ``tcgen05.mma`` (one thread
    issues it for the CTA, accumulator in tensor memory; sm_100a)."""
    return {"wgmma": ptx.count("wgmma.mma_async"), "mma": len(re.findall(r"\bmma\.sync", ptx)),
            "tcgen05": len(re.findall(r"\btcgen05\.mma\b", ptx))}


def ptx_kernels(dump_dir: pathlib.Path) -> dict[str, dict]:
    """entry name -> PTX file, tensor-core instruction counts (wgmma, mma, tcgen05), from the dumped PTX."""
    out = {}
    for ptx in sorted(dump_dir.glob("*.ptx")):
        text = ptx.read_text(errors="replace")
        entries = list(re.finditer(r"\.entry (\w+)\(", text))
        for i, m in enumerate(entries):
            body = text[m.start(): entries[i + 1].start() if i + 1 < len(entries) else len(text)]
            out[m.group(1)] = {"ptx_file": ptx, **tensor_core_counts(body), **tensor_core_loop(body)}
    return out


_LABEL = re.compile(r"^\s*(\$\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$\w+);")
_WGMMA_SHAPE = re.compile(r"wgmma\.mma_async\S*\.m(\d+)n(\d+)k(\d+)")


def tensor_core_loop(ptx_body: str) -> dict:
    """The innermost PTX loop holding wgmma (a reduction step of a Hopper matmul): its
    instructions per thread and the multiply-adds its wgmma do per warpgroup.

    A loop is a label and a later branch back to it. Instructions are PTX statements
    (not directives, labels or braces), a close proxy for the SASS a warp issues.
    Empty when the kernel has no wgmma loop.
    """
    lines = ptx_body.splitlines()
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in labels:
            loops.append((labels[b.group(1)], i))
    best = None
    for start, end in loops:
        body = lines[start:end + 1]
        macs = sum(int(a) * int(b) * int(c) for a, b, c in _WGMMA_SHAPE.findall("\n".join(body)))
        if macs and (best is None or end - start < best[1] - best[0]):
            best = (start, end, body, macs)
    if best is None:
        return {}
    stmts = [ln for ln in best[2] if ln.strip().endswith(";") and not ln.strip().startswith((".", "//"))]
    return {"loop_instructions": len(stmts), "loop_wgmma_macs": best[3]}


def issue_ratio(kernel: dict, target: Target) -> float | None:
    """Instruction issue time over tensor-core time per step of the wgmma loop.

    Per SM, a CTA of W warps issues ``n`` instructions per warp per step over 4
    schedulers (one instruction a cycle each): n W / 4 cycles. Its W / 4 warpgroups do
    ``macs`` multiply-adds each (the loop's wgmma), at R tensor-core multiply-adds per
    SM per clock (XLA's rate table): macs W / 4 / R cycles. The ratio, n R / macs, is
    at most 1 when issue keeps up with the tensor cores (wgmma is asynchronous, so the
    two overlap).
    """
    n, macs = kernel.get("loop_instructions"), kernel.get("loop_wgmma_macs")
    if not n or not macs or target.gpu is None:
        return None
    return n * target.gpu["bf16_macs_per_clock"] / macs


def occupancy(target: Target, threads: int, registers: int | None, smem_bytes: int) -> dict:
    """Resident blocks per SM and the fraction of the SM's warps they fill, and the limiter."""
    g = target.gpu
    warps = max(1, math.ceil(threads / g["threads_per_warp"]))
    limits = {"warps": g["threads_per_core_limit"] // g["threads_per_warp"] // warps, "blocks": _MAX_BLOCKS_PER_SM}
    if registers:
        per_warp = math.ceil(registers * g["threads_per_warp"] / _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
        limits["registers"] = g["registers_per_core_limit"] // per_warp // warps
    if smem_bytes:
        per_block = math.ceil((smem_bytes + _SMEM_RESERVED_PER_BLOCK) / _SMEM_ALLOC_UNIT) * _SMEM_ALLOC_UNIT
        limits["shared memory"] = g["shared_memory_per_core"] // per_block
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "warps"))
    max_warps = g["threads_per_core_limit"] // g["threads_per_warp"]
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps / max_warps, "occupancy_limiter": limiter}


def gpu_kernel_stats(result: Compiled) -> list[dict]:
    """Per launched kernel: grid, waves, warps, stages, registers, shared memory, spills,
    occupancy, tensor-core instructions (from the thunk sequence, the HLO and ptxas)."""
    d = result.dump_dir
    if d is None:
        return []
    target = result.target
    calls = triton_calls(_last(d, "gpu_after_optimizations.txt"))
    # One kernel name can be launched with two configs (the MNIST step's two dense layers).
    call_of = {(c["name"], tuple(c["grid"])): c for c in calls}
    pallas_names = {c["name"] for c in calls}
    ptx = ptx_kernels(d)
    regs: dict[str, dict] = {}
    for f in sorted({k["ptx_file"] for k in ptx.values()}):
        regs.update(ptxas_info(f, target.arch))
    dots = {k["name"]: k["dots"] for k in result.pallas_kernels}
    launches = [dict(name=m.group(2), grid=[int(m.group(i)) for i in (3, 4, 5)],
                     threads=int(m.group(6)) * int(m.group(7)) * int(m.group(8)), dynamic_smem=int(m.group(9)))
                for m in _THUNK.finditer(_last(d, "thunk_sequence.txt"))]
    if not launches:  # the compile failed before the executable existed: the Pallas kernels from the HLO
        launches = [dict(name=c["name"], grid=c["grid"], threads=32 * (c["num_warps"] or 0), dynamic_smem=None)
                    for c in calls]
    # Mosaic GPU kernels launch from a custom call, not a thunk XLA names: from their own dumps.
    for k in mosaic_gpu_kernels(d, target.arch):
        launches.append(dict(name=k["name"], grid=k["grid"], threads=k["threads"], dynamic_smem=k["dynamic_smem"]))
        pallas_names.add(k["name"])
        ptx[k["name"]] = k["ptx"]
        regs[k["name"]] = k["ptxas"]
    out = []
    for launch in launches:
        name = launch["name"]
        base = _kernel_base_name(name)
        p, r, call = ptx.get(name, {}), regs.get(name, {}), call_of.get((base, tuple(launch["grid"])), {})
        smem = None if launch["dynamic_smem"] is None else launch["dynamic_smem"] + r.get("static_smem_bytes", 0)
        row = {
            "kernel": name,
            "source": "pallas" if base in pallas_names else "xla",
            "grid": launch["grid"],
            "blocks": math.prod(launch["grid"]),
            "warps": launch["threads"] // 32,
            "stages": call.get("num_stages"),
            "registers": r.get("registers"),
            "smem_bytes": smem,
            "spill_store_bytes": r.get("spill_store_bytes"),
            "spill_load_bytes": r.get("spill_load_bytes"),
            "stack_bytes": r.get("stack_bytes"),
            "wgmma": p.get("wgmma"),
            "mma": p.get("mma"),
            "tcgen05": p.get("tcgen05"),
            "loop_instructions": p.get("loop_instructions"),
            "loop_wgmma_macs": p.get("loop_wgmma_macs"),
            "dots": dots.get(base, []),
        }
        row["issue_ratio"] = issue_ratio(row, target)
        if launch["threads"]:
            row.update(occupancy(target, launch["threads"], row["registers"], smem or 0))
            per_wave = row["blocks_per_sm"] * target.gpu["core_count"]
            row["waves"] = row["blocks"] / per_wave if per_wave else None
        out.append(row)
    return out


def _kernel_base_name(name: str) -> str:
    """The kernel's own name: XLA names a second kernel of the same name (one Pallas kernel
    launched with two shapes, e.g. a chunk loop's body and its last chunk) ``name__1``."""
    return re.sub(r"__\d+$", "", name)


def kernel_variants(kernels: Mapping[str, dict], name: str) -> list[dict]:
    """The entries of ``kernels`` (by compiled name) that are the Pallas kernel ``name``."""
    return [v for k, v in kernels.items() if _kernel_base_name(k) == name]


def tensor_core_problems(result: Compiled, kernels: Sequence[dict] | None = None) -> list[str]:
    """bf16 matmul kernels (a Pallas kernel with a dot on bf16 operands) with no wgmma/mma/tcgen05."""
    if result.target.platform != "cuda":
        return []
    ptx = ptx_kernels(result.dump_dir) if kernels is None else {k["kernel"]: k for k in kernels}
    problems = []
    for k in result.pallas_kernels:
        if any("bfloat16" in d for d in k["dots"]):
            found = kernel_variants(ptx, k["name"])
            if not found:
                problems.append(f"{k['name']}: no PTX found for it")
            elif not all(f.get("wgmma") or f.get("mma") or f.get("tcgen05") for f in found):
                problems.append(f"{k['name']}: bf16 dot without tensor-core instructions (no wgmma, mma or tcgen05)")
    return problems


def compiled_kernel_names(result: Compiled) -> set[str]:
    """Names of the Pallas kernels in the compiled executable (from its HLO).

    CUDA: the ``name`` of each Triton custom call; TPU: the kernel name in each Mosaic
    custom call's ``op_name``. XLA may drop a kernel whose output is dead (the MNIST
    step's first-layer dx), so compare with the traced kernels as sets of names.
    """
    hlo = result.compiled.as_text()
    if result.target.platform == "cuda":
        mosaic = [line for line in hlo.splitlines() if 'custom_call_target="mosaic_gpu' in line]
        # A Mosaic GPU kernel's name is in its serialized module ("<name>_mosaic_gpu_kernel").
        return {c["name"] for c in triton_calls(hlo)} | {
            m for line in mosaic for m in re.findall(r"(fusedvjp_\w+?)_mosaic_gpu", line)}
    calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    return {m for line in calls for m in re.findall(r"/(fusedvjp_\w+)/pallas_call", line)}


def tpu_kernel_stats(result: Compiled) -> list[dict]:
    """Per Mosaic kernel: grid, steps, block shapes, the double-buffered VMEM estimate."""
    limit = result.target.vmem_scoped_bytes
    return [{"kernel": k["name"], "source": "pallas", "grid": k["grid"], "steps": math.prod(k["grid"]),
             "blocks": k["blocks"], "vmem_estimate_bytes": k["vmem_estimate_bytes"],
             "vmem_fraction_of_scoped": k["vmem_estimate_bytes"] / limit, "dots": k["dots"]}
            for k in result.pallas_kernels]


# --- one case's record ----------------------------------------------------------------------


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    mem = {f.removesuffix("_size_in_bytes") + "_bytes": int(getattr(ma, f, 0) or 0) for f in fields}
    peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    # Where XLA reports no peak (CUDA): everything live at once, arguments + outputs + temporaries.
    mem["peak_bytes"] = peak or (mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"] - mem["alias_bytes"])
    return mem


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- not every backend has one
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return {}
    keep = {"flops": "flops", "bytes accessed": "bytes_accessed", "optimal_seconds": "optimal_seconds",
            "transcendentals": "transcendentals"}
    # A negative value is XLA's "unknown" (v6e gives -1 s for some Mosaic-only modules).
    return {new: float(cost[old]) for old, new in keep.items() if old in cost and float(cost[old]) >= 0}


def floor(case: StaticCase, target: Target) -> dict:
    """Roofline floor of forward + backward: max(bytes / HBM bandwidth, flops / peak)."""
    nbytes, flops = case.bytes(), case.flops()
    rate = target.peak_flops["bf16" if case.dtype == "bf16" and case.op in MATMUL_OPS else "f32"]
    memory_s, compute_s = nbytes / target.hbm_bytes_per_s, flops / rate
    return {"bytes": nbytes, "flops": flops, "floor_s": max(memory_s, compute_s),
            "bound": "memory" if memory_s >= compute_s else "compute"}


def spills(kernels: Sequence[dict]) -> int:
    return sum((k.get("spill_store_bytes") or 0) + (k.get("spill_load_bytes") or 0) for k in kernels)


def analyze(case: StaticCase, target_name: str, work_dir: pathlib.Path) -> dict:
    """Compiles ``case`` (spills reported, not fatal) and returns its results.json record."""
    target = get_target(target_name)
    dump = work_dir / case.label if target.platform == "cuda" else None
    result = compile_case(case, target_name, dump_dir=dump, fail_on_spill=False)
    record = {"op": case.op, "shape": list(case.shape), "dtype": case.dtype, "shape_set": case.shape_set,
              "options": dict(case.options), "status": "ok" if result.ok else "error",
              "lower_s": round(result.lower_s, 2), "compile_s": round(result.compile_s, 2), **floor(case, target)}
    if not result.ok:
        record["error"] = result.error[:2000]
    if target.platform == "cuda":
        kernels = gpu_kernel_stats(result)
        record["kernels"] = kernels
        record["spill_bytes"] = spills(kernels)
        record["tensor_core_problems"] = tensor_core_problems(result, kernels) if result.dump_dir else []
    else:
        record["kernels"] = tpu_kernel_stats(result)
    if result.ok:
        record["memory"] = _memory(result.compiled)
        record["cost_analysis"] = _cost(result.compiled)
    record["problems"] = problems(record)
    return record


def problems(record: dict) -> list[str]:
    """What makes a record fail the tier: compile error, spills, bf16 dots off the tensor cores."""
    out = []
    if record["status"] != "ok":
        out.append("compile error: " + record.get("error", "").splitlines()[0][:200])
    for k in record.get("kernels", []):
        if (k.get("spill_store_bytes") or 0) + (k.get("spill_load_bytes") or 0):
            out.append(f"{k['kernel']} spills {k['spill_store_bytes']} B stores / {k['spill_load_bytes']} B loads")
    out.extend(record.get("tensor_core_problems", []))
    return out


# --- the run and its files ----------------------------------------------------------------


def run(target_name: str, cases: Sequence[StaticCase], log=print) -> dict:
    """Compiles every case for ``target_name``; returns the results.json document."""
    target = get_target(target_name)
    records = []
    with tempfile.TemporaryDirectory(prefix=f"fusedvjp-static-{target_name}-") as tmp:
        for i, case in enumerate(cases, 1):
            rec = analyze(case, target_name, pathlib.Path(tmp))
            records.append(rec)
            note = "; ".join(rec["problems"]) or "ok"
            log(f"[{i}/{len(cases)}] {target_name} {case.label}: {rec['compile_s']:.1f} s, {note}")
    return {
        "target": {"name": target.name, "device": target.device, "platform": target.platform,
                   "spec_file": target.spec_file, "arch": target.arch, "topology": target.topology,
                   "kernels_note": _KERNELS_NOTE.get(target.name),
                   "hbm_bytes_per_s": target.hbm_bytes_per_s, "peak_flops": dict(target.peak_flops),
                   "memory_bytes": target.memory_bytes, "peak_source": target.peak_source,
                   "vmem_scoped_bytes": target.vmem_scoped_bytes},
        "jax_version": jax.__version__,
        "ptxas": ptxas_version() if target.platform == "cuda" else None,
        "date": datetime.date.today().isoformat(),
        "results": records,
    }


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}"


def _fmt_s(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def _case_cell(r: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
    case = f"{cases_lib.short_name(r['op'])} {'x'.join(map(str, r['shape']))} {r['dtype']}"
    return case + (f" ({opts})" if opts else "")


def markdown(doc: dict) -> str:
    """results.md: the target, per op the memory and floor, per kernel the compiler's numbers."""
    t = doc["target"]
    rates = t["peak_flops"]
    lines = [f"# Static compile report: {t['device']} ({t['name']})", "",
             f"jax {doc['jax_version']}" + (f", ptxas {doc['ptxas']}" if doc.get("ptxas") else "")
             + f", {doc['date']}. "
             "Compiled on a CPU-only machine for a target that is not there: nothing here was run or timed. "
             f"Regenerate: `python -m fusedvjp.bench --static --target {t['name']}`.", "",
             f"- Peaks: HBM {t['hbm_bytes_per_s'] / 1e9:.0f} GB/s, bf16 {rates['bf16'] / 1e12:.0f} TFLOP/s, "
             f"f32 {rates['f32'] / 1e12:.1f} TFLOP/s, memory {_fmt_bytes(t['memory_bytes'])}. "
             f"Source: {t['peak_source']}.",
             "- Every case is `jax.vjp` of the op (impl=pallas) applied to a cotangent: forward and backward in one "
             "executable; `mnist_train_step` is one whole SGD step of the MLP.",
             "- floor = max(bytes / HBM bandwidth, flops / peak): registry bytes and flops of fwd+bwd; bf16 "
             "matmul ops at the bf16 rate, everything else at the f32 rate.",
             "- peak memory: XLA's memory_analysis of the executable (arguments + outputs + temporaries where XLA "
             "gives no peak)."]
    if t.get("kernels_note"):
        lines += [f"- Kernels: {t['kernels_note']}"]
    # sm_100a's tensor-core instruction gets its own column (the Hopper reports keep theirs).
    tcgen05 = t.get("arch") == "sm_100a"
    if t["platform"] == "cuda":
        lines += ["- Per kernel: grid, threads and shared memory (dynamic + static) from XLA's thunk sequence; "
                  "registers and spills from `ptxas -v` on XLA's PTX; occupancy = resident warps / 64 per SM (limits: "
                  "registers, shared memory, warps, 32 blocks); waves = blocks / (blocks per SM x SMs); wgmma / mma = "
                  f"tensor-core instructions in the PTX ({t.get('arch') or 'sm_90a'})"
                  + (", tcgen05 = `tcgen05.mma` (sm_100a's)" if tcgen05 else "") + "; issue = the wgmma loop's PTX "
                  "instructions per step x R / its wgmma multiply-adds per warpgroup, R = tensor-core multiply-adds per SM per clock: instruction "
                  "issue time over tensor-core time per step (at most 1: issue keeps up)."]
    else:
        lines += ["- Per kernel: grid and blocks from the traced pallas_call; VMEM estimate = 2 buffers per block "
                  f"(the Pallas pipeline double-buffers) + scratch, the kernel body's temporaries not counted "
                  f"(Mosaic's own check is the compile itself), against the default scoped VMEM "
                  f"({_fmt_bytes(t['vmem_scoped_bytes'])}); XLA's optimal_seconds counts a Mosaic kernel only by its "
                  "CostEstimate (0 where the kernel gives none)."]
    bad = [r for r in doc["results"] if r["problems"]]
    lines += ["", f"**{len(doc['results'])} compiles, {len(bad)} with problems.**", ""]
    if bad:
        lines += ["## Problems", ""] + [f"- {_case_cell(r)}: " + "; ".join(r["problems"]) for r in bad] + [""]
    tpu = t["platform"] == "tpu"
    lines += ["## Per op", "", "| case | set | status | peak memory | temp | floor | bound |"
              + (" XLA optimal |" if tpu else "") + " compile s |", "|" + " --- |" * (9 if tpu else 8)]
    for r in doc["results"]:
        mem = r.get("memory", {})
        optimal = r.get("cost_analysis", {}).get("optimal_seconds")
        lines.append(f"| {_case_cell(r)} | {r['shape_set']} | {r['status']} | {_fmt_bytes(mem.get('peak_bytes'))} | "
                     f"{_fmt_bytes(mem.get('temp_bytes'))} | {_fmt_s(r['floor_s'])} | {r['bound']} |"
                     + (f" {_fmt_s(optimal)} |" if tpu else "") + f" {r['compile_s']:.1f} |")
    lines += ["", "## Per kernel", ""]
    if t["platform"] == "cuda":
        lines += ["| case | kernel | grid | waves | warps | stages | regs | smem | spills (st/ld B) | occupancy | "
                  "wgmma | mma |" + (" tcgen05 |" if tcgen05 else "") + " issue |",
                  "| --- |" + " --- |" * (13 if tcgen05 else 12)]
        for r in doc["results"]:
            for k in r.get("kernels", []):
                occ = k.get("occupancy")
                occ_cell = f"{100 * occ:.0f}% ({k['blocks_per_sm']} blk, {k['occupancy_limiter']})" if occ else "-"
                waves = k.get("waves")
                lines.append(
                    f"| {_case_cell(r)} | {k['kernel']} | {'x'.join(map(str, k['grid']))} | "
                    f"{'-' if waves is None else f'{waves:.2f}'} | {k['warps']} | {k['stages'] or '-'} | "
                    f"{k['registers'] if k['registers'] is not None else '-'} | {_fmt_bytes(k['smem_bytes'])} | "
                    f"{k['spill_store_bytes'] if k['spill_store_bytes'] is not None else '-'}/"
                    f"{k['spill_load_bytes'] if k['spill_load_bytes'] is not None else '-'} | {occ_cell} | "
                    f"{k['wgmma'] if k['wgmma'] is not None else '-'} | {k['mma'] if k['mma'] is not None else '-'} | "
                    + (f"{k['tcgen05'] if k.get('tcgen05') is not None else '-'} | " if tcgen05 else "")
                    + f"{_fmt_ratio(k.get('issue_ratio'))} |")
    else:
        lines += ["| case | kernel | grid | blocks (shape dtype) | VMEM estimate | of scoped |",
                  "| --- |" + " --- |" * 5]
        for r in doc["results"]:
            for k in r.get("kernels", []):
                blocks = ", ".join("x".join(map(str, b[:-1])) + " " + b[-1] for b in k["blocks"])
                lines.append(f"| {_case_cell(r)} | {k['kernel']} | {'x'.join(map(str, k['grid']))} | {blocks} | "
                             f"{_fmt_bytes(k['vmem_estimate_bytes'])} | {100 * k['vmem_fraction_of_scoped']:.0f}% |")
    return "\n".join(lines) + "\n"


def write(doc: dict, out_dir: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(markdown(doc))
    return out


def default_out_dir(target_name: str) -> pathlib.Path:
    """The committed copy: ``bench/results/static-<target>/``."""
    return RESULTS_DIR / f"static-{target_name}"


def main(targets: Sequence[str], ops: Sequence[str] | None, shape_sets: Sequence[str], dtypes: Sequence[str],
         out: str | None, log=None) -> list[dict]:
    """The ``--static`` CLI: compiles for each target, writes its files, prints a summary.

    The full default matrix writes ``bench/results/static-<target>/`` (the committed copy);
    a subset writes only to ``out`` if given, so a partial run never overwrites it.
    Returns one results document per target.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    use_cpu_backend()
    cases = build_cases(ops, shape_sets, dtypes)
    full = ops is None and set(shape_sets) == set(SHAPE_SETS) and set(dtypes) == set(DTYPES)
    docs = []
    for name in targets:
        reason = unavailable_reason(get_target(name).platform)
        if reason:
            raise SystemExit(f"error: cannot compile for {name}: {reason}")
        doc = run(name, cases, log)
        docs.append(doc)
        where = pathlib.Path(out) / f"static-{name}" if out and len(targets) > 1 else (
            pathlib.Path(out) if out else (default_out_dir(name) if full else None))
        if where is not None:
            write(doc, where)
            log(f"wrote {where}/results.json, results.md")
        bad = [r for r in doc["results"] if r["problems"]]
        print(f"{name}: {len(doc['results'])} compiles, {len(bad)} with problems", flush=True)
        for r in bad:
            print(f"  {_case_cell(r)}: " + "; ".join(r["problems"]), flush=True)
    return docs
